"""The daemon: ingest from the edge broker, process, publish to the cloud broker.

``Agent`` wires the parts and runs the main loop; each role is its own module:

* ``agent.daemon.ingest``: paho's edge network thread stores each scan in the inbox, then
  acks it (a full inbox holds messages unacked, without blocking that thread);
* ``agent.daemon.stages``: the main thread decodes, validates and preprocesses, a model
  thread runs the model, a finisher thread derives, seals and commits (for a 2.5D model,
  series assembly first, ``agent.daemon.stacking``);
* ``agent.daemon.outbox``: its own thread publishes queued rows to the cloud and deletes
  them on PUBACK (a row no subscriber took is kept and retried);
* ``agent.daemon.reload``: on SIGHUP (``systemctl reload``) a loader thread opens and guards
  the model the config now names; the main thread swaps it in between scans, or reports the
  refusal and keeps serving the model it has;
* this module: the retained status, systemd notifications, signals and the shutdown order.
"""

from __future__ import annotations

import json
import signal
import threading
import time
from pathlib import Path
from types import FrameType
from typing import Any

from agent.config import Config
from agent.daemon import sdnotify
from agent.daemon.ingest import RECEIVE_MAXIMUM, Ingest, confirming_ack
from agent.daemon.outbox import OutboxPublisher
from agent.daemon.pipeline import Translator, deidentifier
from agent.daemon.pressure import Pressure
from agent.daemon.reload import Loaded, Reloader, refusal, reread_config, sharing_refusal
from agent.daemon.sealing import Sealer, refuse_open_secrets
from agent.daemon.stages import StageDied, Stages
from agent.daemon.state_dir import StateLock, prepare_state_dir
from agent.daemon.status import agent_status
from agent.daemon.store import Store
from agent.errors import AgentError
from agent.log import get_logger
from agent.model.serving import ServedModel, load_model
from agent.transport.broker_url import is_loopback
from agent.transport.mqtt import Connection, Message, Will
from agent.transport.topics import Topics

log = get_logger("agent.daemon.service")

STATUS_INTERVAL_S = 15.0
DRAIN_ON_STOP_S = 10.0


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
        refuse_open_secrets(("edge", config.edge), ("cloud", config.cloud))
        prepare_state_dir(a.state_dir)  # StateDirError: exit 2, nothing written
        self.sealer = Sealer(config.seal, a.device_id)
        self._rekey = False  # SIGHUP: read [seal] again on the main loop
        self._work = threading.Event()  # new inbox rows, inbox space, a finished reload
        self.fleet = None
        if config.fleet is not None:
            from agent.fleet.updater import FleetUpdater  # tuf only where updates are on

            self.fleet = FleetUpdater(config.fleet, config.cloud, config.client_id("fleet"),
                                      a.state_dir, notify=self._work,
                                      device=f"{a.site}/{a.device_id}",
                                      stall_s=config.fleet.download_stall_s)
        self.deid = deidentifier(config.deid)  # KeyFileError too
        log.info("deidentification", enabled=self.deid is not None,
                 options=list(self.deid.options.names) if self.deid else [])
        self.decoder = None  # started before the model loads: its imports overlap
        if config.decode.isolate:
            from agent.dicom.sandbox import DecodeProcess

            self.decoder = DecodeProcess(memory_bytes=config.decode.memory_bytes,
                                         timeout_s=config.decode.timeout_s)
        with self.sd.loading():  # auto's first selection may outlast TimeoutStartSec
            self.model: ServedModel = self._first_model(config, a.state_dir)
        if (refused := sharing_refusal(self.model, a.shared_subscription)) is not None:
            self.model.close()
            raise refused
        self._log_guard(self.model)

        log.info("seal_keys", **self.sealer.summary())
        self.store = Store(a.state_dir / "agent.db", inbox_max_bytes=config.limits.inbox_max_bytes,
                           outbox_max_bytes=config.limits.outbox_max_bytes,
                           min_free_bytes=config.storage.min_free_disk_bytes)
        self.pressure = Pressure()
        self._stop = threading.Event()
        self._kick = threading.Event()  # new outbox rows or a reconnect
        self._space = threading.Condition()
        self._last_status, self._status_behind = 0.0, False
        self._links: tuple[object, ...] = ()  # edge, cloud: (connected, why not) last beat
        self.model_refused: dict[str, Any] | None = None
        self.reloader = Reloader(config, self.config_path, self._work,
                                 lambda: self.fleet.store.current if self.fleet else None)
        self.stages = Stages(self.store, config.series, self._translator(self.model),
                             stop=self._stop, space=self._space, beat=self._beat,
                             committed=self._committed, storage=config.storage,
                             pressure=self.pressure)

        offline = json.dumps({"v": 1, "state": "offline", "device_id": a.device_id}).encode()
        will = Will(self.topics.status, offline)
        self.edge = Connection(
            config.edge,
            config.client_id("edge"),
            name="edge",
            subscriptions=(self.topics.scans_filter(shared=a.shared_subscription),),
            on_message=self._on_scan,
            manual_ack=True,
            will=will,
            receive_maximum=RECEIVE_MAXIMUM,
        )
        self.ingest = Ingest(self.store, config.limits, self.topics, stored=self._stored,
                             ack=confirming_ack(self.edge, self.topics), pressure=self.pressure,
                             outbox_backpressure=config.storage.outbox_full == "backpressure")
        receipts = config.delivery.receipts
        self.cloud = Connection(
            config.cloud, config.client_id("cloud"), name="cloud", will=will,
            subscriptions=(self.topics.receipts,) if receipts else (),
            on_message=(lambda m: self.outbox.on_receipt_message(m.topic, m.payload))
            if receipts else None,
            on_connected=lambda: self.outbox.reconnected(),
        )
        self.outbox = OutboxPublisher(
            self.store, self.cloud, kick=self._kick, stop=self._stop, space=self._space,
            receipt_timeout_s=config.delivery.receipt_timeout_s if receipts else None)
        self.updates = None
        if self.fleet is not None:
            from agent.daemon.updates import UpdateHook

            self.updates = UpdateHook(self.fleet, self.reloader, self.store, self.topics,
                                      configured=config.model.bundle, kick=self._kick,
                                      publish_status=lambda: self._publish_status(force=True))
        # Last, so that a refused start leaves nothing held: StateDirError, exit 2.
        self.state_lock = StateLock(a.state_dir)

    # -- the model -----------------------------------------------------------------------
    def _first_model(self, config: Config, state_dir: Path) -> ServedModel:
        """The fleet's current bundle where one was activated (the restart after an update
        comes up on it), else the configured one."""
        current = self.fleet.store.current if self.fleet else None
        if current is not None:
            try:
                return load_model(config.model.model_copy(update={"bundle": current}),
                                  state_dir)
            except AgentError as exc:
                log.error("fleet_bundle_unusable", bundle=str(current), reason=str(exc),
                          fix="serving the configured model.bundle instead")
        return load_model(config.model, state_dir)

    def _translator(self, model: ServedModel) -> Translator:
        return Translator(model.bundle, model.runner, self.sealer, limits=self.config.limits,
                          topics=self.topics, runtime=model.runtime, digest=model.digest,
                          deid=self.deid, domain=self.config.domain,
                          extra_runners=model.extra_runners,
                          **({"decoder": self.decoder.decode} if self.decoder else {}))

    @staticmethod
    def _log_guard(model: ServedModel) -> None:
        if model.guard.warning:
            log.warning("model_guard", model=model.bundle.name, warning=model.guard.warning)
        else:
            log.info("model_guard_passed", model=model.bundle.name, **model.guard.summary())

    def prepare(self) -> None:
        """Before the first scan: series assembly for a 2.5D model, rebuilt from the
        inbox. ``run`` does this; so does a caller that drives ``stages`` itself."""
        self.stages.serve(self.stages.translator, self.model.context)

    def reload_now(self) -> None:
        """Load and guard the model the config names on this thread, then swap it in or
        refuse it, as a SIGHUP does in the background."""
        self._finish_reload(self.reloader.load_now())

    def _finish_reload(self, loaded: Loaded) -> None:
        """Main thread: swap the loaded model in, or report why it was refused."""
        if self.reloader.done_tag is not None and self.updates is not None:  # fleet update
            self.updates.finish(self.reloader.done_tag, loaded, self._swap)
            return
        if isinstance(loaded, ServedModel):
            self._swap(loaded)
        else:
            self._refuse(loaded)
        if not self.reloader.pending:  # another SIGHUP came meanwhile: that one is pending
            self.sd.reloaded()

    def _swap(self, new: ServedModel) -> None:
        self.stages.drain()  # results of the old model are committed under its identity
        old = self.model
        self.model = new
        self.model_refused = None
        old.close()
        self._log_guard(new)
        self.stages.serve(self._translator(new), new.context)
        log.info("model_activated", model=new.bundle.name, version=new.bundle.version,
                 digest=new.digest[:16], runtime=new.runtime, precision=new.precision,
                 previous=f"{old.bundle.name} {old.bundle.version}")
        self._publish_status(force=True)

    def _refuse(self, exc: Exception) -> None:
        """The reload failed: say why everywhere, keep serving the current model."""
        self.model_refused, row = refusal(exc, self.reloader.what, self.model, self.topics)
        what = {k: v for k, v in self.model_refused.items() if k in ("bundle", "config")}
        log.error("model_refused", **what, reason=self.model_refused["reason"],
                  serving=f"{self.model.bundle.name} {self.model.bundle.version}",
                  fix="`iomt-agent config check` / `iomt-agent model verify BUNDLE` say what is "
                  "wrong; fix the config or the bundle, then `systemctl reload iomt-agent`")
        self.store.complete(None, [row], "model_refused")
        self._kick.set()
        self._publish_status(force=True)

    # -- ingest and commit callbacks -----------------------------------------------------
    def _on_scan(self, msg: Message) -> None:
        self.ingest.on_message(msg)

    def _stored(self) -> None:
        self._work.set()
        self._kick.set()

    def _committed(self) -> None:
        self._kick.set()
        self._publish_status()

    # -- status --------------------------------------------------------------------------
    def status(self, state: str = "online") -> dict[str, Any]:
        return agent_status(self, state)

    def _publish_status(self, state: str = "online", force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last_status < 1.0:
            self._status_behind = True  # sent by the next beat a second on: the last counts
            return
        self._last_status, self._status_behind = now, False
        body = json.dumps(self.status(state), separators=(",", ":")).encode()
        for conn in (self.cloud, self.edge):
            if conn.connected:
                conn.publish(self.topics.status, body, qos=1, retain=True)

    def _beat(self) -> None:
        """systemd: READY=1 once both brokers are connected, WATCHDOG=1, STATUS=."""
        self.sd.beat(ready=self.edge.connected and self.cloud.connected,
                     status=self._sd_status)
        since = time.monotonic() - self._last_status
        links, self._links = self._links, tuple(
            (c.connected, c.last_error) for c in (self.edge, self.cloud))
        # Also while a stage waits (for outbox room, for the model): the status stays fresh.
        if self.pressure.changed() or links != self._links or since > STATUS_INTERVAL_S or (
                self._status_behind and since >= 1.0):
            self._publish_status(force=True)

    def _sd_status(self) -> str:
        inbox, outbox, counts = self.store.snapshot()
        return sdnotify.status_line(
            brokers=[sdnotify.BrokerState(c.name, c.cfg.url, c.connected, c.last_error)
                     for c in (self.edge, self.cloud)],
            inbox=inbox, outbox=outbox, processed=counts.get("processed", 0),
            failed=counts.get("failed", 0), last_latency_ms=self.stages.last_latency_ms,
            ready=self.sd.is_ready, unclaimed=self.outbox.unclaimed)

    def _handle_signal(self, signum: int, _frame: FrameType | None) -> None:
        log.info("stopping", signal=signal.Signals(signum).name)
        self.sd.stopping(f"stopping: {signal.Signals(signum).name}, finishing the current scan")
        self._stop.set()
        self._work.set()
        with self._space:
            self._space.notify_all()

    def _handle_reload(self, _signum: int, _frame: FrameType | None) -> None:
        self.request_reload()

    def request_reload(self) -> None:
        """What SIGHUP asks for: [model] and [seal] read again (safe in a handler)."""
        log.info("reload_requested", config=str(self.config_path or ""),
                 note="[model] and [seal] are reloaded; other changes need a restart")
        self.sd.reloading()
        self._rekey = self.config_path is not None
        self.reloader.request()

    def install_signal_handlers(self) -> None:
        """SIGTERM/SIGINT stop the agent cleanly, SIGHUP reloads the model (main thread)."""
        signal.signal(signal.SIGTERM, self._handle_signal)
        signal.signal(signal.SIGINT, self._handle_signal)
        signal.signal(signal.SIGHUP, self._handle_reload)

    def run(self) -> int:
        self.install_signal_handlers()
        publisher = threading.Thread(target=self.outbox.run, name="outbox", daemon=True)
        inbox, outbox = self.store.depths()
        m = self.model
        log.info("agent_starting", site=self.topics.site, device_id=self.topics.device,
                 model=m.bundle.name, model_version=m.bundle.version,
                 model_digest=m.digest[:16], runtime=m.runtime, precision=m.precision,
                 backend=m.settings.backend,
                 runner=m.runner.describe(),
                 runtime_cached=m.selection.cached if m.selection else None,
                 inbox_pending=inbox, outbox_pending=outbox)
        for role, broker in (("edge", self.config.edge), ("cloud", self.config.cloud)):
            if not broker.tls and not is_loopback(broker.host):  # allow_plaintext = true
                log.warning("plaintext_broker", broker=role, url=broker.url,
                            risk="scans, results and status travel unencrypted and the "
                            "broker is not authenticated", fix=f"use mqtts:// in {role}.url "
                            "with ca_file, cert_file and key_file")
        self.prepare()
        self.ingest.start()
        self.cloud.start()
        self.edge.start()
        if self.fleet is not None:
            self.fleet.start()
        publisher.start()
        self.stages.start()
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
        try:
            while not self._stop.is_set():
                self._beat()
                self.stages.check_alive()  # StageDied: a clean stop, then exit 1 (a restart)
                if self._rekey and self.config_path is not None:
                    self._rekey = False
                    if reread_config(self.config_path, self.config, self.sealer):
                        self._publish_status(force=True)
                loaded = self.reloader.poll()
                if loaded is not None:
                    self._finish_reload(loaded)
                if self.updates is not None:
                    self.updates.turn()
                if self.ingest.held:
                    self.ingest.retry()  # the inbox may have room again
                busy = self.stages.process_pending()
                if not busy:
                    self._work.wait(1.0)
                    self._work.clear()
        except StageDied as exc:
            log.error("stage_died", error=str(exc), fix="a bug in the agent: report it with "
                      "this log; the agent stops and systemd restarts it (Restart=on-failure), "
                      "and every scan not yet committed is processed again")
            died = True
        else:
            died = False
        # What was handed over is committed; the rest stays pending.
        self.stages.stop(timeout=5.0 if died else None)
        code = self._shutdown(publisher)
        return 1 if died else code

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
        self.ingest.stop()  # the batch being written is acked; the rest stays unacked
        self.edge.stop()
        self.sd.stopping(f"stopping: delivering queued results to the cloud broker "
                         f"(up to {DRAIN_ON_STOP_S:.0f} s)")
        self.outbox.drain_deadline = time.monotonic() + DRAIN_ON_STOP_S
        self._kick.set()
        publisher.join(DRAIN_ON_STOP_S + 2)
        inbox, outbox = self.store.depths()
        self._publish_offline(self.cloud)
        self.cloud.stop()
        if self.fleet is not None:
            self.fleet.stop()
        self.reloader.close()
        self.model.close()
        if self.decoder is not None:
            self.decoder.close()
        self.store.close()
        self.state_lock.release()
        log.info("agent_stopped", inbox_pending=inbox, outbox_pending=outbox)
        self.sd.status(f"stopped: inbox {inbox}, outbox {outbox} kept for the next start")
        return 0
