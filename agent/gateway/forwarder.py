"""Instances from the Storage SCP to the site's scan topic, safe before C-STORE success.

``Forwarder.store`` publishes one instance at QoS 1 and waits (``ack_timeout_s``) for the
edge broker's PUBACK. Without a connection, without an ack in time, or when no subscriber
took it (MQTT 5 reason 0x10: the broker discarded it), the instance is committed to the
spool instead. Either way ``store`` returns only once the instance is safe; a drainer thread
publishes spooled instances oldest first whenever the broker is connected, and deletes each
row on its PUBACK. An instance published, timed out and spooled can reach the broker twice:
at least once, as everywhere in the agent (results carry an idempotency key).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum

from agent.errors import AgentError
from agent.gateway.spool import Spool
from agent.log import get_logger
from agent.transport.mqtt import Connection, Delivery, PublishFailed, Verdict
from agent.transport.topics import Topic

log = get_logger("agent.gateway")

DRAIN_BATCH = 16  # spooled instances in flight at once
IN_FLIGHT_GIVE_UP_S = 60.0  # no PUBACK for this long: send the row again
UNCLAIMED_BACKOFF_S = 5.0  # no subscriber took a drained row: wait before the next try


class BrokerRefused(AgentError):
    """The edge broker refused the publish (MQTT 5 reason >= 0x80, e.g. not authorized)."""


class Outcome(Enum):
    PUBLISHED = "published"  # the broker acknowledged it (a subscriber's session has it)
    SPOOLED = "spooled"  # committed to the spool; the drainer publishes it later


@dataclass
class Counts:
    published: int = 0
    spooled: int = 0
    drained: int = 0


@dataclass
class _Wait:
    done: threading.Event = field(default_factory=threading.Event)
    verdict: Verdict | None = None

    def __call__(self, verdict: Verdict) -> None:
        self.verdict = verdict
        self.done.set()


class Forwarder:
    def __init__(self, conn: Connection, topic: Topic, spool: Spool, *,
                 ack_timeout_s: float) -> None:
        self.conn = conn
        self.topic = topic
        self.spool = spool
        self.ack_timeout_s = ack_timeout_s
        self.counts = Counts()
        self._lock = threading.Lock()
        self._in_flight: dict[int, float] = {}  # spool row id -> when it was published
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._hold_until = 0.0
        self._thread = threading.Thread(target=self._drain_loop, name="gateway-drain",
                                        daemon=True)

    # -- the SCP's side ------------------------------------------------------------------
    def store(self, sop_uid: str, payload: bytes) -> Outcome:
        """Make one instance safe: acked by the broker, or committed to the spool. Raises
        BrokerRefused, SpoolFull, or sqlite3/OS errors (nothing is safe then)."""
        # Spooled instances go first, so the broker sees a series in order once it is back.
        if self.conn.connected and self.spool.count == 0:
            wait = _Wait()
            try:
                self.conn.publish(self.topic, payload, qos=1, on_done=wait)
            except PublishFailed:  # paho would not queue it: the spool takes it instead
                wait.done.set()
            if wait.done.wait(self.ack_timeout_s) and wait.verdict is not None:
                if wait.verdict.delivery is Delivery.DELIVERED:
                    with self._lock:
                        self.counts.published += 1
                    return Outcome.PUBLISHED
                if wait.verdict.delivery is Delivery.REFUSED:
                    raise BrokerRefused(f"the edge broker refused the publish: "
                                        f"{wait.verdict.reason}")
        self.spool.put(sop_uid, payload)
        with self._lock:
            self.counts.spooled += 1
        self._wake.set()
        return Outcome.SPOOLED

    # -- the drainer ---------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout)

    def kick(self) -> None:
        """The broker is (back) connected: drain now."""
        with self._lock:
            self._hold_until = 0.0
        self._wake.set()

    def _drain_loop(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(1.0)
            self._wake.clear()
            if self._stop.is_set():
                return
            try:
                self._drain_once()
            except Exception as exc:  # never let the drainer die: the spool keeps the rows
                log.error("gateway_drain_failed", error=f"{type(exc).__name__}: {exc}")

    def _drain_once(self) -> None:
        if not self.conn.connected or time.monotonic() < self._hold_until:
            return
        now = time.monotonic()
        with self._lock:
            for row_id, sent in list(self._in_flight.items()):
                if now - sent > IN_FLIGHT_GIVE_UP_S:
                    del self._in_flight[row_id]
            busy = set(self._in_flight)
        room = DRAIN_BATCH - len(busy)
        if room <= 0:
            return
        for row in self.spool.oldest(busy, room):
            with self._lock:
                self._in_flight[row.id] = time.monotonic()
            try:
                self.conn.publish(self.topic, row.payload, qos=1,
                                  on_done=self._on_drained(row.id))
            except PublishFailed as exc:  # kept in the spool; tried again on the next turn
                with self._lock:
                    self._in_flight.pop(row.id, None)
                log.warning("gateway_drain_failed", error=str(exc))
                return

    def _on_drained(self, row_id: int) -> Callable[[Verdict], None]:
        return lambda verdict: self._drained(row_id, verdict)

    def _drained(self, row_id: int, verdict: Verdict) -> None:
        """paho's thread: the broker's verdict on one spooled row."""
        if verdict.delivery is Delivery.DELIVERED:
            self.spool.delivered(row_id)
            with self._lock:
                self._in_flight.pop(row_id, None)
                self.counts.drained += 1
                more = self.spool.count > 0
            if more:
                self._wake.set()
            return
        with self._lock:
            self._in_flight.pop(row_id, None)
            already_held = time.monotonic() < self._hold_until
            self._hold_until = time.monotonic() + UNCLAIMED_BACKOFF_S
        if already_held:  # one line per hold, not one per row in flight
            return
        log.warning("gateway_spool_held", verdict=verdict.delivery.value, reason=verdict.reason,
                    spooled=self.spool.count,
                    fix="no agent has subscribed to the scan topic yet (start `iomt-agent run`)"
                    if verdict.delivery is Delivery.UNCLAIMED
                    else "the edge broker refuses the gateway's publishes: check its ACL and "
                    "the edge section's credentials")
