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

In the running daemon ``on_message`` only queues the message: the ``ingest`` thread stores
what has queued while it wrote the last batch in one transaction, so one fsync serves them
all (group commit; up to ``MAX_BATCH``), and then acks each in order. On a disk whose sync
takes milliseconds (an SD card, eMMC) that keeps ingest from being the slowest stage.
"""

from __future__ import annotations

import hashlib
import itertools
import threading
from collections import deque
from collections.abc import Callable

from agent.config import LimitsSection
from agent.daemon.pipeline import error_report
from agent.daemon.pressure import Pressure
from agent.daemon.store import DiskFull, Store, StoreFull
from agent.log import get_logger
from agent.thread_names import name_thread
from agent.transport.mqtt import Connection, Message
from agent.transport.scan_receipts import accepted_body_for
from agent.transport.topics import Topics

log = get_logger("agent.daemon.ingest")

RECEIVE_MAXIMUM = 16  # unacked scans the edge broker may send us (MQTT 5 CONNECT)
MAX_BATCH = RECEIVE_MAXIMUM  # scans stored per transaction at most
QUEUE_MAX = 2 * MAX_BATCH  # queued scans past which paho's thread waits for the writer ...
QUEUE_MAX_BYTES = 32 << 20  # ... or queued bytes


class Ingest:
    """The edge connection's message handler. ``ack(message, sha256)`` acknowledges a
    message to the broker (``sha256``: its payload's hex digest, hashed once here);
    ``stored`` runs after scans are in the inbox (it wakes the main loop).

    Until ``start``, each message is stored (or held) on the calling thread before
    ``on_message`` returns. After it, ``on_message`` only queues the message and the
    ``ingest`` thread stores what has queued meanwhile in one transaction (one fsync for
    all of them: group commit), then acks them in order; ``stop`` ends it."""

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
        self._queue: deque[Message] = deque()  # received, not yet stored: in arrival order
        self._blocked = False  # the head was refused: wait for ``retry``
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)  # for the ingest thread: work
        self._room = threading.Condition(self._lock)  # for paho's thread: the queue shrank
        self._queued_bytes = 0
        self._draining = threading.Lock()  # one drainer at a time, so acks stay in order
        self._refused = False  # the drainer's: a refusal not yet followed by an empty queue
        self._thread: threading.Thread | None = None
        self._stopping = False

    @property
    def held(self) -> int:
        """Messages received but not yet stored (the inbox was full, or being written)."""
        with self._lock:
            return len(self._queue)

    @property
    def running(self) -> bool:
        """Whether the ``ingest`` thread stores (started, and not asked to stop)."""
        with self._lock:
            return self._thread is not None and not self._stopping

    def on_message(self, msg: Message) -> None:
        """paho's network thread: queue the message; store and ack it here unless the
        ``ingest`` thread runs (or hold it: never waits for room)."""
        with self._lock:
            self._queue.append(msg)  # behind the ones already waiting: PUBACK order
            self._queued_bytes += len(msg.payload)
            if self._thread is not None:
                self._wake.notify()
                # A broker without flow control (no receive maximum, Mosquitto's
                # max_inflight_messages 0) would fill memory: past the bound this thread
                # waits for the writer, so TCP holds back the rest, as when it wrote itself.
                # Never while the inbox refuses: then the broker's window is the bound.
                while self._over_bound() and not self._blocked and not self._stopping:
                    self._room.wait(1.0)
                return
            if self._blocked:
                return
        self._drain()

    def _over_bound(self) -> bool:
        """More queued than paho's thread may add to without waiting (``_lock`` held)."""
        n = len(self._queue)
        return n > QUEUE_MAX or (n > 1 and self._queued_bytes > QUEUE_MAX_BYTES)

    def retry(self) -> int:
        """Store and ack held messages in order while the inbox takes them (on the
        ``ingest`` thread once started). Returns how many are still held."""
        with self._lock:
            self._blocked = False
            if self._thread is not None:
                self._wake.notify()
                return len(self._queue)
        return self._drain()

    def start(self) -> None:
        """Store on the ``ingest`` thread from now on (group commit)."""
        with self._lock:
            if self._thread is not None:
                return
            self._stopping = False
            self._thread = threading.Thread(target=self._run, name="ingest", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """End the ``ingest`` thread after the batch it is writing (acked too); what is still
        queued stays unacked with the edge broker, which sends it again. Nothing more is
        stored after it."""
        with self._lock:
            thread, self._stopping = self._thread, True
            self._wake.notify()
            self._room.notify_all()
        if thread is not None:
            thread.join(timeout)
        with self._lock:
            self._thread = None

    def _run(self) -> None:
        name_thread("ingest")
        while True:
            with self._lock:
                while not self._stopping and (self._blocked or not self._queue):
                    self._wake.wait()
                if self._stopping:
                    return
            self._drain()

    def _drain(self) -> int:
        """Store and ack queued messages, a batch per transaction, until the queue is empty
        or the inbox refuses one. Returns how many are still queued."""
        with self._draining:
            while True:
                with self._lock:
                    if self._blocked or not self._queue or self._stopping:
                        return len(self._queue)
                    batch = list(itertools.islice(self._queue, MAX_BATCH))
                done, refused = self._write(batch)
                with self._lock:
                    for _ in done:
                        self._queued_bytes -= len(self._queue.popleft().payload)
                    held = len(self._queue)
                    self._blocked = refused is not None
                    self._room.notify_all()
                for msg, digest in done:
                    self._ack(msg, digest)
                if done:
                    self._stored()
                if refused is not None:
                    cause = self._cause(refused)
                    self._pressure.set("ingest", cause)
                    if not self._refused:  # once, not at every retry
                        log.warning(cause, detail=str(refused), held=held, fix="scans wait "
                                    "unacked with the edge broker until there is room")
                    self._refused = True
                    return held
                if self._refused and not held:
                    self._refused = False
                    self._pressure.clear("ingest")
                    log.info("inbox_accepting", note="held scans stored and acked")

    @staticmethod
    def _cause(exc: StoreFull) -> str:
        if isinstance(exc, DiskFull):
            return "disk_full"
        return "outbox_full" if isinstance(exc, _OutboxFull) else "inbox_full"

    def _write(self, batch: list[Message]) -> tuple[list[tuple[Message, str]], StoreFull | None]:
        """Store a prefix of ``batch``: its scans in one transaction (an oversized payload's
        error report in one of its own). Returns the stored messages with their digests,
        and why the next one was not stored (None: all were)."""
        digests = [hashlib.sha256(m.payload).hexdigest() for m in batch]
        cap = self._limits.max_payload_bytes
        n = next((i for i, m in enumerate(batch) if len(m.payload) > cap), len(batch))
        if n == 0:  # an oversized payload: reported, so it is acked like a stored one
            msg, digest = batch[0], digests[0]
            mid, body = error_report(
                device_id=self._topics.device, reason="payload_too_large",
                detail=f"{len(msg.payload)} bytes exceeds limits.max_payload_bytes",
                payload_sha256=digest, source_topic=msg.topic)
            # An error row goes to the outbox; it is small and never refused for the cap.
            try:
                self._store.complete(None, [("error", mid, str(self._topics.errors), body)],
                                     "failed")
            except StoreFull as exc:
                return [], exc
            return [(msg, digest)], None
        if self._outbox_backpressure and self._store.outbox_full():
            return [], _OutboxFull("the outbox is at limits.outbox_max_bytes")
        ids, refused = self._store.accept_many(
            [(m.topic, d, m.payload) for m, d in zip(batch[:n], digests[:n], strict=True)])
        return list(zip(batch[:len(ids)], digests[:len(ids)], strict=True)), refused


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
