"""Durability invariants against a real Mosquitto, each one a test that fails when it
breaks (docs/reliability.md): a refused PUBACK keeps the row; rows a previous run left are
sent by the next; with receipts a PUBACK alone deletes nothing and a reconnect sends the
unconfirmed rows again; the receiver does not ack what it could not write; PHI from the wire
never reaches the receiver's log."""

from __future__ import annotations

import json
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from agent.config import BrokerConfig
from agent.crypto import keys, seal
from agent.daemon.outbox import OutboxPublisher
from agent.daemon.store import Store
from agent.demo.sample_series import build_series, load_demo_slab
from agent.transport.mqtt import Connection, Message
from agent.transport.topics import Topic
from tests.bundles import make_scale_bundle
from tests.conftest import Mosquitto
from tests.integration.harness import cli, spawn

pytestmark = pytest.mark.integration

RESULTS = "iomt/s/d/results"


def _until(pred: Callable[[], bool], timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


class Publisher:
    """An OutboxPublisher on its own thread, as the daemon runs it."""

    def __init__(self, store: Store, url: str, receipt_timeout_s: float | None = None) -> None:
        self.kick, self.stop = threading.Event(), threading.Event()
        self.outbox: OutboxPublisher
        self.cloud = Connection(BrokerConfig(url=url), f"agent-{time.monotonic_ns()}",
                                name="cloud", on_connected=lambda: self.outbox.reconnected())
        self.outbox = OutboxPublisher(store, self.cloud, kick=self.kick, stop=self.stop,
                                      space=threading.Condition(),
                                      receipt_timeout_s=receipt_timeout_s)
        self.cloud.start()
        assert self.cloud.wait_connected(10)
        self.thread = threading.Thread(target=self.outbox.run, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.stop.set()
        self.outbox.drain_deadline = time.monotonic() + 0.5
        self.kick.set()
        self.thread.join(10)
        self.cloud.stop()


class Consumer:
    def __init__(self, url: str, client_id: str = "consumer") -> None:
        self.got: list[Message] = []
        self.conn = Connection(BrokerConfig(url=url), client_id, name="consumer",
                               subscriptions=(Topic("iomt/s/+/results", filter=True),),
                               on_message=self.got.append)
        self.conn.start()
        assert self.conn.wait_connected(10)
        time.sleep(0.2)  # the SUBSCRIBE lands

    def payloads(self) -> list[bytes]:
        return sorted(m.payload for m in self.got)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store(tmp_path / "agent.db", inbox_max_bytes=1 << 30, outbox_max_bytes=1 << 30)
    yield s
    s.close()


def _queue(store: Store, n: int, start: int = 0) -> None:
    for i in range(start, start + n):
        store.complete(None, [("result", f"m-{i}", RESULTS, b"sealed-%d" % i)], "processed")


@pytest.mark.parametrize("receipts", [None, 30.0], ids=["puback", "receipts"])
def test_a_refused_puback_deletes_nothing(
    store: Store, mosquitto_factory: Callable[..., Mosquitto], tmp_path: Path,
    receipts: float | None,
) -> None:
    """The broker's ACL refuses the results topic (MQTT 5 PUBACK 0x87): every row stays,
    and is tried again."""
    acl = tmp_path / "readonly.acl"
    acl.write_text("topic read #\n")  # anonymous clients may read, not write
    broker = mosquitto_factory("cloud", f"allow_anonymous true\nacl_file {acl}")
    _queue(store, 3)
    with capture_logs() as logs:
        pub = Publisher(store, broker.url, receipts)
        try:
            _until(lambda: sum(e["event"] == "cloud_refused_result" for e in logs) >= 6)
        finally:
            pub.close()
    assert store.depths()[1] == 3  # refused twice each, and kept
    assert {e["reason"] for e in logs if e["event"] == "cloud_refused_result"} == {
        "Not authorized"}


def test_rows_left_by_a_previous_run_are_sent_by_the_next(
    tmp_path: Path, mosquitto_factory: Callable[..., Mosquitto]
) -> None:
    broker = mosquitto_factory("cloud")
    first = Store(tmp_path / "agent.db", inbox_max_bytes=1 << 30, outbox_max_bytes=1 << 30)
    _queue(first, 4)
    first.close()  # the previous run stopped (or died) with four rows queued
    consumer = Consumer(broker.url)
    again = Store(tmp_path / "agent.db", inbox_max_bytes=1 << 30, outbox_max_bytes=1 << 30)
    pub = Publisher(again, broker.url)
    try:
        _until(lambda: again.depths()[1] == 0 and len(consumer.got) == 4)
    finally:
        pub.close()
        consumer.conn.stop()
        again.close()
    assert consumer.payloads() == [b"sealed-%d" % i for i in range(4)]


def test_with_receipts_a_puback_deletes_nothing_and_a_reconnect_resends(
    store: Store, mosquitto_factory: Callable[..., Mosquitto]
) -> None:
    """The broker took the rows (PUBACK 0) and a consumer got them, but only a receipt lets
    the outbox forget one; after a reconnect the unconfirmed ones go out again."""
    broker = mosquitto_factory("cloud")
    consumer = Consumer(broker.url)
    _queue(store, 3)
    pub = Publisher(store, broker.url, receipt_timeout_s=300.0)
    try:
        _until(lambda: len(consumer.got) == 3 and pub.outbox.awaiting_receipt == 3)
        assert store.depths()[1] == 3
        assert pub.outbox.unclaimed == 0  # awaiting a receipt is not "unclaimed"
        assert pub.outbox.on_receipt("m-1") == 1
        assert [r.message_id for r in store.outbox()] == ["m-0", "m-2"]
        pub.outbox.on_receipt_message(RESULTS, b'{"v": 1}')  # unreadable: ignored
        pub.outbox.reconnected()  # what the cloud connection's on_connected calls
        _until(lambda: len(consumer.got) == 5)
        assert sorted(m.payload for m in consumer.got[3:]) == [b"sealed-0", b"sealed-2"]
        pub.outbox.on_receipt_message(RESULTS, json.dumps({"v": 1, "message_id": "m-0"})
                                      .encode())
        pub.outbox.on_receipt("m-2")
        assert store.depths()[1] == 0 and pub.outbox.awaiting_receipt == 0
    finally:
        pub.close()
        consumer.conn.stop()


def _node(tmp: Path, cloud: Mosquitto) -> Path:
    r = cli("init", str(tmp / "node"), "--edge-url", cloud.url, "--cloud-url", cloud.url,
            "--site", "s", "--device-id", "d", "--bundle",
            str(make_scale_bundle(tmp / "bundle")))
    assert r.returncode == 0, r.stderr
    config = tmp / "node" / "agent.toml"
    config.write_text(config.read_text().replace('format = "auto"', 'format = "json"'))
    return config


def test_the_receiver_does_not_ack_a_result_it_could_not_write(
    tmp_path: Path, mosquitto_factory: Callable[..., Mosquitto]
) -> None:
    """``--out`` stops being writable after the start (a file where its directory was; a
    bad ``--out`` at start is refused before connecting): the result is not acked and not
    confirmed, so the broker hands it to the next run, which files it."""
    cloud = mosquitto_factory("cloud")
    config = _node(tmp_path, cloud)
    kdir = config.parent / "keys"
    envelope = seal.seal(build_series(load_demo_slab().t1[:1])[0],
                         recipient=keys.load_recipient_public_key(kdir / "cloud-recipient.pub"),
                         signing_key=keys.load_signing_key(kdir / "device-signing.key"),
                         device_id="d", message_id="m-1")
    receipts: list[Message] = []
    watcher = Connection(BrokerConfig(url=cloud.url), "watcher", name="watcher",
                         subscriptions=(Topic("iomt/s/+/receipts", filter=True),),
                         on_message=receipts.append)
    watcher.start()
    assert watcher.wait_connected(10)
    args = ["receive", "--config", str(config), "--timeout", "4", "--count", "1"]
    bad = spawn([*args, "--out", str(tmp_path / "blocker" / "out")], tmp_path / "bad.log")
    bad.wait_for('"mqtt_connected"')
    shutil.rmtree(tmp_path / "blocker")
    (tmp_path / "blocker").write_text("not a directory")
    time.sleep(0.3)
    pub = Connection(BrokerConfig(url=cloud.url), "device", name="cloud")
    pub.start()
    assert pub.wait_connected(10)
    pub.publish("iomt/s/d/results", envelope, qos=1)
    bad.wait_for('"cannot_write_result"')
    assert bad.proc.wait(30) == 1
    assert receipts == []  # nothing confirmed: the agent keeps the row
    good = spawn([*args, "--out", str(tmp_path / "out")], tmp_path / "good.log")
    assert good.proc.wait(30) == 0, good.text()
    pub.stop()
    assert len(list((tmp_path / "out").rglob("*.dcm"))) == 1
    _until(lambda: len(receipts) == 1, timeout=5)
    watcher.stop()
    assert json.loads(receipts[0].payload) == {"v": 1, "message_id": "m-1"}


def test_phi_from_the_wire_never_reaches_the_receivers_log(
    tmp_path: Path, mosquitto_factory: Callable[..., Mosquitto]
) -> None:
    """An error report is wire input, logged field by field by ``receive``: a person name
    that a broken or hostile sender put in it is scrubbed from the log line (the agent's
    log scrubber, end to end)."""
    cloud = mosquitto_factory("cloud")
    config = _node(tmp_path, cloud)
    receiver = spawn(["receive", "--config", str(config), "--out", str(tmp_path / "out"),
                      "--timeout", "20"], tmp_path / "receiver.log")
    receiver.wait_for('"mqtt_connected"')
    time.sleep(0.3)
    pub = Connection(BrokerConfig(url=cloud.url), "device", name="cloud")
    pub.start()
    assert pub.wait_connected(10)
    report = {"v": 1, "message_id": "e-1", "reason": "not_dicom",
              "detail": "rejected scan of DOEPHI^JANEPHI", "device_id": "d",
              "source_topic": "iomt/s/scans/gw", "payload_sha256": "0" * 64}
    pub.publish("iomt/s/d/errors", json.dumps(report).encode(), qos=1)
    receiver.wait_for('"error_report"')
    pub.stop()
    assert receiver.terminate() == 0
    text = receiver.text()
    assert "[redacted]" in text
    assert "DOEPHI" not in text and "JANEPHI" not in text


def test_the_receipt_wait_doubles_per_try_up_to_an_hour(store: Store) -> None:
    cloud = Connection(BrokerConfig(url="mqtt://127.0.0.1:1"), "unused", name="cloud")
    outbox = OutboxPublisher(store, cloud, kick=threading.Event(), stop=threading.Event(),
                             space=threading.Condition(), receipt_timeout_s=10.0)
    assert [outbox.receipt_delay(n) for n in (1, 2, 3, 4)] == [10.0, 20.0, 40.0, 80.0]
    assert outbox.receipt_delay(30) == 3600.0


def test_a_receipt_for_a_row_not_yet_sent_deletes_it(store: Store) -> None:
    cloud = Connection(BrokerConfig(url="mqtt://127.0.0.1:1"), "unused", name="cloud")
    outbox = OutboxPublisher(store, cloud, kick=threading.Event(), stop=threading.Event(),
                             space=threading.Condition(), receipt_timeout_s=10.0)
    _queue(store, 2)
    assert outbox.on_receipt("m-1") == 1 and outbox.on_receipt("m-1") == 0
    assert [r.message_id for r in store.outbox()] == ["m-0"]


def test_an_unclaimed_row_that_leaves_the_store_is_forgotten(
    store: Store, mosquitto_factory: Callable[..., Mosquitto]
) -> None:
    """A held row deleted meanwhile (a receipt that came another way) is dropped from the
    retry list at its next try, and the unclaimed episode ends."""
    broker = mosquitto_factory("cloud")
    _queue(store, 1)
    with capture_logs() as logs:
        pub = Publisher(store, broker.url, receipt_timeout_s=300.0)
        try:
            _until(lambda: pub.outbox.unclaimed == 1)
            store.receipted("m-0")
            _until(lambda: pub.outbox.unclaimed == 0, timeout=5)
        finally:
            pub.close()
    [claimed] = [e for e in logs if e["event"] == "results_claimed"]
    assert claimed["rows"] == 0
