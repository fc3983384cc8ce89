"""Ingest on a real SQLite inbox: store then ack, never wait on a full inbox, ack in order."""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import cast

import pytest

from agent.config import LimitsSection
from agent.daemon.ingest import QUEUE_MAX, Ingest, confirming_ack
from agent.daemon.store import Store
from agent.transport.mqtt import Connection, Message
from agent.transport.topics import Topics

TOPIC = "iomt/site-1/scans/gw"
SCAN = 400_000  # bytes: a 1 MiB inbox takes two


def _msg(mid: int, size: int = SCAN) -> Message:
    return Message(TOPIC, bytes([mid % 256]) * size, 1, mid, False, False)


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store(tmp_path / "agent.db", inbox_max_bytes=1 << 20, outbox_max_bytes=1 << 20)


def _ingest(store: Store, acked: list[int], limits: LimitsSection | None = None) -> Ingest:
    return Ingest(store, limits or LimitsSection(), Topics("site-1", "edge-1"),
                  ack=lambda m, _sha: acked.append(m.mid), stored=lambda: None)


def test_each_scan_is_stored_before_it_is_acked(store: Store) -> None:
    acked: list[int] = []
    seen: list[int] = []
    ingest = Ingest(store, LimitsSection(), Topics("site-1", "edge-1"),
                    ack=lambda m, _sha: (seen.append(len(store.pending(limit=10))),
                                         acked.append(m.mid)),
                    stored=lambda: None)
    ingest.on_message(_msg(1))
    ingest.on_message(_msg(2))
    assert acked == [1, 2] and seen == [1, 2]


def test_the_ack_gets_the_digest_the_inbox_row_holds(store: Store) -> None:
    """Hashed once: the ack (and the gateway's confirmation it publishes) gets the digest
    that the inbox row was stored under."""
    import hashlib

    digests: list[str] = []
    ingest = Ingest(store, LimitsSection(), Topics("site-1", "edge-1"),
                    ack=lambda _m, sha: digests.append(sha), stored=lambda: None)
    ingest.on_message(_msg(1))
    (row,) = store.pending()
    assert row.sha256 == hashlib.sha256(row.payload).hexdigest()
    assert digests == [row.sha256]


def test_the_inbox_row_is_committed_when_the_ack_goes_out(store: Store) -> None:
    """At the ack the row is on disk: a second connection (another process, or the next
    start after a crash right after the PUBACK) already sees it."""
    import sqlite3

    seen: list[int] = []

    def ack(msg: Message, _sha256: str) -> None:
        con = sqlite3.connect(store.path)
        try:
            seen.append(con.execute("SELECT COUNT(*) FROM inbox WHERE state='pending'")
                        .fetchone()[0])
        finally:
            con.close()

    ingest = Ingest(store, LimitsSection(), Topics("site-1", "edge-1"), ack=ack,
                    stored=lambda: None)
    ingest.on_message(_msg(1))
    ingest.on_message(_msg(2))
    assert seen == [1, 2]


def test_a_full_inbox_holds_messages_without_waiting_and_acks_them_in_order(
    store: Store,
) -> None:
    acked: list[int] = []
    ingest = _ingest(store, acked)
    start = time.monotonic()
    for mid in range(1, 7):
        ingest.on_message(_msg(mid))
    assert time.monotonic() - start < 1.0  # the network thread never waited
    assert acked == [1, 2] and ingest.held == 4
    # A small message that would fit still waits behind the held ones (PUBACK order).
    ingest.on_message(_msg(7, size=10))
    assert acked == [1, 2] and ingest.held == 5
    assert ingest.retry() == 5  # nothing freed yet

    for item in store.pending(limit=10):
        store.complete(item.id, [], "processed")
    assert ingest.retry() == 3 and acked == [1, 2, 3, 4]
    for item in store.pending(limit=10):
        store.complete(item.id, [], "processed")
    assert ingest.retry() == 0 and acked == [1, 2, 3, 4, 5, 6, 7]  # the small one fits too
    assert ingest.held == 0


def test_messages_arriving_while_held_ones_drain_keep_their_order(store: Store) -> None:
    acked: list[int] = []
    ingest = _ingest(store, acked)
    for mid in range(1, 5):
        ingest.on_message(_msg(mid))
    stop = threading.Event()

    def worker() -> None:  # the processing loop, freeing the inbox as it goes
        while not stop.is_set():
            for item in store.pending(limit=10):
                store.complete(item.id, [], "processed")
            ingest.retry()
            time.sleep(0.001)

    thread = threading.Thread(target=worker)
    thread.start()
    for mid in range(5, 41):  # the network thread meanwhile
        ingest.on_message(_msg(mid, size=SCAN // 4))
        time.sleep(0.0005)
    deadline = time.monotonic() + 10
    while (ingest.held or len(acked) < 40) and time.monotonic() < deadline:
        time.sleep(0.01)
    stop.set()
    thread.join()
    assert acked == list(range(1, 41))


def test_an_oversized_payload_is_reported_and_acked(store: Store) -> None:
    acked: list[int] = []
    ingest = _ingest(store, acked, LimitsSection(max_payload_bytes=1024))
    ingest.on_message(_msg(1, size=2048))
    assert acked == [1] and store.pending(limit=10) == []
    (row,) = store.outbox(limit=10)
    assert row.kind == "error" and b'"reason":"payload_too_large"' in row.payload


def test_a_payload_at_the_cap_is_stored_and_one_over_it_reported(store: Store) -> None:
    acked: list[int] = []
    ingest = _ingest(store, acked, LimitsSection(max_payload_bytes=1024))
    assert ingest.retry() == 0  # nothing held: nothing to do
    ingest.on_message(_msg(1, size=1024))
    assert [p.payload for p in store.pending(limit=10)] == [bytes([1]) * 1024]
    big = _msg(2, size=1025)
    ingest.on_message(big)
    assert acked == [1, 2]
    (row,) = store.outbox(limit=10)
    assert row.topic == "iomt/site-1/edge-1/errors"
    import hashlib
    import json

    body = json.loads(row.payload)
    assert body["device_id"] == "edge-1" and body["source_topic"] == TOPIC
    assert body["payload_sha256"] == hashlib.sha256(big.payload).hexdigest()
    assert body["detail"] == "1025 bytes exceeds limits.max_payload_bytes"
    assert store.counters() == {"failed": 1}


class RecordingEdge:
    """What ``confirming_ack`` uses of the edge ``Connection``: ``ack`` and ``publish``."""

    def __init__(self) -> None:
        self.calls: list[tuple[object, ...]] = []

    def ack(self, message: Message) -> None:
        self.calls.append(("ack", message.mid))

    def publish(self, topic: object, payload: bytes, *, qos: int = 0) -> int:
        self.calls.append(("publish", str(topic), payload, qos))
        return 1


def test_the_running_agent_s_ack_pubacks_then_confirms_the_digest(store: Store) -> None:
    """The PUBACK first, then ``{"v": 1, "sha256": ...}`` at QoS 1 on this device's accepted
    topic (what a confirming gateway waits for; docs/reliability.md)."""
    edge = RecordingEdge()
    topics = Topics("site-1", "edge-1")
    ingest = Ingest(store, LimitsSection(), topics,
                    ack=confirming_ack(cast(Connection, edge), topics), stored=lambda: None)
    msg = _msg(7, size=100)
    ingest.on_message(msg)
    digest = hashlib.sha256(msg.payload).hexdigest()
    assert edge.calls == [
        ("ack", 7),
        ("publish", "iomt/site-1/edge-1/accepted",
         json.dumps({"v": 1, "sha256": digest}).encode(), 1)]


def _wait(condition: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)


def test_on_the_ingest_thread_scans_that_queue_meanwhile_share_one_commit(
        store: Store) -> None:
    """Group commit: while the ``ingest`` thread writes (here: held in the first ack),
    arriving scans only queue; the next turn stores all of them in one transaction, then
    acks them in arrival order, each after its row is committed."""
    acked: list[int] = []
    commits: list[int] = []
    store._db.set_trace_callback(  # private: what reaches the disk is the point
        lambda sql: commits.append(1) if sql == "COMMIT" else None)
    first_ack = threading.Event()
    go_on = threading.Event()

    def ack(msg: Message, _sha256: str) -> None:
        if msg.mid == 1:
            first_ack.set()
            go_on.wait(10)
        assert msg.mid <= len(store.pending(limit=100))  # committed before its ack
        acked.append(msg.mid)

    ingest = Ingest(store, LimitsSection(), Topics("site-1", "edge-1"), ack=ack,
                    stored=lambda: None)
    ingest.start()
    try:
        ingest.on_message(_msg(1, size=1000))
        assert first_ack.wait(10)
        start = time.monotonic()
        for mid in range(2, 8):
            ingest.on_message(_msg(mid, size=1000))
        assert time.monotonic() - start < 1.0  # the network thread did not wait
        assert ingest.held == 6 and acked == []
        go_on.set()
        _wait(lambda: len(acked) == 7, "seven acks")
    finally:
        ingest.stop()
    assert acked == list(range(1, 8)) and ingest.held == 0
    assert len(commits) == 2  # one for the first scan, one for the six that queued


def test_on_the_ingest_thread_a_full_inbox_holds_until_retry_in_order(store: Store) -> None:
    acked: list[int] = []
    ingest = _ingest(store, acked)
    ingest.start()
    try:
        for mid in range(1, 7):
            ingest.on_message(_msg(mid))
        _wait(lambda: acked == [1, 2] and ingest.held == 4, "two stored, four held")
        ingest.on_message(_msg(7, size=10))  # fits, but waits behind the held ones
        assert ingest.retry() >= 4
        time.sleep(0.05)
        assert acked == [1, 2]
        for item in store.pending(limit=10):
            store.complete(item.id, [], "processed")
        ingest.retry()
        _wait(lambda: acked == [1, 2, 3, 4], "two more after room was made")
        for item in store.pending(limit=10):
            store.complete(item.id, [], "processed")
        ingest.retry()
        _wait(lambda: acked == list(range(1, 8)), "all seven")
    finally:
        ingest.stop()


def _gated(store: Store) -> tuple[Ingest, list[int], threading.Event, threading.Event]:
    """An ingest whose ack of each scan waits for ``go_on`` (``in_ack``: one is waiting)."""
    acked: list[int] = []
    in_ack, go_on = threading.Event(), threading.Event()

    def ack(msg: Message, _sha256: str) -> None:
        in_ack.set()
        go_on.wait(10)
        acked.append(msg.mid)

    ingest = Ingest(store, LimitsSection(), Topics("site-1", "edge-1"), ack=ack,
                    stored=lambda: None)
    return ingest, acked, in_ack, go_on


def test_stop_acks_the_batch_being_written_and_leaves_the_rest_unacked(store: Store) -> None:
    """What is queued at ``stop`` is neither stored nor acked: the edge broker still has it
    and sends it again to the next session."""
    ingest, acked, in_ack, go_on = _gated(store)
    ingest.start()
    ingest.on_message(_msg(1, size=100))
    assert in_ack.wait(10)
    ingest.on_message(_msg(2, size=100))
    stopper = threading.Thread(target=ingest.stop)
    stopper.start()
    _wait(lambda: not ingest.running, "stop asked")
    go_on.set()
    stopper.join(10)
    assert acked == [1] and len(store.pending()) == 1 and ingest.held == 1


def test_past_its_bound_the_queue_holds_paho_s_thread_until_the_writer_makes_room(
        store: Store) -> None:
    """A broker without flow control (Mosquitto with max_inflight_messages 0 and MQTT
    3.1.1) sends all it has: past ``QUEUE_MAX`` queued scans the network thread waits for
    the ``ingest`` thread, so TCP holds back the rest and memory stays bounded."""
    big = Store(store.path.with_name("big.db"), inbox_max_bytes=1 << 30,
                outbox_max_bytes=1 << 20)
    ingest, acked, in_ack, go_on = _gated(big)
    ingest.start()
    try:
        ingest.on_message(_msg(1, size=100))
        assert in_ack.wait(10)  # the writer is busy with the first; it left the queue
        for mid in range(2, QUEUE_MAX + 2):
            ingest.on_message(_msg(mid, size=100))  # up to the bound: no wait
        assert ingest.held == QUEUE_MAX
        extra = threading.Thread(target=ingest.on_message, args=(_msg(QUEUE_MAX + 2, 100),))
        extra.start()
        extra.join(0.3)
        assert extra.is_alive()  # waiting for room
        go_on.set()
        extra.join(10)
        assert not extra.is_alive()
        _wait(lambda: len(acked) == QUEUE_MAX + 2, "every scan acked")
    finally:
        go_on.set()
        ingest.stop()
        big.close()
    assert acked == list(range(1, QUEUE_MAX + 3))
