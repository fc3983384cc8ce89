"""Instances from the Storage SCP to the site's scan topic, safe before C-STORE success.

``Forwarder.store`` publishes one instance at QoS 1 and waits (``ack_timeout_s``) for the
edge broker's PUBACK. Without a connection, without an ack in time, or when no subscriber
took it (MQTT 5 reason 0x10: the broker discarded it), the instance is committed to the
spool instead. Either way ``store`` returns only once the instance is safe; a drainer thread
publishes spooled instances oldest first whenever the broker is connected, and deletes each
row on its PUBACK. An instance published, timed out and spooled can reach the broker twice:
at least once, as everywhere in the agent (results carry an idempotency key).

With ``accepted_timeout_s`` set (``gateway.keep_until_accepted``) the PUBACK is not the end:
a broker that acks and then crashes before the agent has the instance loses it (Mosquitto
persists snapshots, not a log). ``store`` then commits every instance to the spool *first*
and publishes it; the PUBACK only marks the row as awaiting the agent's ``accepted`` receipt
(``on_accepted``, the digest of the payload), which deletes it. After every reconnect all
awaiting rows are published again, and so is each one whose receipt is overdue
(``accepted_timeout_s`` after the first try, doubling per try up to an hour:
``agent.transport.scan_receipts``, the schedule of ``send --confirm`` too).
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
from agent.transport.mqtt import Connection, Delivery, Message, PublishFailed, Verdict
from agent.transport.scan_receipts import accepted_digest
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
    confirmed: int = 0  # rows deleted on the agent's receipt
    resent: int = 0  # awaiting rows queued again (reconnect, overdue receipt)


@dataclass
class _Wait:
    done: threading.Event = field(default_factory=threading.Event)
    verdict: Verdict | None = None

    def __call__(self, verdict: Verdict) -> None:
        self.verdict = verdict
        self.done.set()


class Forwarder:
    def __init__(self, conn: Connection, topic: Topic, spool: Spool, *,
                 ack_timeout_s: float, accepted_timeout_s: float | None = None) -> None:
        self.conn = conn
        self.topic = topic
        self.spool = spool
        self.ack_timeout_s = ack_timeout_s
        self.accepted_timeout_s = accepted_timeout_s  # None: a PUBACK deletes the row
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
        if self.accepted_timeout_s is not None:
            return self._store_kept(sop_uid, payload)
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

    def _store_kept(self, sop_uid: str, payload: bytes) -> Outcome:
        """``keep_until_accepted``: the spool row first, then the publish; the row stays
        until the agent's receipt."""
        with self._lock:  # registered in flight at once: the drainer must not send it too
            row_id = self.spool.put(sop_uid, payload)
            direct = self.conn.connected and self.spool.queued == 1
            if direct:
                self._in_flight[row_id] = time.monotonic()
        if direct:
            wait = _Wait()
            try:
                self.conn.publish(self.topic, payload, qos=1, on_done=wait)
            except PublishFailed:
                wait.done.set()
            if wait.done.wait(self.ack_timeout_s) and wait.verdict is not None:
                if wait.verdict.delivery is Delivery.DELIVERED:
                    self._awaiting(row_id)
                    with self._lock:
                        self._in_flight.pop(row_id, None)
                        self.counts.published += 1
                    return Outcome.PUBLISHED
                if wait.verdict.delivery is Delivery.REFUSED:
                    self.spool.remove(row_id)
                    with self._lock:
                        self._in_flight.pop(row_id, None)
                    raise BrokerRefused(f"the edge broker refused the publish: "
                                        f"{wait.verdict.reason}")
            with self._lock:  # no PUBACK in time: the drainer sends it (again)
                self._in_flight.pop(row_id, None)
        with self._lock:
            self.counts.spooled += 1
        self._wake.set()
        return Outcome.SPOOLED

    def _awaiting(self, row_id: int) -> None:
        """The broker acked a kept row: await the receipt, then send it again."""
        assert self.accepted_timeout_s is not None
        self.spool.acked(row_id, self.accepted_timeout_s)

    def on_accepted(self, msg: Message) -> None:
        """paho's thread: the agent's receipt for one instance (``accepted``)."""
        digest = accepted_digest(msg.payload)
        if digest is None:
            log.warning("scan_receipt_unreadable", topic=msg.topic, bytes=len(msg.payload))
            return
        n = self.spool.confirmed(digest)
        with self._lock:
            self.counts.confirmed += n

    # -- the drainer ---------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout)

    def kick(self) -> None:
        """The broker is (back) connected: drain now; with receipts, everything awaiting
        one goes out again (the broker may have lost what it acked before)."""
        if self.accepted_timeout_s is not None:
            n = self.spool.requeue_all()
            with self._lock:
                self.counts.resent += n
            if n:
                log.info("gateway_resend_unconfirmed", rows=n, cause="reconnect",
                         note="the broker may have lost instances it had acked; the agent "
                         "processes a duplicate twice, the consumer drops the second result")
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
        if self.accepted_timeout_s is not None:
            self._requeue_overdue()
        now = time.monotonic()
        with self._lock:
            for row_id, sent in list(self._in_flight.items()):
                if now - sent > IN_FLIGHT_GIVE_UP_S:
                    del self._in_flight[row_id]
            busy = set(self._in_flight)
            room = DRAIN_BATCH - len(busy)
            rows = self.spool.oldest(busy, room) if room > 0 else []
            for row in rows:  # in flight before the lock goes: store() must not send them
                self._in_flight[row.id] = now
        for i, row in enumerate(rows):
            try:
                self.conn.publish(self.topic, row.payload, qos=1,
                                  on_done=self._on_drained(row.id))
            except PublishFailed as exc:  # kept in the spool; tried again on the next turn
                with self._lock:
                    for unsent in rows[i:]:
                        self._in_flight.pop(unsent.id, None)
                log.warning("gateway_drain_failed", error=str(exc))
                return

    def _requeue_overdue(self) -> None:
        n = self.spool.requeue_overdue(time.time())
        if not n:
            return
        with self._lock:
            self.counts.resent += n
        log.warning("accepted_overdue", rows=n, awaiting=self.spool.count,
                    fix="no `accepted` receipt from an agent: is `iomt-agent run` connected to "
                    "the edge broker, and may the gateway read iomt/{site}/+/accepted (ACL)? "
                    "The rows are published again, the wait doubling per try")

    def _on_drained(self, row_id: int) -> Callable[[Verdict], None]:
        return lambda verdict: self._drained(row_id, verdict)

    def _drained(self, row_id: int, verdict: Verdict) -> None:
        """paho's thread: the broker's verdict on one spooled row."""
        if verdict.delivery is Delivery.DELIVERED:
            if self.accepted_timeout_s is None:
                self.spool.delivered(row_id)
            else:
                self._awaiting(row_id)
            with self._lock:
                self._in_flight.pop(row_id, None)
                self.counts.drained += 1
                more = self.spool.queued > 0
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
