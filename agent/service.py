"""The daemon: ingest from the edge broker, process, publish to the cloud broker.

Threads:
* paho's edge network thread runs ``_on_scan``: persist to the inbox, then ack;
* the main thread runs the processing loop (``run``: decode .. infer) and handles signals;
* the finisher thread derives, seals and commits each result (``_finisher``);
* the outbox thread publishes queued rows to the cloud and deletes them on PUBACK.
"""

from __future__ import annotations

import hashlib
import json
import queue
import signal
import threading
import time
from datetime import UTC, datetime
from types import FrameType
from typing import Any

from agent import __version__, keys, sdnotify, seal
from agent.backends import open_runner, runner_options
from agent.backends.select import Choice, choose_runner
from agent.bundle import load_bundle
from agent.config import Config
from agent.guard import check_guard
from agent.log import get_logger
from agent.mqtt import Connection, Message, Will
from agent.pipeline import Inferred, Outcome, Translator, error_report
from agent.store import InboxItem, Store, StoreFull
from agent.topics import Topics

log = get_logger("agent.service")

FINISH_QUEUE = 2  # scans between the two halves of the pipeline
OUTBOX_WINDOW = 32  # rows in flight to the cloud broker at once
STATUS_INTERVAL_S = 15.0
DRAIN_ON_STOP_S = 10.0


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class Agent:
    """One running agent. ``run()`` blocks until SIGTERM/SIGINT, then returns 0."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.sd = sdnotify.ServiceNotifier.from_environ()
        self.sd.status(f"starting: loading model bundle {config.model.bundle}")
        a = config.agent
        self.topics = Topics(a.site, a.device_id)
        self.bundle = load_bundle(config.model.bundle)
        options = runner_options(config.model, self.bundle, a.state_dir)
        self.selection: Choice | None = None
        if config.model.backend == "auto":
            # Every installed runtime the bundle has a file for is guarded and timed on the
            # golden set; the fastest that passes serves. Cached per model digest, so a
            # restart only re-runs the guard. Raises GuardFailed when none passes.
            assert a.state_dir is not None
            self.sd.status(f"starting: choosing a runtime for {self.bundle.name}")
            self.runner, self.selection = choose_runner(
                self.bundle, options, a.state_dir / "backend-choice.json"
            )
            self.guard = self.selection.guard
            runtime = self.selection.runtime
        else:
            runtime = config.model.backend
            self.runner = open_runner(
                runtime, str(self.bundle.backend_file(runtime).path), options
            )
            try:  # never serve a model that has drifted from its fp32 reference
                self.guard = check_guard(self.bundle, self.runner)
            except BaseException:
                self.runner.close()
                raise
        if self.guard.warning:
            log.warning("model_guard", model=self.bundle.name, warning=self.guard.warning)
        else:
            log.info("model_guard_passed", model=self.bundle.name, **self.guard.summary())
        recipient = keys.load_recipient_public_key(config.seal.recipient_public_key)
        signing_key = keys.load_signing_key(config.seal.device_signing_key)

        def sealer(plaintext: bytes, message_id: str) -> bytes:
            return seal.seal(
                plaintext,
                recipient=recipient,
                signing_key=signing_key,
                device_id=a.device_id,
                message_id=message_id,
                content_type="application/dicom",
            )

        self.translator = Translator(
            self.bundle, self.runner, sealer, limits=config.limits, topics=self.topics,
            runtime=runtime,
        )
        assert a.state_dir is not None
        self.store = Store(
            a.state_dir / "agent.db",
            inbox_max_bytes=config.limits.inbox_max_bytes,
            outbox_max_bytes=config.limits.outbox_max_bytes,
        )
        self._stop = threading.Event()
        self._work = threading.Event()  # new inbox rows
        self._kick = threading.Event()  # new outbox rows or a reconnect
        self._space = threading.Condition()
        self._inflight: set[int] = set()
        self._retry: list[int] = []
        self._inflight_lock = threading.Lock()
        self._last_latency_ms: float | None = None
        self._last_status = 0.0
        self._drain_deadline = float("inf")
        self._last_fetched = 0  # inbox rows up to here are in the finisher's hands
        self._finishing: queue.Queue[tuple[InboxItem, Inferred | Outcome, float] | None] = (
            queue.Queue(maxsize=FINISH_QUEUE)
        )

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

    # -- outbox (its own thread) ---------------------------------------------------------
    def _publisher(self) -> None:
        last_id = 0
        while True:
            self._kick.wait(1.0)
            self._kick.clear()
            if not self.cloud.connected:
                if self._stop.is_set() and self._drain_deadline < time.monotonic():
                    return
                continue
            with self._inflight_lock:
                retry, self._retry = self._retry, []
                room = OUTBOX_WINDOW - len(self._inflight)
            if retry:  # refused by the broker: back off before trying those rows again
                time.sleep(1.0)
                last_id = min(last_id, min(retry) - 1)
            if room > 0:
                for row in self.store.outbox(after_id=last_id, limit=room):
                    last_id = row.id
                    with self._inflight_lock:
                        if row.id in self._inflight:
                            continue
                        self._inflight.add(row.id)
                    self.cloud.publish(row.topic, row.payload, qos=1,
                                       on_done=self._delivery_callback(row.id))
            if self._stop.is_set():
                _, outbox = self.store.depths()
                if outbox == 0 or time.monotonic() > self._drain_deadline:
                    return

    def _delivery_callback(self, outbox_id: int) -> Any:
        def done(ok: bool, reason: str) -> None:
            with self._inflight_lock:
                self._inflight.discard(outbox_id)
                if not ok:
                    self._retry.append(outbox_id)
            if ok:
                self.store.delivered(outbox_id)
                with self._space:
                    self._space.notify_all()
            else:
                log.warning("cloud_refused_result", outbox_id=outbox_id, reason=reason,
                            fix="check the cloud broker's ACL for the results topic")
            self._kick.set()

        return done

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
            "model": {
                "name": self.bundle.name,
                "version": self.bundle.version,
                "digest": self.translator.identity.digest,
                "runtime": self.runner.runtime,
                "backend": self.config.model.backend,  # "auto" or the configured runtime
                **({"selection": self.selection.summary()} if self.selection else {}),
                "guard": self.guard.summary(),
            },
            "inbox_depth": inbox,
            "outbox_depth": outbox,
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
    def _process_pending(self) -> bool:
        """Run the first half (decode .. infer) of every pending scan on this thread and hand
        each to the finisher. Returns whether there was anything to do."""
        items = self.store.pending(after_id=self._last_fetched, limit=8)
        for item in items:
            self._beat()
            if self._stop.is_set():
                return True
            while self.store.outbox_full() and not self._stop.is_set():
                self._beat()  # waiting for the cloud is not a hang
                log.warning("outbox_full", fix="the cloud broker is not taking results")
                with self._space:
                    self._space.wait(5.0)
            started = time.perf_counter()
            first = self.translator.infer(item.payload, item.topic, item.sha256)
            self._finishing.put((item, first, started))  # blocks when the finisher lags
            self._last_fetched = item.id
        return bool(items)

    def _finisher(self) -> None:
        """Second half (derive, seal) and the commit, one scan at a time, in order."""
        while True:
            job = self._finishing.get()
            if job is None:
                return
            item, first, started = job
            outcome = first if isinstance(first, Outcome) else self.translator.finish(first)
            self.store.complete(
                item.id,
                [(outcome.kind, outcome.message_id, outcome.topic, outcome.payload)],
                outcome.counter,
            )
            self._kick.set()
            with self._space:
                self._space.notify_all()
            total_ms = round((time.perf_counter() - started) * 1000, 3)
            queued_ms = round((time.time() - item.received_at) * 1000, 1)
            if outcome.ok:
                self._last_latency_ms = total_ms
                log.info("slice_processed", message_id=outcome.message_id,
                         series=outcome.series_key, stages_ms=outcome.timings_ms,
                         total_ms=total_ms, since_received_ms=queued_ms,
                         bytes_out=len(outcome.payload))
            else:
                log.warning("scan_rejected", reason=outcome.reason,
                            payload_sha256=item.sha256, message_id=outcome.message_id)
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
            ready=self.sd.is_ready)

    def _handle_signal(self, signum: int, _frame: FrameType | None) -> None:
        log.info("stopping", signal=signal.Signals(signum).name)
        self.sd.stopping(f"stopping: {signal.Signals(signum).name}, finishing the current scan")
        self._stop.set()
        self._work.set()
        with self._space:
            self._space.notify_all()

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self._handle_signal)
        signal.signal(signal.SIGINT, self._handle_signal)
        publisher = threading.Thread(target=self._publisher, name="outbox", daemon=True)
        finisher = threading.Thread(target=self._finisher, name="finisher", daemon=True)
        inbox, outbox = self.store.depths()
        log.info("agent_starting", site=self.topics.site, device_id=self.topics.device,
                 model=self.bundle.name, model_version=self.bundle.version,
                 model_digest=self.translator.identity.digest[:16], runtime=self.runner.runtime,
                 backend=self.config.model.backend,
                 runtime_cached=self.selection.cached if self.selection else None,
                 inbox_pending=inbox, outbox_pending=outbox)
        self.cloud.start()
        self.edge.start()
        publisher.start()
        finisher.start()
        deadline = time.monotonic() + 10.0
        while (not (self.cloud.connected and self.edge.connected)
               and time.monotonic() < deadline and not self._stop.wait(0.2)):
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
            busy = self._process_pending()
            if not busy:
                self._work.wait(1.0)
                self._work.clear()
            if time.monotonic() - last_periodic > STATUS_INTERVAL_S:
                last_periodic = time.monotonic()
                self._publish_status(force=True)
        # Scans already through the model are finished and committed; the rest stay pending.
        self._finishing.put(None)
        finisher.join()
        return self._shutdown(publisher)

    def _publish_offline(self, conn: Connection) -> None:
        """A clean disconnect does not fire the will: say offline ourselves."""
        if not conn.connected:
            return
        body = json.dumps(self.status("offline"), separators=(",", ":")).encode()
        done = threading.Event()
        conn.publish(self.topics.status, body, qos=1, retain=True,
                     on_done=lambda _ok, _r: done.set())
        done.wait(3.0)

    def _shutdown(self, publisher: threading.Thread) -> int:
        # Stop taking scans first: anything not yet acked stays with the edge broker.
        self._publish_offline(self.edge)
        self.edge.stop()
        self.sd.stopping(f"stopping: delivering queued results to the cloud broker "
                         f"(up to {DRAIN_ON_STOP_S:.0f} s)")
        self._drain_deadline = time.monotonic() + DRAIN_ON_STOP_S
        self._kick.set()
        publisher.join(DRAIN_ON_STOP_S + 2)
        inbox, outbox = self.store.depths()
        self._publish_offline(self.cloud)
        self.cloud.stop()
        self.runner.close()
        self.store.close()
        log.info("agent_stopped", inbox_pending=inbox, outbox_pending=outbox)
        self.sd.status(f"stopped: inbox {inbox}, outbox {outbox} kept for the next start")
        return 0
