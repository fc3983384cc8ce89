"""``iomt-agent receive``: the cloud consumer's MQTT loop around ``ResultReceiver``.

It connects with a persistent session under ``receiver.client_id`` (default
``iomt-{site}-cloud-receiver``; MQTT 5 ``clean_start=0`` with the cloud section's session
expiry, 3.1.1 ``clean_session=0``): the first start creates the session, and from then on
the broker queues results for it while it is away. It subscribes to every device's results
and (``errors=True``) error reports of the site, files each result, keeps what it cannot
open in the quarantine directory (tried again at the next start), and shows each error
report. A message is acked only once it is filed, quarantined or shown.

It ends when ``count`` results are accounted for (filed now or by an earlier run: a
result redelivered after an earlier run filed it counts, one seen twice in this run does
not), at ``timeout``, on ``stop``, or when another receiver with the same client id takes
the session over (it yields rather than knocking the other off in turn). Error reports are
shown as they come and counted in the summary, not towards ``count``.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

from agent.cloud.export import Exporter, ExportTally
from agent.cloud.receiver import ResultReceiver, receiver_from_config
from agent.cloud.stow import StowSettings
from agent.config import Config
from agent.crypto.keyring import describe
from agent.crypto.seal import EnvelopeError
from agent.log import get_logger
from agent.transport.mqtt import Connection, Message, Verdict
from agent.transport.topics import TopicError, Topics

log = get_logger("agent.receive")

CONNECT_GRACE_S = 5.0  # the cloud broker down for this long: say so
MAX_FIELD_CHARS = 500  # an error report comes from the wire: no field logged longer
RECEIPT_FLUSH_S = 3.0  # on the way out: wait this long for the broker to take the receipts

_REJECTED_FIX = {
    "unknown_recipient": "sealed to a recipient key this receiver does not hold: add the "
    "private half of the agent's seal.recipient_public_key to receiver.recipient_private_key "
    "(a list keeps the old keys while the key rotates)",
    "unknown_device": "add the device's public signing key to receiver.trusted_devices",
    "bad_signature": "forged or damaged, or the device has a new signing key: add it to the "
    "device's list in receiver.trusted_devices",
}


class Ending(Enum):
    COUNT = "count"  # --count scans accounted for
    TIMEOUT = "timeout"
    SIGNAL = "signal"
    TAKEN_OVER = "taken_over"  # another receiver with this client id took the session


@dataclass
class Tally:
    filed: int = 0  # results written now (from_quarantine of them out of the quarantine)
    earlier: int = 0  # results whose file was already there: filed by an earlier run
    repeats: int = 0  # results this run had seen already (redelivered)
    report_repeats: int = 0  # error reports this run had seen already (redelivered)
    rejected: int = 0  # results that could not be opened: quarantined
    errors: int = 0  # error reports about scans (no result will come for those)
    notices: int = 0  # error reports not about a scan (model_refused)
    from_quarantine: int = 0
    quarantined: int = 0  # envelopes in the quarantine directory at the end

    @property
    def accounted(self) -> int:
        """Results accounted for, towards ``--count``."""
        return self.filed + self.earlier


@dataclass
class ReceiveSummary:
    tally: Tally
    ending: Ending
    connected: bool  # the cloud broker was reached at least once
    client_id: str
    url: str
    quarantine_dir: Path
    takeover_evidence: str = ""
    signal_name: str | None = None
    export: ExportTally | None = None  # with --stow-url
    export_drained: bool = True
    results_filter: str = ""  # what was subscribed to, for a receive that got nothing


@dataclass
class _Loop:
    receiver: ResultReceiver
    count: int | None
    out_dir: Path
    exporter: Exporter | None = None
    tally: Tally = field(default_factory=Tally)
    lock: threading.Lock = field(default_factory=threading.Lock)
    done: threading.Event = field(default_factory=threading.Event)
    reports_seen: set[str] = field(default_factory=set)

    def _counted(self) -> None:
        if self.count is not None and self.tally.accounted >= self.count:
            self.done.set()

    def retry_quarantine(self) -> None:
        for path, got in self.receiver.retry_quarantine():
            if isinstance(got, EnvelopeError):
                self.tally.quarantined += 1
                continue
            if got.kind == "new":
                self.tally.filed += 1
                self.tally.from_quarantine += 1
                if self.exporter is not None and got.path is not None:
                    self.exporter.submit(got.path)
                log.info("result_received", message_id=got.message_id, device_id=got.device_id,
                         bytes=got.size, path=self._rel(got.path), from_quarantine=path.name)
            else:
                self.tally.earlier += 1
        if self.tally.quarantined:
            log.warning("quarantine_kept", envelopes=self.tally.quarantined,
                        directory=str(self.receiver.quarantine_dir),
                        fix="these still cannot be opened with this config (reasons in the "
                        "result_rejected lines of the run that got them); fix the config and "
                        "run receive again: it retries them first")
        self._counted()

    def _rel(self, path: Path | None) -> str:
        return str(path.relative_to(self.out_dir)) if path is not None else ""

    def on_result(self, msg: Message) -> tuple[bool, str | None]:
        """File (or quarantine) one result: whether it may be acked, and the message id to
        confirm on the receipts topic (None: nothing to confirm)."""
        try:
            got = self.receiver.file(msg.payload)
        except EnvelopeError as exc:
            try:
                kept = self.receiver.quarantine(msg.payload)
            except OSError as write_error:
                return _cannot_write(write_error), None
            with self.lock:
                self.tally.rejected += 1
                self.tally.quarantined += 1
            log.warning("result_rejected", reason=exc.reason, detail=str(exc), topic=msg.topic,
                        quarantined=str(kept), fix=_REJECTED_FIX.get(exc.reason, "kept in the "
                        "quarantine directory; run receive again once the config is fixed"))
            return True, None  # confirmed once it can be opened: the agent sends it again
        except OSError as exc:  # not acked: the broker delivers it again after a reconnect
            return _cannot_write(exc), None
        with self.lock:
            if got.kind == "new":
                self.tally.filed += 1
                log.info("result_received", message_id=got.message_id, device_id=got.device_id,
                         bytes=got.size, path=self._rel(got.path), n=self.tally.filed,
                         recipient_key_id=got.recipient_key_id,
                         signer_key_id=got.signer_key_id)
                if self.exporter is not None and got.path is not None:
                    self.exporter.submit(got.path)
            else:
                if got.kind == "earlier":
                    self.tally.earlier += 1
                else:
                    self.tally.repeats += 1
                log.info("duplicate_dropped", topic=msg.topic, message_id=got.message_id,
                         filed_earlier=got.kind == "earlier", path=self._rel(got.path))
            self._counted()
        return True, got.message_id  # a duplicate is confirmed again: its receipt was lost

    def on_report(self, msg: Message) -> tuple[bool, str | None]:
        """Show one error report (a scan the agent could not process)."""
        try:
            body = json.loads(msg.payload)
            if not isinstance(body, dict):
                raise ValueError("not an object")
            fields = {k: _field(body.get(k)) for k in (
                "reason", "detail", "device_id", "source_topic", "payload_sha256", "at")}
            message_id = _field(body.get("message_id"))
        except (ValueError, UnicodeDecodeError):
            log.warning("error_report_unreadable", topic=msg.topic, bytes=len(msg.payload))
            return True, None
        with self.lock:
            if message_id in self.reports_seen:
                self.tally.report_repeats += 1
                return True, message_id
            self.reports_seen.add(message_id)
            about_a_scan = fields["source_topic"] != "model"
            if about_a_scan:
                self.tally.errors += 1
            else:
                self.tally.notices += 1
            log.warning("error_report", **fields, message_id=message_id,
                        note="the agent rejected this scan: no result will come for it"
                        if about_a_scan else "the agent refused a model")
            self._counted()
        return True, message_id


class _Receipts:
    """Receipts on ``iomt/{site}/{device}/receipts`` (docs/reliability.md): one per result
    or error report filed, sent before the message is acked."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._pending = 0

    def send(self, conn: Connection, topic: str, message_id: str) -> None:
        levels = topic.split("/")
        try:
            target = Topics(levels[1], levels[2]).receipts
        except (IndexError, TopicError):
            return
        with self._cond:
            self._pending += 1
        body = json.dumps({"v": 1, "message_id": message_id}).encode()
        conn.publish(target, body, qos=1, on_done=self._done)

    def _done(self, _verdict: Verdict) -> None:
        with self._cond:
            self._pending -= 1
            self._cond.notify_all()

    def flush(self, timeout: float) -> None:
        with self._cond:
            self._cond.wait_for(lambda: self._pending <= 0, timeout)


def _field(value: object) -> str:
    text = "" if value is None else str(value)
    return text if len(text) <= MAX_FIELD_CHARS else text[:MAX_FIELD_CHARS] + "..."


def _cannot_write(exc: OSError) -> bool:
    log.error("cannot_write_result", error=exc.strerror,
              fix="check free disk and permissions of the --out directory")
    return False


def receive(
    config: Config, out_dir: Path, *, count: int | None, timeout: float | None,
    errors: bool = True, stop: threading.Event | None = None,
    stow: StowSettings | None = None,
) -> ReceiveSummary:
    """Receive until ``count`` results are accounted for, ``timeout`` seconds passed, ``stop``
    is set or the session is taken over; with ``stow``, every filed result is also stored in
    that DICOMweb archive (``agent.cloud.export``), and the end waits for those stores
    (within ``timeout``). Raises ConfigError / KeyFileError for the ``[receiver]`` section."""
    exporter = None
    if stow is not None:
        from agent.cloud.stow import StowClient

        exporter = Exporter(StowClient(stow), out_dir, attempts=stow.attempts)
    loop = _Loop(receiver_from_config(config, out_dir), count, out_dir, exporter)
    log.info("receiver_keys", **describe(loop.receiver.recipients,
                                         loop.receiver.trusted_devices))
    if exporter is not None:
        exporter.start()  # what earlier runs filed and the archive does not have yet
    loop.retry_quarantine()
    topics = Topics(config.agent.site, config.agent.device_id)
    results = topics.results_filter(all_devices=True)
    reports = topics.errors_filter(all_devices=True)

    receipts = _Receipts()

    def on_message(msg: Message) -> None:
        if not errors and reports.matches(msg.topic):  # queued before --no-errors: skipped
            conn.ack(msg)
            return
        handler = loop.on_report if reports.matches(msg.topic) else loop.on_result
        ack, message_id = handler(msg)
        if message_id is not None:  # filed (durably) or shown: the agent may forget it
            receipts.send(conn, msg.topic, message_id)
        if ack:
            conn.ack(msg)

    client_id = config.client_id("receiver")
    conn = Connection(config.cloud, client_id, name="cloud", manual_ack=True,
                      subscriptions=(results, reports) if errors else (results,),
                      on_message=on_message, yield_on_takeover=True,
                      # --no-errors: a persistent session subscribed by an earlier run
                      # keeps the subscription until it is taken back
                      on_connected=None if errors else lambda: conn.unsubscribe(reports))
    stop = stop or threading.Event()
    ending = Ending.COUNT
    ever_connected = False
    down_since, told = time.monotonic(), False
    conn.start()
    deadline = None if timeout is None else time.monotonic() + timeout
    try:
        while not loop.done.is_set():
            now = time.monotonic()
            if stop.is_set():
                ending = Ending.SIGNAL
                break
            if conn.taken_over:
                ending = Ending.TAKEN_OVER
                break
            if deadline is not None and now >= deadline:
                ending = Ending.TIMEOUT
                break
            if conn.connected:
                ever_connected, down_since, told = True, now, False
            elif not told and now - down_since >= CONNECT_GRACE_S:
                told = True
                log.error("cloud_broker_unreachable", url=config.cloud.url,
                          error=conn.last_error, fix="start the cloud broker, or fix cloud.url "
                          "and its TLS files and credentials; receive keeps trying"
                          + (" until --timeout" if deadline is not None else ""))
            loop.done.wait(0.2)
    finally:
        receipts.flush(RECEIPT_FLUSH_S)
        conn.stop()
    drained = True
    if exporter is not None:
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        # On a stop signal the stores in flight get a few seconds; the rest stay pending in
        # the ledger and the next run stores them (an unreachable archive would otherwise
        # hold Ctrl-C for minutes of retries).
        drained = exporter.drain(left, stop)
        exporter.stop()
    return ReceiveSummary(loop.tally, ending, ever_connected, client_id, config.cloud.url,
                          loop.receiver.quarantine_dir, conn.takeover_evidence,
                          export=exporter.tally if exporter else None, export_drained=drained,
                          results_filter=str(results))


def report(summary: ReceiveSummary, count: int | None) -> int:
    """Log how ``receive`` ended, in one summary line (plus the reason it failed); the exit
    status: 0 done, 1 short of ``count`` / taken over / unreachable, 130 on SIGINT."""
    t = summary.tally
    figures: dict[str, int | str] = {"filed": t.filed, "duplicates": t.earlier + t.repeats,
               "already_filed": t.earlier, "rejected": t.rejected, "quarantined": t.quarantined,
               "error_reports": t.errors,
               "duplicate_reports": t.report_repeats}
    if t.quarantined:
        figures["quarantine"] = str(summary.quarantine_dir)
    if t.filed == 0 and t.earlier:
        figures["note"] = (f"all {t.earlier} results were filed by an earlier run "
                           "(duplicates of results already in the output directory)")
    export_failed = _report_export(summary)
    if summary.ending is Ending.SIGNAL:
        log.info("receive_stopped", signal=summary.signal_name, **figures)
        return 130 if summary.signal_name == "SIGINT" else 0
    log.info("receive_done", **figures)
    if summary.ending is Ending.TAKEN_OVER:
        log.error("receiver_taken_over", client_id=summary.client_id,
                  error="another receiver with this client id took over",
                  evidence=summary.takeover_evidence,
                  fix="run one receiver per client id: stop the other one, or give this one "
                  "its own receiver.client_id (each id is its own persistent session, with "
                  "its own copy of every result)")
        return 1
    if summary.ending is Ending.TIMEOUT and not summary.connected:
        log.error("cloud_broker_unreachable", url=summary.url,
                  error="the cloud broker was never reached")
        return 1
    if count is None or t.accounted >= count:
        return 1 if export_failed else 0
    why = {"detail": f"{t.errors} scans were rejected by the agent (the error_report lines "
           "above say why): no result comes for them"} if t.errors else {}
    if t.rejected:
        why = {"detail": f"{t.rejected} results could not be opened and went to the "
               "quarantine (the result_rejected lines above say why and what to fix)"}
    elif not (t.accounted or t.errors or t.repeats):
        why = {"detail": f"nothing arrived on {summary.results_filter}", "fix": "check that "
               "agent.site is the agents' site, that an agent is running and has sent results "
               "(its log), and that cloud.url is the broker they publish to"}
    log.error("receive_timeout", expected=count, accounted=t.accounted, filed=t.filed,
              already_filed=t.earlier, error_reports=t.errors, **why)
    return 1


def _report_export(summary: ReceiveSummary) -> bool:
    """The DICOMweb export's summary line; whether some result is not in the archive."""
    e = summary.export
    if e is None:
        return False
    log.info("stow_done", stored=e.stored, duplicates=e.duplicates, refused=e.refused,
             unreachable=e.unreachable, pending_at_start=e.pending_at_start,
             finished=summary.export_drained)
    if e.refused or e.unreachable or not summary.export_drained:
        log.error("stow_incomplete", refused=e.refused, unreachable=e.unreachable,
                  finished=summary.export_drained,
                  fix="every such result is kept in the output directory (refused ones "
                  "with a record in stow/refused/): the next receive --stow-url sends them")
        return True
    return False
