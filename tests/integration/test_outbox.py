"""agent.daemon.outbox.OutboxPublisher on a real store and a real Mosquitto: rows that no
subscriber takes are kept and retried, not deleted; a consumer's first start claims them."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from agent.config import BrokerConfig
from agent.daemon.outbox import MAX_RETRY_S, OutboxPublisher, retry_delay
from agent.daemon.store import Store
from agent.transport.mqtt import Connection, Message
from agent.transport.topics import Topic
from tests.conftest import Mosquitto

pytestmark = pytest.mark.integration

RESULTS = "iomt/s/d/results"


class Running:
    """A publisher on its own thread, as the daemon runs it."""

    def __init__(self, store: Store, url: str, protocol: str = "5") -> None:
        self.cloud = Connection(BrokerConfig(url=url, protocol=protocol), f"agent-{protocol}",
                                name="cloud")
        self.kick, self.stop = threading.Event(), threading.Event()
        self.outbox = OutboxPublisher(store, self.cloud, kick=self.kick, stop=self.stop,
                                      space=threading.Condition())
        self.cloud.start()
        assert self.cloud.wait_connected(10)
        self.thread = threading.Thread(target=self.outbox.run, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.stop.set()
        self.outbox.drain_deadline = time.monotonic() + 5
        self.kick.set()
        self.thread.join(10)
        self.cloud.stop()


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store(tmp_path / "agent.db", inbox_max_bytes=1 << 30, outbox_max_bytes=1 << 30)
    yield s
    s.close()


def _queue(store: Store, n: int, start: int = 0) -> None:
    for i in range(start, start + n):
        store.complete(None, [("result", f"m-{i}", RESULTS, b"sealed-%d" % i)], "processed")


def _until(pred: Callable[[], bool], timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_retry_delay_doubles_up_to_the_cap() -> None:
    assert [retry_delay(n) for n in (1, 2, 3, 4)] == [1.0, 2.0, 4.0, 8.0]
    assert retry_delay(50) == MAX_RETRY_S == 30.0


def test_unclaimed_rows_are_kept_until_a_consumer_subscribes(
    store: Store, mosquitto_factory: Callable[[str], Mosquitto]
) -> None:
    broker = mosquitto_factory("cloud")
    _queue(store, 5)
    with capture_logs() as logs:
        running = Running(store, broker.url)
        try:
            _until(lambda: running.outbox.unclaimed == 5)
            assert store.depths()[1] == 5  # nothing deleted
            time.sleep(1.5)  # retried at least once: still kept
            assert store.depths()[1] == 5
            _queue(store, 2, start=5)  # new rows are not held up by the waiting ones
            running.kick.set()
            _until(lambda: running.outbox.unclaimed == 7)
            got: list[Message] = []
            consumer = Connection(BrokerConfig(url=broker.url), "consumer", name="consumer",
                                  subscriptions=(Topic("iomt/s/+/results", filter=True),),
                                  on_message=got.append)
            consumer.start()
            assert consumer.wait_connected(10)
            _until(lambda: store.depths()[1] == 0, timeout=MAX_RETRY_S + 10)
            _until(lambda: len(got) >= 7)
            time.sleep(0.5)  # nothing more comes: each row went out once it was claimed
            assert sorted(m.payload for m in got) == sorted(b"sealed-%d" % i for i in range(7))
            assert running.outbox.unclaimed == 0
            consumer.stop()
        finally:
            running.close()
    events = [e["event"] for e in logs if e["event"] in ("result_unclaimed", "results_claimed")]
    assert events == ["result_unclaimed", "results_claimed"]  # once each, not per row
    [claimed] = [e for e in logs if e["event"] == "results_claimed"]
    assert claimed["rows"] == 7


def test_a_stop_does_not_wait_for_a_consumer_and_keeps_the_rows(
    store: Store, mosquitto_factory: Callable[[str], Mosquitto]
) -> None:
    broker = mosquitto_factory("cloud")
    _queue(store, 3)
    running = Running(store, broker.url)
    _until(lambda: running.outbox.unclaimed == 3)
    t = time.monotonic()
    running.close()
    assert time.monotonic() - t < 2
    assert not running.thread.is_alive()
    assert store.depths()[1] == 3


def test_mqtt_311_cannot_tell_and_deletes_on_the_puback(
    store: Store, mosquitto_factory: Callable[[str], Mosquitto]
) -> None:
    """The documented limit: a 3.1.1 PUBACK carries no reason code."""
    broker = mosquitto_factory("cloud")
    _queue(store, 2)
    running = Running(store, broker.url, protocol="3.1.1")
    try:
        _until(lambda: store.depths()[1] == 0)
        assert running.outbox.unclaimed == 0
    finally:
        running.close()
