"""The daemon: ingest from the edge broker, process, publish to the cloud broker.

Threads:
* paho's edge network thread runs ``_on_scan``: persist to the inbox, then ack;
* the main thread runs the processing loop (``run``: decode, validate, preprocess) and
  handles signals; for a 2.5D model it first assembles series (``agent.daemon.stacking``);
* the model thread runs the model on each staged input (``_modeller``): the runtime releases
  the GIL, so the model works while the main thread decodes the next scan and the finisher
  writes the previous one (on 2 cores: the model on one, the rest on the other);
* the finisher thread derives, seals and commits each result (``_finisher``);
* the outbox thread publishes queued rows to the cloud and deletes them on PUBACK
  (``agent.daemon.outbox``: a row no subscriber took is kept and retried);
* on SIGHUP (``systemctl reload``) a loader thread opens and guards the model the config
  now names; the main thread swaps it in between scans, or reports the refusal and keeps
  serving the model it has.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import queue
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any

from agent import __version__
from agent.backends import BackendError
from agent.config import Config, ConfigError, load_config
from agent.crypto import keys, seal
from agent.daemon import sdnotify
from agent.daemon.outbox import OutboxPublisher
from agent.daemon.pipeline import Inferred, ModelInput, Outcome, Translator, error_report
from agent.daemon.stacking import SeriesStage
from agent.daemon.store import Store, StoreFull
from agent.log import get_logger
from agent.model.bundle import BundleError
from agent.model.guard import GuardFailed
from agent.model.serving import ServedModel, load_model
from agent.transport.mqtt import Connection, Message, Will
from agent.transport.topics import Topics

log = get_logger("agent.daemon.service")

MODEL_QUEUE = 2  # staged scans waiting for the model (each holds its input tensor)
FINISH_QUEUE = 2  # scans between the model and the finisher
FETCH_BATCH = 8  # inbox rows read per turn of the processing loop
STATUS_INTERVAL_S = 15.0
DRAIN_ON_STOP_S = 10.0


def _name_thread(name: str) -> None:
    """Name the calling thread for the OS too (``top -H``, /proc/PID/task/*/comm), so a
    profile of the daemon shows which stage uses the CPU."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None).prctl(15, name.encode()[:15], 0, 0, 0)  # PR_SET_NAME


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass
class _Job:
    """One item for the model thread and then the finisher thread, which handle them in
    order."""

    inbox_id: int | None = None
    # ModelInput: for the model thread; Inferred: for the finisher; Outcome: a rejection;
    # None with an inbox id: a duplicate, no output.
    first: ModelInput | Inferred | Outcome | None = None
    started: float = 0.0
    received_at: float = 0.0
    sha256: str = ""
    hold: bool = False  # keep the payload: a neighbour for slices still to come (2.5D)
    release: list[int] = field(default_factory=list)  # held rows nobody needs any more
    barrier: threading.Event | None = None  # set once every earlier job is committed


class Agent:
    """One running agent. ``run()`` blocks until SIGTERM/SIGINT, then returns 0."""

    def __init__(self, config: Config, config_path: str | Path | None = None) -> None:
        self.config = config
        self.config_path = Path(config_path) if config_path is not None else None
        self.sd = sdnotify.ServiceNotifier.from_environ()
        self.sd.status(f"starting: loading model bundle {config.model.bundle}")
        a = config.agent
        assert a.state_dir is not None
        self.topics = Topics(a.site, a.device_id)
        # KeyFileError (before the model loads), BundleError (GuardFailed), BackendError: exit 2.
        recipient = keys.load_recipient_public_key(config.seal.recipient_public_key)
        signing_key = keys.load_signing_key(config.seal.device_signing_key)
        self.model: ServedModel = load_model(config.model, a.state_dir)
        self._log_guard(self.model)

        def sealer(plaintext: bytes, message_id: str) -> bytes:
            return seal.seal(
                plaintext,
                recipient=recipient,
                signing_key=signing_key,
                device_id=a.device_id,
                message_id=message_id,
                content_type="application/dicom",
            )

        self._sealer = sealer
        self.translator = self._translator(self.model)
        self.store = Store(
            a.state_dir / "agent.db",
            inbox_max_bytes=config.limits.inbox_max_bytes,
            outbox_max_bytes=config.limits.outbox_max_bytes,
        )
        self._stop = threading.Event()
        self._work = threading.Event()  # new inbox rows
        self._kick = threading.Event()  # new outbox rows or a reconnect
        self._space = threading.Condition()
        self._last_latency_ms: float | None = None
        self._last_status = 0.0
        self._last_fetched = 0  # inbox rows up to here are in the finisher's hands
        self._to_model: queue.Queue[_Job | None] = queue.Queue(maxsize=MODEL_QUEUE)
        self._finishing: queue.Queue[_Job | None] = queue.Queue(maxsize=FINISH_QUEUE)
        self.series: SeriesStage | None = None
        self._reload = threading.Event()  # SIGHUP: load the model the config names now
        self._loader: threading.Thread | None = None
        self._candidate: ServedModel | Exception | None = None
        self.model_refused: dict[str, Any] | None = None
        self._refused_what = ""  # the bundle (or config file) the last reload could not use

        offline = json.dumps({"v": 1, "state": "offline", "device_id": a.device_id}).encode()
        will = Will(self.topics.status, offline)
        self.edge = Connection(
            config.edge,
            config.edge.client_id or f"iomt-{a.site}-{a.device_id}-edge",
            name="edge",
            subscriptions=(self.topics.scans_filter(shared=a.shared_subscription),),
            on_message=self._on_scan,
            manual_ack=True,
            will=will,
        )
        self.cloud = Connection(
            config.cloud,
            config.cloud.client_id or f"iomt-{a.site}-{a.device_id}-cloud",
            name="cloud",
            will=will,
            on_connected=self._kick.set,
        )
        self.outbox = OutboxPublisher(self.store, self.cloud, kick=self._kick, stop=self._stop,
                                      space=self._space)

    # -- the model -----------------------------------------------------------------------
    def _translator(self, model: ServedModel) -> Translator:
        return Translator(model.bundle, model.runner, self._sealer, limits=self.config.limits,
                          topics=self.topics, runtime=model.runtime, digest=model.digest)

    @staticmethod
    def _log_guard(model: ServedModel) -> None:
        if model.guard.warning:
            log.warning("model_guard", model=model.bundle.name, warning=model.guard.warning)
        else:
            log.info("model_guard_passed", model=model.bundle.name, **model.guard.summary())

    def _start_series_stage(self) -> None:
        """Series assembly for a 2.5D model, rebuilt from the inbox (held rows are the
        neighbours already processed); none for a 2D model."""
        self._last_fetched = 0  # pending rows are (re)admitted under the current model
        if self.model.context == 0:
            self.series = None
            self.store.release_held()  # held for an earlier 2.5D model: nobody's neighbours
            return
        self.series = SeriesStage(self.translator, self.store, self.config.series)
        reloaded = self.series.reload(time.monotonic(), self._beat)
        log.info("series_assembly", context_slices=self.model.context,
                 held_reloaded=reloaded, idle_timeout_s=self.config.series.idle_timeout_s,
                 max_open=self.config.series.max_open, max_slices=self.config.series.max_slices)

    def _load_candidate(self) -> None:
        """Loader thread: read the config again and open + guard the model it names."""
        settings = self.config.model
        self._refused_what = str(self.config_path)  # until the config has been read
        try:
            if self.config_path is not None:
                settings = load_config(self.config_path).model
            self._refused_what = str(settings.bundle)
            self._candidate = load_model(settings, self.config.agent.state_dir or Path())
        except (ConfigError, BundleError, BackendError) as exc:
            self._candidate = exc
        except Exception as exc:  # a broken bundle must never take the daemon down
            self._candidate = BackendError(f"cannot load {settings.bundle}: "
                                           f"{type(exc).__name__}: {exc}")
        self._work.set()

    def _finish_reload(self) -> None:
        """Main thread: swap the loaded model in, or report why it was refused."""
        candidate, self._candidate, self._loader = self._candidate, None, None
        if isinstance(candidate, ServedModel):
            self._swap(candidate)
        elif candidate is not None:
            self._refuse(candidate)
        if not self._reload.is_set():  # another SIGHUP came meanwhile: that one is pending
            self.sd.reloaded()

    def _drain_finisher(self) -> None:
        """Wait until every job handed to the model thread so far is committed."""
        done = threading.Event()
        self._to_model.put(_Job(barrier=done))  # through the model thread, then the finisher
        while not done.wait(1.0):
            self._beat()

    def _swap(self, new: ServedModel) -> None:
        self._drain_finisher()  # results of the old model are committed under its identity
        old = self.model
        self.model, self.translator = new, self._translator(new)
        self.model_refused = None
        old.close()
        self._log_guard(new)
        self._start_series_stage()
        log.info("model_activated", model=new.bundle.name, version=new.bundle.version,
                 digest=new.digest[:16], runtime=new.runtime, precision=new.precision,
                 previous=f"{old.bundle.name} {old.bundle.version}")
        self._publish_status(force=True)

    def _refuse(self, exc: Exception) -> None:
        """The reload failed: say why everywhere, keep serving the current model. A config
        that does not parse names the config file, not a bundle."""
        config_broken = isinstance(exc, ConfigError)
        what = self._refused_what
        reason = (exc.report.reason if isinstance(exc, GuardFailed)
                  else f"the config cannot be read: {exc}" if config_broken else str(exc))
        figures = exc.report.summary() if isinstance(exc, GuardFailed) else {}
        self.model_refused = {("config" if config_broken else "bundle"): what,
                              "reason": reason, "at": _now(),
                              **({"guard": figures} if figures else {})}
        log.error("model_refused", **{"config" if config_broken else "bundle": what},
                  reason=reason, serving=f"{self.model.bundle.name} {self.model.bundle.version}",
                  fix="`iomt-agent config check` / `iomt-agent model verify BUNDLE` say what is "
                  "wrong; fix the config or the bundle, then `systemctl reload iomt-agent`")
        try:
            marker = (Path(what) if config_broken else Path(what) / "bundle.json").read_bytes()
        except OSError:
            marker = what.encode()
        mid, body = error_report(
            device_id=self.topics.device, reason="model_refused",
            detail=f"{reason} (still serving {self.model.bundle.name} "
            f"{self.model.bundle.version})",
            payload_sha256=hashlib.sha256(marker).hexdigest(), source_topic="model")
        self.store.complete(None, [("error", mid, str(self.topics.errors), body)],
                            "model_refused")
        self._kick.set()
        self._publish_status(force=True)

    # -- ingest (edge network thread) ----------------------------------------------------
    def _on_scan(self, msg: Message) -> None:
        digest = hashlib.sha256(msg.payload).hexdigest()
        if len(msg.payload) > self.config.limits.max_payload_bytes:
            mid, body = error_report(
                device_id=self.topics.device,
                reason="payload_too_large",
                detail=f"{len(msg.payload)} bytes exceeds limits.max_payload_bytes",
                payload_sha256=digest,
                source_topic=msg.topic,
            )
            self.store.complete(None, [("error", mid, str(self.topics.errors), body)], "failed")
        else:
            while True:
                try:
                    self.store.accept(msg.topic, digest, msg.payload)
                    break
                except StoreFull as exc:
                    # Not acked: the broker keeps it. Wait for the worker to drain the inbox.
                    log.warning("inbox_full", detail=str(exc), fix="raise limits.inbox_max_bytes")
                    with self._space:
                        self._space.wait(5.0)
                    if self._stop.is_set():
                        return
        self.edge.ack(msg)
        self._work.set()
        self._kick.set()

    # -- status --------------------------------------------------------------------------
    def status(self, state: str = "online") -> dict[str, Any]:
        inbox, outbox = self.store.depths()
        counts = self.store.counters()
        return {
            "v": 1,
            "state": state,
            "site": self.topics.site,
            "device_id": self.topics.device,
            "agent_version": __version__,
            "model": self.model.summary(),
            **({"model_refused": self.model_refused} if self.model_refused else {}),
            **({"series": {"open": self.series.counts[0], "waiting": self.series.counts[1],
                           "held": self.store.held_count()}} if self.series else {}),
            "inbox_depth": inbox,
            "outbox_depth": outbox,
            "results_unclaimed": self.outbox.unclaimed,
            "processed": counts.get("processed", 0),
            "failed": counts.get("failed", 0),
            "last_latency_ms": self._last_latency_ms,
            "updated": _now(),
        }

    def _publish_status(self, state: str = "online", force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last_status < 1.0:
            return
        self._last_status = now
        body = json.dumps(self.status(state), separators=(",", ":")).encode()
        for conn in (self.cloud, self.edge):
            if conn.connected:
                conn.publish(self.topics.status, body, qos=1, retain=True)

    # -- processing (main thread) --------------------------------------------------------
    def _wait_for_outbox_room(self) -> None:
        while self.store.outbox_full() and not self._stop.is_set():
            self._beat()  # waiting for the cloud is not a hang
            log.warning("outbox_full", fix="the cloud broker is not taking results")
            with self._space:
                self._space.wait(5.0)

    def _process_pending(self) -> bool:
        """Decode, validate and preprocess every pending scan on this thread and hand each
        to the model thread. Returns whether there was anything to do."""
        items = self.store.pending(after_id=self._last_fetched, limit=FETCH_BATCH)
        for item in items:
            self._beat()
            if self._stop.is_set():
                return True
            self._wait_for_outbox_room()
            job = _Job(item.id, None, time.perf_counter(), item.received_at, item.sha256)
            if self.series is None:
                job.first = self.translator.stage(item.payload, item.topic, item.sha256)
                self._to_model.put(job)  # blocks when the model lags
            else:
                admitted = self.series.admit(item, time.monotonic())
                if admitted.outcome is not None or admitted.duplicate:
                    job.first = admitted.outcome
                    self._to_model.put(job)
            self._last_fetched = item.id
        busy = bool(items)
        if self.series is not None:
            # A full batch means more rows wait unread: no series may close for idleness
            # while its next slice may be among them.
            busy = self._process_series(allow_idle=len(items) < FETCH_BATCH) or busy
        return busy

    def _process_series(self, *, allow_idle: bool) -> bool:
        """2.5D: stage every slice whose neighbours are present (or whose series closed)."""
        assert self.series is not None
        busy = False
        for result in self.series.ready(time.monotonic(), allow_idle=allow_idle):
            self._beat()
            self._wait_for_outbox_room()
            item = result.item
            self._to_model.put(_Job(item.id, result.first, result.started, item.received_at,
                                    item.sha256, hold=True))
            busy = True
        released = self.series.finished()
        if released:  # behind the results of those slices, so released once they are stored
            self._to_model.put(_Job(release=released))
        return busy

    def _modeller(self) -> None:
        """The model on each staged scan, in order; every job goes on to the finisher (the
        stop marker too, after the jobs before it)."""
        _name_thread("model")
        while True:
            job = self._to_model.get()
            if job is not None and isinstance(job.first, ModelInput):
                job.first = self.translator.run_model(job.first)
            self._finishing.put(job)  # blocks when the finisher lags
            if job is None:
                return

    def _finisher(self) -> None:
        """Derive, seal and commit, one scan at a time, in order."""
        _name_thread("finisher")
        while True:
            job = self._finishing.get()
            if job is None:
                return
            if job.barrier is not None:
                job.barrier.set()
                continue
            if job.release:
                self.store.release(job.release)
                with self._space:
                    self._space.notify_all()
                continue
            if job.first is None:  # the same instance is already being assembled
                self.store.complete(job.inbox_id, [], "duplicates")
                continue
            first = job.first
            assert not isinstance(first, ModelInput), "the model thread runs every ModelInput"
            outcome = first if isinstance(first, Outcome) else self.translator.finish(first)
            self.store.complete(
                job.inbox_id,
                [(outcome.kind, outcome.message_id, outcome.topic, outcome.payload)],
                outcome.counter,
                hold=job.hold,
            )
            self._kick.set()
            with self._space:
                self._space.notify_all()
            total_ms = round((time.perf_counter() - job.started) * 1000, 3)
            queued_ms = round((time.time() - job.received_at) * 1000, 1)
            if outcome.ok:
                self._last_latency_ms = total_ms
                log.info("slice_processed", message_id=outcome.message_id,
                         series=outcome.series_key, stages_ms=outcome.timings_ms,
                         total_ms=total_ms, since_received_ms=queued_ms,
                         bytes_out=len(outcome.payload))
            else:
                log.warning("scan_rejected", reason=outcome.reason, detail=outcome.detail,
                            payload_sha256=job.sha256, message_id=outcome.message_id)
            self._publish_status()

    def _beat(self) -> None:
        """systemd: READY=1 once both brokers are connected, WATCHDOG=1, STATUS=."""
        self.sd.beat(ready=self.edge.connected and self.cloud.connected,
                     status=self._sd_status)

    def _sd_status(self) -> str:
        inbox, outbox = self.store.depths()
        counts = self.store.counters()
        return sdnotify.status_line(
            brokers=[sdnotify.BrokerState(c.name, c.cfg.url, c.connected, c.last_error)
                     for c in (self.edge, self.cloud)],
            inbox=inbox, outbox=outbox, processed=counts.get("processed", 0),
            failed=counts.get("failed", 0), last_latency_ms=self._last_latency_ms,
            ready=self.sd.is_ready, unclaimed=self.outbox.unclaimed)

    def _handle_signal(self, signum: int, _frame: FrameType | None) -> None:
        log.info("stopping", signal=signal.Signals(signum).name)
        self.sd.stopping(f"stopping: {signal.Signals(signum).name}, finishing the current scan")
        self._stop.set()
        self._work.set()
        with self._space:
            self._space.notify_all()

    def _handle_reload(self, _signum: int, _frame: FrameType | None) -> None:
        log.info("reload_requested", config=str(self.config_path or ""),
                 note="only [model] is reloaded; other changes need a restart")
        self.sd.reloading()
        self._reload.set()
        self._work.set()

    def install_signal_handlers(self) -> None:
        """SIGTERM/SIGINT stop the agent cleanly, SIGHUP reloads the model (main thread)."""
        signal.signal(signal.SIGTERM, self._handle_signal)
        signal.signal(signal.SIGINT, self._handle_signal)
        signal.signal(signal.SIGHUP, self._handle_reload)

    def run(self) -> int:
        self.install_signal_handlers()
        publisher = threading.Thread(target=self.outbox.run, name="outbox", daemon=True)
        modeller = threading.Thread(target=self._modeller, name="model", daemon=True)
        finisher = threading.Thread(target=self._finisher, name="finisher", daemon=True)
        inbox, outbox = self.store.depths()
        m = self.model
        log.info("agent_starting", site=self.topics.site, device_id=self.topics.device,
                 model=m.bundle.name, model_version=m.bundle.version,
                 model_digest=m.digest[:16], runtime=m.runtime, precision=m.precision,
                 backend=m.settings.backend,
                 runner=m.runner.describe(),
                 runtime_cached=m.selection.cached if m.selection else None,
                 inbox_pending=inbox, outbox_pending=outbox)
        self._start_series_stage()
        self.cloud.start()
        self.edge.start()
        publisher.start()
        modeller.start()
        finisher.start()
        deadline = time.monotonic() + 10.0
        # Polled briefly: status "online" (READY for the fleet) follows the second CONNACK
        # by at most one poll.
        while (not (self.cloud.connected and self.edge.connected)
               and time.monotonic() < deadline and not self._stop.wait(0.02)):
            self._beat()  # STATUS "waiting for brokers"; extends the start timeout
        for conn in (self.cloud, self.edge):
            if not conn.connected:
                log.warning("broker_not_reachable_yet", broker=conn.name, url=conn.cfg.url,
                            error=conn.last_error, fix="check the URL, TLS files and credentials;"
                            " the agent keeps retrying")
        self._publish_status(force=True)
        last_periodic = time.monotonic()
        while not self._stop.is_set():
            self._beat()
            if self._reload.is_set() and self._loader is None:
                self._reload.clear()
                self._loader = threading.Thread(target=self._load_candidate, name="loader",
                                                daemon=True)
                self._loader.start()
            if self._loader is not None and not self._loader.is_alive():
                self._finish_reload()
            busy = self._process_pending()
            if not busy:
                self._work.wait(1.0)
                self._work.clear()
            if time.monotonic() - last_periodic > STATUS_INTERVAL_S:
                last_periodic = time.monotonic()
                self._publish_status(force=True)
        # Scans already handed to the model thread (at most MODEL_QUEUE + 1) are run,
        # finished and committed; the rest stay pending in the inbox for the next start.
        self._to_model.put(None)
        modeller.join()
        finisher.join()
        return self._shutdown(publisher)

    def _publish_offline(self, conn: Connection) -> None:
        """A clean disconnect does not fire the will: say offline ourselves."""
        if not conn.connected:
            return
        body = json.dumps(self.status("offline"), separators=(",", ":")).encode()
        done = threading.Event()
        conn.publish(self.topics.status, body, qos=1, retain=True,
                     on_done=lambda _verdict: done.set())
        done.wait(3.0)

    def _shutdown(self, publisher: threading.Thread) -> int:
        # Stop taking scans first: anything not yet acked stays with the edge broker.
        self._publish_offline(self.edge)
        self.edge.stop()
        self.sd.stopping(f"stopping: delivering queued results to the cloud broker "
                         f"(up to {DRAIN_ON_STOP_S:.0f} s)")
        self.outbox.drain_deadline = time.monotonic() + DRAIN_ON_STOP_S
        self._kick.set()
        publisher.join(DRAIN_ON_STOP_S + 2)
        inbox, outbox = self.store.depths()
        self._publish_offline(self.cloud)
        self.cloud.stop()
        # A loader still guarding a model is a daemon thread: it goes with the process.
        if self._loader is not None and not self._loader.is_alive() and isinstance(
                self._candidate, ServedModel):
            self._candidate.close()
        self.model.close()
        self.store.close()
        log.info("agent_stopped", inbox_pending=inbox, outbox_pending=outbox)
        self.sd.status(f"stopped: inbox {inbox}, outbox {outbox} kept for the next start")
        return 0
