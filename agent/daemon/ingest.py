"""Scans from the edge broker into the inbox, acked only once they are durable.

``on_message`` runs on paho's network thread, which also answers keepalives, so it never
waits. A payload over ``limits.max_payload_bytes`` is reported on the error topic and acked.
When the inbox is at its byte cap the message is not acked: it is held in memory, with every
later one behind it (PUBACKs go out in the order the PUBLISHes came in), and the broker,
which gives a client only so many unacked messages (``RECEIVE_MAXIMUM`` on MQTT 5,
Mosquitto's ``max_inflight_messages`` on 3.1.1), stops sending. The daemon's main loop calls
``retry`` whenever space may have been freed: held messages are stored and acked in order.
The same holds while the outbox is at its cap (``storage.outbox_full = "backpressure"``, the
default) and while the disk is below ``storage.min_free_disk_bytes`` (``DiskFull``): the
cause goes to ``Pressure``, which the retained status shows.
A held message is never lost: if the agent stops first, the broker still has it unacked and
delivers it again to the persistent session.
"""

from __future__ import annotations

import hashlib
import threading
from collections import deque
from collections.abc import Callable

from agent.config import LimitsSection
from agent.daemon.pipeline import error_report
from agent.daemon.pressure import Pressure
from agent.daemon.store import DiskFull, Store, StoreFull
from agent.log import get_logger
from agent.transport.mqtt import Connection, Message
from agent.transport.scan_receipts import accepted_body_for
from agent.transport.topics import Topics

log = get_logger("agent.daemon.ingest")

RECEIVE_MAXIMUM = 16  # unacked scans the edge broker may send us (MQTT 5 CONNECT)


class Ingest:
    """The edge connection's message handler. ``ack(message, sha256)`` acknowledges a
    message to the broker (``sha256``: its payload's hex digest, hashed once here);
    ``stored`` runs after each scan is in the inbox (it wakes the main loop)."""

    def __init__(self, store: Store, limits: LimitsSection, topics: Topics, *,
                 ack: Callable[[Message, str], None], stored: Callable[[], None],
                 pressure: Pressure | None = None, outbox_backpressure: bool = False) -> None:
        self._store = store
        self._limits = limits
        self._topics = topics
        self._ack = ack
        self._stored = stored
        self._pressure = pressure or Pressure()
        self._outbox_backpressure = outbox_backpressure  # hold scans while the outbox is full
        self._held: deque[Message] = deque()
        self._lock = threading.Lock()

    @property
    def held(self) -> int:
        """Messages received but not yet stored (the inbox was full)."""
        with self._lock:
            return len(self._held)

    def on_message(self, msg: Message) -> None:
        """paho's network thread: store and ack, or hold; never waits."""
        with self._lock:
            if self._held:  # keep the order: behind the ones already waiting
                self._held.append(msg)
                return
        try:
            self._store_and_ack(msg)
        except StoreFull as exc:
            with self._lock:
                self._held.append(msg)
            cause = self._cause(exc)
            self._pressure.set("ingest", cause)
            log.warning(cause, detail=str(exc), held=1,
                        fix="scans wait unacked with the edge broker until there is room")

    def retry(self) -> int:
        """Store and ack held messages in order while the inbox takes them. Returns how
        many are still held."""
        while True:
            with self._lock:
                if not self._held:
                    return 0
                msg = self._held[0]  # stays visible until acked: on_message queues behind it
            try:
                self._store_and_ack(msg)
            except StoreFull as exc:
                self._pressure.set("ingest", self._cause(exc))
                return self.held
            with self._lock:
                self._held.popleft()
                empty = not self._held
            if empty:
                self._pressure.clear("ingest")
                log.info("inbox_accepting", note="held scans stored and acked")

    @staticmethod
    def _cause(exc: StoreFull) -> str:
        if isinstance(exc, DiskFull):
            return "disk_full"
        return "outbox_full" if isinstance(exc, _OutboxFull) else "inbox_full"

    def _store_and_ack(self, msg: Message) -> None:
        digest = hashlib.sha256(msg.payload).hexdigest()
        if len(msg.payload) > self._limits.max_payload_bytes:
            mid, body = error_report(
                device_id=self._topics.device, reason="payload_too_large",
                detail=f"{len(msg.payload)} bytes exceeds limits.max_payload_bytes",
                payload_sha256=digest, source_topic=msg.topic)
            # An error row goes to the outbox; it is small and never refused for the cap.
            self._store.complete(None, [("error", mid, str(self._topics.errors), body)],
                                 "failed")
        else:
            if self._outbox_backpressure and self._store.outbox_full():
                raise _OutboxFull("the outbox is at limits.outbox_max_bytes")
            self._store.accept(msg.topic, digest, msg.payload)  # raises StoreFull
        self._ack(msg, digest)
        self._stored()


class _OutboxFull(StoreFull):
    """Not stored: the outbox is at its cap and the policy is backpressure."""


def confirming_ack(edge: Connection, topics: Topics) -> Callable[[Message, str], None]:
    """The ``ack`` of a running agent: PUBACK a scan that is durable in the inbox, and
    publish ``{"v": 1, "sha256": ...}`` on ``topics.accepted`` for the gateway (one that
    resends until it sees this survives an edge broker that acked and then crashed;
    docs/reliability.md)."""
    def ack(msg: Message, sha256: str) -> None:
        edge.ack(msg)
        edge.publish(topics.accepted, accepted_body_for(sha256), qos=1)

    return ack
