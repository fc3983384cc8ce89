"""agent.daemon.outbox.OutboxPublisher round by round, on a real store, with the broker's
answers scripted and the clock passed in: every verdict (delivered, unclaimed, refused) and
every second of the backoff is exact. What a real Mosquitto answers, and when, is in
tests/integration/test_outbox.py and tests/integration/test_durability.py."""

from __future__ import annotations

import threading
from collections.abc import Iterator, MutableMapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import pytest
from structlog.testing import capture_logs

from agent.daemon.outbox import (
    FIRST_RETRY_S,
    MAX_RETRY_S,
    RECEIPT_GRACE_ON_STOP_S,
    OutboxPublisher,
)
from agent.daemon.store import DiskFull, Store
from agent.transport.mqtt import Connection, Delivery, PublishDone, Verdict

A = "iomt/s/d/results"
B = "iomt/s/d/errors"
DELIVERED = Verdict(Delivery.DELIVERED, "Success")
UNCLAIMED = Verdict(Delivery.UNCLAIMED, "No matching subscribers")
REFUSED = Verdict(Delivery.REFUSED, "Not authorized")


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Sent:
    topic: str
    payload: bytes
    on_done: PublishDone


class ScriptedCloud:
    """What the outbox uses of ``agent.transport.mqtt.Connection``: ``connected`` and
    ``publish(..., qos=1, on_done=)``. The test answers each publish with a verdict."""

    def __init__(self) -> None:
        self.connected = True
        self.sent: list[Sent] = []
        self._answered: set[int] = set()

    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False,
                on_done: PublishDone | None = None) -> int:
        assert qos == 1 and not retain and on_done is not None
        self.sent.append(Sent(str(topic), payload, on_done))
        return len(self.sent)

    def answer(self, verdict: Verdict, n: int = 1, payload: bytes | None = None) -> None:
        """Answer the ``n`` oldest publishes not answered yet (of ``payload`` only, if
        given)."""
        todo = [i for i, s in enumerate(self.sent) if i not in self._answered
                and (payload is None or s.payload == payload)][:n]
        assert len(todo) == n, "fewer publishes waiting for an answer than that"
        for i in todo:
            self._answered.add(i)
            self.sent[i].on_done(verdict)

    def payloads(self, start: int = 0) -> list[bytes]:
        return [s.payload for s in self.sent[start:]]


class Rig:
    def __init__(self, store: Store, *, receipts: float | None = None, window: int = 32):
        self.store, self.clock, self.cloud = store, Clock(), ScriptedCloud()
        self.kick, self.stop = threading.Event(), threading.Event()
        self.space = threading.Condition()
        self.outbox = OutboxPublisher(
            store, cast(Connection, self.cloud), kick=self.kick, stop=self.stop,
            space=self.space, window=window, receipt_timeout_s=receipts, clock=self.clock)

    def queue(self, n: int, topic: str = A, start: int = 0, kind: str = "result") -> None:
        for i in range(start, start + n):
            self.store.complete(None, [(kind, f"m-{i}", topic, b"sealed-%d" % i)], "processed")

    def pump(self) -> bool:
        self.kick.clear()
        return self.outbox.pump()

    def later(self, seconds: float) -> None:
        self.clock.now += seconds

    def depth(self) -> int:
        return self.store.depths()[1]


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store(tmp_path / "agent.db", inbox_max_bytes=1 << 30, outbox_max_bytes=1 << 30)
    yield s
    s.close()


@pytest.fixture
def rig(store: Store) -> Rig:
    return Rig(store)


def _events(logs: Sequence[MutableMapping[str, Any]], name: str) -> list[MutableMapping[str, Any]]:
    return [e for e in logs if e["event"] == name]


def _notified(space: threading.Condition, action: Any) -> bool:
    """Whether ``action()`` notifies ``space`` (a waiter on another thread wakes)."""
    woke: list[bool] = []
    ready = threading.Event()

    def wait() -> None:
        with space:
            ready.set()
            woke.append(space.wait(0.5))

    t = threading.Thread(target=wait)
    t.start()
    ready.wait()
    with space:  # the waiter is inside wait() once it has released the lock
        pass
    action()
    t.join()
    return woke == [True]


def test_a_delivered_row_is_deleted_makes_room_and_kicks(rig: Rig) -> None:
    rig.queue(2)
    assert not rig.pump()
    assert [(s.topic, s.payload) for s in rig.cloud.sent] == [(A, b"sealed-0"), (A, b"sealed-1")]
    assert _notified(rig.space, lambda: rig.cloud.answer(DELIVERED))
    assert rig.kick.is_set()
    assert [r.message_id for r in rig.store.outbox()] == ["m-1"]
    rig.pump()
    assert len(rig.cloud.sent) == 2  # the one in flight is not sent again


def test_a_refused_row_is_kept_and_retried_after_1_2_4_s(rig: Rig) -> None:
    rig.queue(1)
    row_id = rig.store.outbox()[0].id
    rig.pump()
    with capture_logs() as logs:
        rig.cloud.answer(REFUSED)
    [refused] = _events(logs, "cloud_refused_result")
    assert refused["outbox_id"] == row_id and refused["reason"] == "Not authorized"
    assert refused["retry_in_s"] == FIRST_RETRY_S == 1.0
    assert refused["fix"] == "check the cloud broker's ACL for the results topic"
    assert rig.kick.is_set() and rig.depth() == 1 and rig.outbox.unclaimed == 0
    for n, delay in enumerate((1.0, 2.0, 4.0), start=1):
        rig.later(delay - 0.01)
        rig.pump()
        assert len(rig.cloud.sent) == n, "sent again before its delay"
        rig.later(0.01)
        rig.pump()
        assert len(rig.cloud.sent) == n + 1, f"not sent again after {delay} s"
        with capture_logs() as logs:
            rig.cloud.answer(REFUSED)
        assert _events(logs, "cloud_refused_result")[0]["retry_in_s"] == 2 * delay
    assert rig.depth() == 1


def test_the_retry_delay_stops_growing_at_30_s(rig: Rig) -> None:
    rig.queue(1)
    for _ in range(8):
        rig.pump()
        with capture_logs() as logs:
            rig.cloud.answer(REFUSED)
        rig.later(MAX_RETRY_S)
    assert _events(logs, "cloud_refused_result")[0]["retry_in_s"] == MAX_RETRY_S == 30.0
    rig.pump()
    assert len(rig.cloud.sent) == 9


def test_wait_s_sleeps_until_the_next_retry_between_50_ms_and_1_s(rig: Rig) -> None:
    assert rig.outbox.wait_s() == 1.0  # nothing held
    rig.queue(1)
    rig.pump()
    assert rig.outbox.wait_s() == 1.0  # in flight: nothing to wait for
    rig.cloud.answer(REFUSED)  # due in 1 s
    rig.later(0.7)
    assert rig.outbox.wait_s() == pytest.approx(0.3)
    rig.later(0.28)
    assert rig.outbox.wait_s() == 0.05
    rig.later(5)
    assert rig.outbox.wait_s() == 0.05
    rig.pump()  # in flight again: not counted
    assert rig.outbox.wait_s() == 1.0
    rig.cloud.answer(REFUSED)
    assert rig.outbox.wait_s() == 1.0  # due in 2 s: the thread still looks every second
    rig.later(0.5)
    rig.queue(1, start=1)
    rig.pump()
    rig.cloud.answer(REFUSED)  # the second row: due in 1 s, the first one in 1.5 s
    assert rig.outbox.wait_s() == 1.0
    rig.later(0.9)
    assert rig.outbox.wait_s() == pytest.approx(0.1)


def test_at_most_window_rows_are_in_flight_and_in_order(store: Store) -> None:
    rig = Rig(store, window=2)
    rig.queue(5)
    rig.pump()
    rig.pump()
    assert rig.cloud.payloads() == [b"sealed-0", b"sealed-1"]
    rig.cloud.answer(DELIVERED)
    rig.pump()
    assert rig.cloud.payloads() == [b"sealed-0", b"sealed-1", b"sealed-2"]
    rig.cloud.answer(REFUSED)  # sealed-1 held: a free slot goes to the next new row
    rig.pump()
    assert rig.cloud.payloads()[3:] == [b"sealed-3"]
    rig.later(1.0)  # sealed-1 due, but the window is full (2 and 3 in flight)
    rig.pump()
    assert len(rig.cloud.sent) == 4
    rig.cloud.answer(DELIVERED)  # sealed-2
    rig.pump()  # the due retry goes before the newest row
    assert rig.cloud.payloads()[4:] == [b"sealed-1"]
    rig.cloud.answer(DELIVERED, 2)
    rig.pump()
    assert rig.cloud.payloads()[5:] == [b"sealed-4"]
    rig.cloud.answer(DELIVERED)
    assert rig.depth() == 0


def test_retries_in_a_full_window_wait_in_id_order(store: Store) -> None:
    rig = Rig(store, window=1)
    rig.queue(3)
    for _ in range(3):
        rig.pump()
        rig.cloud.answer(REFUSED)
    rig.later(1.0)
    order = []
    for _ in range(3):
        rig.pump()
        order.append(rig.cloud.sent[-1].payload)
        rig.cloud.answer(DELIVERED)
    assert order == [b"sealed-0", b"sealed-1", b"sealed-2"]


def test_unclaimed_rows_wait_until_a_row_of_their_topic_is_delivered(rig: Rig) -> None:
    rig.queue(3)
    rig.pump()
    with capture_logs() as logs:
        rig.cloud.answer(UNCLAIMED, 3)
    [first] = _events(logs, "result_unclaimed")  # once for the episode, not per row
    assert (first["kind"], first["topic"], first["message_id"], first["reason"]) == (
        "result", A, "m-0", "No matching subscribers")
    assert first["fix"] == (
        "no consumer has subscribed to this topic on the cloud broker yet: start `iomt-agent "
        "receive` (its first start creates its persistent session); the agent keeps the rows "
        "and retries every 1 to 30 s")
    assert not _events(logs, "cloud_refused_result")
    assert rig.outbox.unclaimed == 3 and rig.depth() == 3 and rig.outbox.awaiting_receipt == 0
    rig.later(0.5)
    rig.queue(1, start=3)  # new rows still go out while the others wait
    rig.pump()
    assert rig.cloud.payloads(3) == [b"sealed-3"]
    rig.cloud.answer(DELIVERED)  # a consumer is there now: the waiting rows are due at once
    rig.pump()
    assert sorted(rig.cloud.payloads(4)) == [b"sealed-0", b"sealed-1", b"sealed-2"]
    rig.later(0.25)
    with capture_logs() as logs:
        rig.cloud.answer(DELIVERED, 2)
        assert not _events(logs, "results_claimed")  # one row still unclaimed
        rig.cloud.answer(DELIVERED)
    [claimed] = _events(logs, "results_claimed")
    assert claimed["rows"] == 3 and claimed["unclaimed_for_s"] == 0.8
    assert rig.outbox.unclaimed == 0 and rig.depth() == 0


def test_a_delivery_on_another_topic_does_not_release_unclaimed_rows(rig: Rig) -> None:
    rig.queue(1, topic=A)
    rig.pump()
    rig.cloud.answer(UNCLAIMED)
    rig.queue(1, topic=B, start=1, kind="error")
    rig.pump()
    rig.cloud.answer(DELIVERED)
    rig.pump()
    assert len(rig.cloud.sent) == 2  # the A row waits for its own 1 s
    rig.later(1.0)
    rig.pump()
    assert rig.cloud.payloads(2) == [b"sealed-0"]


def test_each_unclaimed_answer_needs_a_new_delivery_to_release_the_topic(rig: Rig) -> None:
    rig.queue(2)
    rig.pump()
    rig.cloud.answer(DELIVERED)  # the topic is claimed now
    rig.cloud.answer(UNCLAIMED)  # and unclaimed again (the consumer's session went)
    rig.queue(2, start=2)
    rig.pump()
    rig.cloud.answer(DELIVERED)  # claimed again: sealed-1 due now
    rig.pump()
    assert rig.cloud.payloads(4) == [b"sealed-1"]
    rig.cloud.answer(UNCLAIMED, payload=b"sealed-1")  # held again, due in 2 s
    rig.pump()
    assert len(rig.cloud.sent) == 5
    rig.cloud.answer(DELIVERED, payload=b"sealed-3")  # released again
    rig.pump()
    assert rig.cloud.payloads(5) == [b"sealed-1"]


def test_an_unclaimed_row_then_refused_ends_the_episode(rig: Rig) -> None:
    rig.queue(1)
    rig.pump()
    rig.cloud.answer(UNCLAIMED)
    rig.later(1.0)
    rig.pump()
    with capture_logs() as logs:
        rig.cloud.answer(REFUSED)
    [claimed] = _events(logs, "results_claimed")
    assert claimed["rows"] == 0 and claimed["unclaimed_for_s"] == 1.0
    assert rig.outbox.unclaimed == 0 and rig.depth() == 1
    rig.later(2.0)  # the second try's delay
    rig.pump()
    with capture_logs() as logs:
        rig.cloud.answer(UNCLAIMED)  # a new episode
    assert len(_events(logs, "result_unclaimed")) == 1


def test_a_refused_row_while_others_wait_does_not_end_the_episode(rig: Rig) -> None:
    rig.queue(2)
    rig.pump()
    rig.cloud.answer(UNCLAIMED, 2)
    rig.later(1.0)
    rig.pump()
    with capture_logs() as logs:
        rig.cloud.answer(REFUSED)
    assert not _events(logs, "results_claimed") and rig.outbox.unclaimed == 1


def test_a_held_row_that_left_the_store_is_forgotten(rig: Rig) -> None:
    rig.queue(2)
    rig.pump()
    rig.cloud.answer(UNCLAIMED, 2)
    rig.store.receipted("m-0")  # gone another way
    rig.later(0.5)
    with capture_logs() as logs:
        rig.store.receipted("m-1")
        rig.later(0.5)
        rig.pump()
    [claimed] = _events(logs, "results_claimed")
    assert claimed["rows"] == 0 and claimed["unclaimed_for_s"] == 1.0
    assert rig.outbox.unclaimed == 0 and rig.cloud.payloads(2) == []


def test_forgetting_one_of_two_unclaimed_rows_keeps_the_episode(rig: Rig) -> None:
    rig.queue(2)
    rig.pump()
    rig.cloud.answer(UNCLAIMED, 2)
    rig.store.receipted("m-0")
    rig.later(1.0)
    with capture_logs() as logs:
        rig.pump()
    assert not _events(logs, "results_claimed") and rig.outbox.unclaimed == 1
    assert rig.cloud.payloads(2) == [b"sealed-1"]


class FullOnDelete(Store):
    """A store whose disk fills up as the first PUBACK's delete commits."""

    fail = 1

    def delivered(self, outbox_id: int) -> None:
        if self.fail:
            self.fail -= 1
            raise DiskFull("database or disk is full")
        super().delivered(outbox_id)


def test_a_delivered_row_the_disk_cannot_delete_is_sent_again(tmp_path: Path) -> None:
    store = FullOnDelete(tmp_path / "agent.db", inbox_max_bytes=1 << 30,
                         outbox_max_bytes=1 << 30)
    rig = Rig(store)
    rig.queue(1)
    rig.pump()
    with capture_logs() as logs:
        rig.cloud.answer(DELIVERED)
    [kept] = _events(logs, "cloud_refused_result")
    assert kept["reason"] == "delivered, but the disk is full" and rig.depth() == 1
    rig.later(1.0)
    rig.pump()
    rig.cloud.answer(DELIVERED)
    assert rig.depth() == 0
    store.close()


def test_with_receipts_a_delivered_row_waits_and_an_overdue_one_goes_again(
    store: Store,
) -> None:
    rig = Rig(store, receipts=10.0)
    rig.queue(2)
    rig.pump()
    assert not _notified(rig.space, lambda: rig.cloud.answer(DELIVERED, 2))
    assert rig.kick.is_set()
    assert rig.outbox.awaiting_receipt == 2 and rig.outbox.unclaimed == 0 and rig.depth() == 2
    rig.later(9.99)
    rig.pump()
    assert len(rig.cloud.sent) == 2
    rig.later(0.01)
    with capture_logs() as logs:
        rig.pump()
    [overdue] = _events(logs, "receipt_overdue")
    assert overdue["rows"] == 2 and overdue["fix"] == (
        "is `iomt-agent receive` running, and may it publish on the receipts topic (the cloud "
        "broker's ACL)? The rows go out again; the consumer drops duplicates")
    assert rig.cloud.payloads(2) == [b"sealed-0", b"sealed-1"]
    rig.cloud.answer(DELIVERED, 2)  # second try: the wait doubles
    rig.later(19.99)
    rig.pump()
    assert len(rig.cloud.sent) == 4
    assert _notified(rig.space, lambda: rig.outbox.on_receipt("m-0") == 1)
    assert rig.outbox.awaiting_receipt == 1
    rig.later(0.01)
    rig.pump()
    assert rig.cloud.payloads(4) == [b"sealed-1"]


def test_after_a_reconnect_awaiting_rows_go_again_without_an_overdue_warning(
    store: Store,
) -> None:
    rig = Rig(store, receipts=300.0)
    rig.queue(3)
    rig.pump()
    rig.cloud.answer(DELIVERED, 2)  # the third is still in flight
    with capture_logs() as logs:
        rig.outbox.reconnected()
        rig.pump()
    [resent] = _events(logs, "results_resent_after_reconnect")
    assert resent["rows"] == 2
    assert resent["note"] == "not yet confirmed by the consumer; it drops the duplicates"
    assert not _events(logs, "receipt_overdue") and rig.kick.is_set() is False
    assert rig.cloud.payloads(3) == [b"sealed-0", b"sealed-1"]
    rig.cloud.answer(DELIVERED, 3)
    rig.later(300.0)  # the reconnect's try counted: now overdue after 300 s for sealed-2,
    with capture_logs() as logs:  # 600 s for the others
        rig.pump()
    assert _events(logs, "receipt_overdue")[0]["rows"] == 1
    assert rig.cloud.payloads(5) == [b"sealed-2"]


def test_a_reconnect_with_nothing_awaiting_logs_nothing_but_kicks(store: Store) -> None:
    rig = Rig(store, receipts=300.0)
    with capture_logs() as logs:
        rig.outbox.reconnected()
    assert logs == [] and rig.kick.is_set()


def test_a_receipt_that_beats_its_puback_leaves_nothing_waiting(store: Store) -> None:
    rig = Rig(store, receipts=10.0)
    rig.queue(2)
    rig.pump()
    assert rig.outbox.on_receipt("m-0") == 1 and rig.kick.is_set()
    rig.cloud.answer(DELIVERED, 2)
    assert rig.outbox.awaiting_receipt == 1 and rig.depth() == 1
    rig.later(10.0)
    rig.pump()
    assert rig.cloud.payloads(2) == [b"sealed-1"]
    rig.cloud.answer(DELIVERED)
    assert rig.outbox.on_receipt("m-1") == 1 and rig.outbox.awaiting_receipt == 0


def test_a_receipt_for_an_unknown_message_changes_nothing(store: Store) -> None:
    rig = Rig(store, receipts=10.0)
    rig.queue(1)
    assert not _notified(rig.space, lambda: rig.outbox.on_receipt("m-9"))
    assert not rig.kick.is_set() and rig.depth() == 1


class FullOnReceipt(Store):
    def receipted(self, message_id: str) -> list[int]:
        raise DiskFull("database or disk is full")


def test_a_receipt_the_disk_cannot_apply_is_logged_and_kept(tmp_path: Path) -> None:
    store = FullOnReceipt(tmp_path / "agent.db", inbox_max_bytes=1 << 30,
                          outbox_max_bytes=1 << 30)
    rig = Rig(store, receipts=10.0)
    rig.queue(1)
    with capture_logs() as logs:
        assert rig.outbox.on_receipt("m-0") == 0
    [event] = _events(logs, "receipt_not_applied")
    assert event["message_id"] == "m-0" and event["reason"] == "disk full"
    assert rig.depth() == 1
    store.close()


@pytest.mark.parametrize("payload", [b"not json", b'{"v": 1}', b'{"message_id": 7}',
                                     b"\xff\xfe", b"[1]"])
def test_an_unreadable_receipt_is_logged_and_ignored(store: Store, payload: bytes) -> None:
    rig = Rig(store, receipts=10.0)
    rig.queue(1)
    with capture_logs() as logs:
        rig.outbox.on_receipt_message("iomt/s/d/receipts", payload)
    [event] = _events(logs, "receipt_unreadable")
    assert event["topic"] == "iomt/s/d/receipts" and event["bytes"] == len(payload)
    assert event["fix"] == 'a receipt is JSON {"v": 1, "message_id": "..."}'
    assert rig.depth() == 1


def test_a_readable_receipt_deletes_its_rows(store: Store) -> None:
    rig = Rig(store, receipts=10.0)
    rig.queue(2)
    with capture_logs() as logs:
        rig.outbox.on_receipt_message("iomt/s/d/receipts", b'{"v": 1, "message_id": "m-1"}')
    assert logs == [] and [r.message_id for r in store.outbox()] == ["m-0"]


def test_stopped_with_an_empty_outbox_is_done(rig: Rig) -> None:
    rig.stop.set()
    assert rig.pump()


def test_stopped_with_rows_in_flight_waits_for_their_verdicts(rig: Rig) -> None:
    rig.queue(2)
    rig.stop.set()
    assert not rig.pump()
    rig.cloud.answer(DELIVERED)
    assert not rig.pump()
    rig.cloud.answer(DELIVERED)
    assert rig.pump()


def test_stopped_with_rows_that_wait_for_a_retry_keeps_going(rig: Rig) -> None:
    rig.queue(1)
    rig.pump()
    rig.cloud.answer(REFUSED)
    rig.stop.set()
    assert not rig.pump()
    rig.later(1.0)
    assert not rig.pump()
    rig.cloud.answer(DELIVERED)
    assert rig.pump()


def test_stopped_with_only_unclaimed_rows_keeps_them_for_the_next_start(rig: Rig) -> None:
    rig.queue(2)
    rig.pump()
    rig.cloud.answer(UNCLAIMED)
    rig.stop.set()
    assert not rig.pump()  # one still in flight
    rig.cloud.answer(UNCLAIMED)
    assert rig.pump() and rig.depth() == 2


def test_stopped_with_awaiting_receipts_waits_a_grace_for_them(store: Store) -> None:
    rig = Rig(store, receipts=300.0)
    rig.queue(2)
    rig.pump()
    rig.cloud.answer(DELIVERED, 2)
    rig.stop.set()
    assert not rig.pump()  # the grace starts
    rig.later(RECEIPT_GRACE_ON_STOP_S)
    assert not rig.pump()
    rig.later(0.01)
    assert rig.pump() and rig.depth() == 2


def test_stopped_with_awaiting_and_unclaimed_rows_waits_the_grace_too(store: Store) -> None:
    rig = Rig(store, receipts=300.0)
    rig.queue(2)
    rig.pump()
    rig.cloud.answer(DELIVERED)
    rig.cloud.answer(UNCLAIMED)
    rig.stop.set()
    assert not rig.pump()
    rig.later(RECEIPT_GRACE_ON_STOP_S + 0.01)
    assert not rig.pump()  # the unclaimed row was due again: in flight
    rig.cloud.answer(UNCLAIMED)
    assert rig.pump()


def test_a_receipt_during_the_grace_ends_it_early(store: Store) -> None:
    rig = Rig(store, receipts=300.0)
    rig.queue(1)
    rig.pump()
    rig.cloud.answer(DELIVERED)
    rig.stop.set()
    assert not rig.pump()
    rig.outbox.on_receipt("m-0")
    assert rig.pump()


def test_stopped_past_the_drain_deadline_is_done_with_rows_left(rig: Rig) -> None:
    rig.queue(2)
    rig.pump()
    rig.stop.set()
    rig.outbox.drain_deadline = rig.clock.now + 5
    assert not rig.pump()
    rig.later(5.0)
    assert not rig.pump()
    rig.later(0.01)
    assert rig.pump() and rig.depth() == 2


def test_not_stopped_is_never_done(rig: Rig) -> None:
    rig.outbox.drain_deadline = rig.clock.now - 1
    assert not rig.pump()
    rig.cloud.connected = False
    assert not rig.pump()


def test_disconnected_sends_nothing_and_is_done_only_past_the_deadline(rig: Rig) -> None:
    rig.queue(1)
    rig.cloud.connected = False
    assert not rig.pump() and rig.cloud.sent == []
    rig.stop.set()
    rig.outbox.drain_deadline = rig.clock.now + 1
    assert not rig.pump()
    rig.later(1.0)
    assert not rig.pump()
    rig.later(0.01)
    assert rig.pump()
    rig.cloud.connected = True
    rig.outbox.drain_deadline = float("inf")
    assert not rig.pump() and len(rig.cloud.sent) == 1


def test_disconnected_with_an_empty_outbox_stops_without_waiting_the_deadline(
        rig: Rig) -> None:
    rig.cloud.connected = False
    rig.stop.set()
    rig.outbox.drain_deadline = rig.clock.now + 10
    assert rig.pump()


def test_a_cloud_down_long_before_the_stop_is_not_waited_for(rig: Rig) -> None:
    """Down for 10 s already: the 10 s drain would only delay the stop (the rows stay for
    the next start)."""
    rig.queue(1)
    rig.cloud.connected = False
    assert not rig.pump()  # it is down from here
    rig.later(10.0)
    rig.stop.set()
    rig.outbox.drain_deadline = rig.clock.now + 10
    assert rig.pump() and rig.depth() == 1


def test_run_returns_once_stopped_and_drained(rig: Rig) -> None:
    rig.queue(1)
    rig.stop.set()
    thread = threading.Thread(target=rig.outbox.run, daemon=True)
    thread.start()
    for _ in range(200):
        if rig.cloud.sent:
            break
        threading.Event().wait(0.01)
    assert thread.is_alive()
    rig.cloud.answer(DELIVERED)  # kicks the thread, which finds nothing left
    thread.join(5)
    assert not thread.is_alive() and rig.depth() == 0
