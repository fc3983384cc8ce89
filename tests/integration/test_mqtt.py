"""agent.transport.mqtt.Connection against a real Mosquitto: protocols, persistent sessions with
manual ack, publish completion, concurrency and the last will."""

from __future__ import annotations

import itertools
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from agent.config import BrokerConfig
from agent.transport.mqtt import Connection, Delivery, Message, Verdict, Will
from agent.transport.topics import Topic
from tests.conftest import Mosquitto

pytestmark = pytest.mark.integration

PROTOCOLS = ("5", "3.1.1")
_ids = itertools.count()


def _cid(prefix: str) -> str:
    return f"{prefix}-{next(_ids)}"


class Inbox:
    """Collects received messages; waits for them without fixed sleeps."""

    def __init__(self) -> None:
        self.messages: list[Message] = []
        self._cond = threading.Condition()

    def __call__(self, msg: Message) -> None:
        with self._cond:
            self.messages.append(msg)
            self._cond.notify_all()

    def wait_for(self, pred: Callable[[list[Message]], bool], timeout: float = 10) -> None:
        with self._cond:
            if not self._cond.wait_for(lambda: pred(self.messages), timeout):
                got = [(m.topic, m.payload[:40]) for m in self.messages]
                raise AssertionError(f"timed out; received {got}")

    def topics(self) -> list[str]:
        with self._cond:
            return [m.topic for m in self.messages]

    def first(self, topic: str) -> Message:
        with self._cond:
            return next(m for m in self.messages if m.topic == topic)


class Done:
    """A publish on_done callback that records its verdicts."""

    def __init__(self, expected: int = 1) -> None:
        self.results: list[tuple[bool, str]] = []
        self.verdicts: list[Verdict] = []
        self._lock = threading.Lock()
        self._all = threading.Event()
        self.expected = expected

    def __call__(self, verdict: Verdict) -> None:
        with self._lock:
            self.verdicts.append(verdict)
            self.results.append((verdict.ok, verdict.reason))
            if len(self.results) >= self.expected:
                self._all.set()

    def wait(self, timeout: float = 10) -> list[tuple[bool, str]]:
        assert self._all.wait(timeout), f"{len(self.results)}/{self.expected} publishes done"
        return self.results


@pytest.fixture
def broker(mosquitto_factory: Callable[[str], Mosquitto]) -> Mosquitto:
    return mosquitto_factory("broker")


@pytest.fixture
def connect(broker: Mosquitto) -> Iterator[Callable[..., Connection]]:
    """Build connections to ``broker``; every one is stopped at teardown."""
    made: list[Connection] = []

    def make(protocol: str, client_id: str, *, start: bool = True,
             subscribed: threading.Event | None = None, **kw: object) -> Connection:
        conn = Connection(BrokerConfig(url=broker.url, protocol=protocol), client_id,
                          name=client_id, **kw)  # type: ignore[arg-type]
        if subscribed is not None:
            conn.client.on_subscribe = lambda *_a: subscribed.set()
        made.append(conn)
        if start:
            conn.start()
            assert conn.wait_connected(10), conn.last_error
        if subscribed is not None and start:
            assert subscribed.wait(10), "no SUBACK"
        return conn

    yield make
    for conn in made:
        conn.stop()


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_connects_and_round_trips(
    broker: Mosquitto, connect: Callable[..., Connection], protocol: str
) -> None:
    cid = _cid(f"conn-v{protocol}")
    with capture_logs() as logs:
        conn = connect(protocol, cid)
    assert conn.connected and conn.last_error is None
    [event] = [e for e in logs if e["event"] == "mqtt_connected" and e["broker"] == cid]
    assert event["session_present"] is False and event["url"] == broker.url

    inbox = Inbox()
    connect(protocol, _cid("sub"), subscriptions=(Topic("rt/#", filter=True),),
            on_message=inbox, subscribed=threading.Event())
    done = Done()
    conn.publish(Topic("rt/hello"), b"\x00payload\xff", on_done=done)
    assert done.wait() == [(True, "Success")]
    inbox.wait_for(lambda ms: len(ms) == 1)
    msg = inbox.messages[0]
    assert (msg.topic, msg.payload, msg.qos, msg.retain) == ("rt/hello", b"\x00payload\xff", 1,
                                                             False)


@pytest.mark.parametrize(("protocol", "kept"), [("5", False), ("3.1.1", True)])
def test_session_expiry_shows_the_protocol_spoken(
    broker: Mosquitto, protocol: str, kept: bool
) -> None:
    """session_expiry_s = 0 ends a v5 session at disconnect; 3.1.1 has no such property,
    so there the session (clean_session=False) survives. The difference proves that the
    broker was spoken to in the protocol the config names."""
    cfg = BrokerConfig(url=broker.url, protocol=protocol, session_expiry_s=0)
    cid = _cid(f"expiry-v{protocol}")
    present = []
    for _ in range(2):
        conn = Connection(cfg, cid, name=cid)
        with capture_logs() as logs:
            conn.start()
            assert conn.wait_connected(10)
        conn.stop()
        present += [e["session_present"] for e in logs if e["event"] == "mqtt_connected"]
    assert present == [False, kept]


def test_unreachable_broker_does_not_connect_and_stops_promptly(
    mosquitto_factory: Callable[[str], Mosquitto],
) -> None:
    dead = mosquitto_factory("dead")
    dead.proc.terminate()
    dead.proc.wait(5)
    conn = Connection(BrokerConfig(url=dead.url), _cid("nobody"), name="dead")
    conn.start()
    try:
        assert not conn.wait_connected(1.5)
        assert not conn.connected
    finally:
        t = time.monotonic()
        conn.stop()
        assert time.monotonic() - t < 5


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_unacked_message_is_redelivered_acked_one_is_not(
    connect: Callable[..., Connection], protocol: str
) -> None:
    cid = _cid(f"worker-v{protocol}")
    subs = (Topic("jobs/#", filter=True),)
    first = Inbox()
    sub = connect(protocol, cid, manual_ack=True, subscriptions=subs, on_message=first,
                  subscribed=threading.Event())
    pub = connect(protocol, _cid("gateway"))
    done = Done(2)
    pub.publish(Topic("jobs/acked"), b"one", on_done=done)
    pub.publish(Topic("jobs/unacked"), b"two", on_done=done)
    assert all(ok for ok, _ in done.wait())
    first.wait_for(lambda ms: len(ms) == 2)
    sub.ack(first.first("jobs/acked"))  # "jobs/unacked" is never acked
    sub.stop()  # a clean disconnect; the session stays on the broker

    second = Inbox()
    with capture_logs() as logs:
        sub2 = connect(protocol, cid, manual_ack=True, subscriptions=subs, on_message=second)
        second.wait_for(lambda ms: "jobs/unacked" in [m.topic for m in ms])
    [event] = [e for e in logs if e["event"] == "mqtt_connected" and e["broker"] == cid]
    assert event["session_present"] is True
    redelivered = second.first("jobs/unacked")
    assert redelivered.payload == b"two" and redelivered.dup
    # In-flight messages are resent before anything new: once a fresh marker has arrived,
    # we know the acked message was not redelivered.
    pub.publish(Topic("jobs/marker"), b"m")
    second.wait_for(lambda ms: "jobs/marker" in [m.topic for m in ms])
    assert second.topics() == ["jobs/unacked", "jobs/marker"]
    for m in second.messages:
        sub2.ack(m)
    sub2.stop()

    third = Inbox()
    sub3 = connect(protocol, cid, manual_ack=True, subscriptions=subs, on_message=third)
    pub.publish(Topic("jobs/marker2"), b"m")
    third.wait_for(lambda ms: len(ms) >= 1)
    assert third.topics() == ["jobs/marker2"]
    sub3.ack(third.messages[0])


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_messages_published_while_offline_are_queued_in_the_session(
    connect: Callable[..., Connection], protocol: str
) -> None:
    cid = _cid(f"offline-v{protocol}")
    subs = (Topic("q/#", filter=True),)
    sub = connect(protocol, cid, manual_ack=True, subscriptions=subs, on_message=Inbox(),
                  subscribed=threading.Event())
    sub.stop()
    pub = connect(protocol, _cid("gw"))
    done = Done(3)
    for i in range(3):
        pub.publish(Topic(f"q/{i}"), bytes([i]), on_done=done)
    done.wait()
    inbox = Inbox()
    again = connect(protocol, cid, manual_ack=True, subscriptions=subs, on_message=inbox)
    inbox.wait_for(lambda ms: len(ms) == 3)
    assert inbox.topics() == ["q/0", "q/1", "q/2"]
    for m in inbox.messages:
        again.ack(m)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_publish_on_done(connect: Callable[..., Connection], protocol: str) -> None:
    conn = connect(protocol, _cid("pub"))
    v5 = protocol == "5"

    def verdict(topic: str, qos: int = 1) -> Verdict:
        done = Done()
        mid = conn.publish(Topic(topic), b"x", qos=qos, on_done=done)
        assert isinstance(mid, int) and mid > 0
        done.wait()
        return done.verdicts[0]

    delivered, unclaimed, refused = Delivery.DELIVERED, Delivery.UNCLAIMED, Delivery.REFUSED
    # A v5 PUBACK carries the broker's reason: 0x10 means taken but discarded (nobody
    # subscribed), which 3.1.1 cannot tell from a delivery.
    assert verdict("done/nobody") == (Verdict(unclaimed, "No matching subscribers") if v5
                                      else Verdict(delivered, "Success"))
    assert verdict("done/nobody").ok
    connect(protocol, _cid("sub"), subscriptions=(Topic("done/#", filter=True),),
            on_message=Inbox(), subscribed=threading.Event())
    assert verdict("done/somebody") == Verdict(delivered, "Success")
    # Mosquitto refuses client publishes to $SYS: v5 says so, 3.1.1 cannot.
    assert verdict("$SYS/forged") == (Verdict(refused, "Not authorized") if v5
                                      else Verdict(delivered, "Success"))
    assert verdict("done/q0", qos=0) == Verdict(delivered, "sent")
    assert conn.connected


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_an_offline_persistent_subscriber_claims_what_is_published(
    connect: Callable[..., Connection], protocol: str
) -> None:
    """Once a consumer's persistent session exists the broker queues for it while it is
    away: the PUBACK says delivered, not "no matching subscribers"."""
    cid = _cid(f"consumer-v{protocol}")
    subs = (Topic("claimed/#", filter=True),)
    pub = connect(protocol, _cid("pub"))
    done = Done()
    pub.publish(Topic("claimed/before"), b"lost", on_done=done)
    done.wait()
    nobody = Delivery.UNCLAIMED if protocol == "5" else Delivery.DELIVERED
    assert done.verdicts[0].delivery is nobody
    sub = connect(protocol, cid, manual_ack=True, subscriptions=subs, on_message=Inbox(),
                  subscribed=threading.Event())
    sub.stop()  # its first start created the session: from now on the broker keeps
    done = Done()
    pub.publish(Topic("claimed/after"), b"kept", on_done=done)
    done.wait()
    assert done.verdicts[0].delivery is Delivery.DELIVERED
    inbox = Inbox()
    connect(protocol, cid, manual_ack=True, subscriptions=subs, on_message=inbox)
    inbox.wait_for(lambda ms: [m.payload for m in ms] == [b"kept"])


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_a_second_client_with_the_same_id_makes_the_yielding_one_stop(
    connect: Callable[..., Connection], protocol: str
) -> None:
    """Mosquitto 2.0 closes the older connection of a client id without a DISCONNECT
    (no 0x8E even on v5); knocked off three times within seconds of connecting, a
    connection made with yield_on_takeover stops reconnecting instead of fighting."""
    cid = _cid(f"twin-v{protocol}")
    first = connect(protocol, cid, yield_on_takeover=True)
    second = connect(protocol, cid, start=False)
    second.client.reconnect_delay_set(min_delay=1, max_delay=1)
    second.start()
    deadline = time.monotonic() + 30
    while not first.taken_over and time.monotonic() < deadline:
        time.sleep(0.1)
    assert first.taken_over
    assert "took over" in (first.last_error or "") and first.takeover_evidence
    # It stays off: the other one keeps the session.
    time.sleep(2.5)
    assert second.connected and not first.connected


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_publish_before_connecting_completes_after_connect(
    connect: Callable[..., Connection], protocol: str
) -> None:
    inbox = Inbox()
    connect(protocol, _cid("sub"), subscriptions=(Topic("early/#", filter=True),),
            on_message=inbox, subscribed=threading.Event())
    conn = connect(protocol, _cid("late"), start=False)
    done = Done()
    conn.publish(Topic("early/x"), b"queued", on_done=done)  # no connection yet
    assert not done.results
    conn.start()
    assert done.wait() == [(True, "Success")]
    inbox.wait_for(lambda ms: [m.payload for m in ms] == [b"queued"])


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_many_concurrent_publishes_all_complete(
    connect: Callable[..., Connection], protocol: str
) -> None:
    """200 QoS 1 publishes from 8 threads while PUBACKs stream in (the lock-order
    deadlock between publish and on_publish showed up exactly here)."""
    inbox = Inbox()
    connect(protocol, _cid("sink"), subscriptions=(Topic("load/#", filter=True),),
            on_message=inbox, subscribed=threading.Event())
    conn = connect(protocol, _cid("load"))
    total, workers = 200, 8
    done = Done(total)
    mids: list[int] = []
    errors: list[BaseException] = []
    start = threading.Barrier(workers)

    def work(w: int) -> None:
        try:
            start.wait(5)
            for i in range(total // workers):
                mids.append(conn.publish(Topic(f"load/{w}/{i}"), b"p" * 512, on_done=done))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(w,), daemon=True) for w in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert not any(t.is_alive() for t in threads), "publish() is stuck (deadlock?)"
    assert not errors
    results = done.wait(20)
    assert len(results) == total  # each callback exactly once
    assert all(ok for ok, _ in results)
    assert len(set(mids)) == total
    inbox.wait_for(lambda ms: len(ms) == total, timeout=20)
    assert len(set(inbox.topics())) == total


_VICTIM = textwrap.dedent(
    """
    import sys, threading, time
    from agent.config import BrokerConfig
    from agent.transport.mqtt import Connection, Will
    from agent.transport.topics import Topic

    url, protocol, cid, topic = sys.argv[1:5]
    status = Topic(topic)
    conn = Connection(BrokerConfig(url=url, protocol=protocol), cid, name="victim",
                      will=Will(status, b"offline"))
    conn.start()
    assert conn.wait_connected(10)
    online = threading.Event()
    conn.publish(status, b"online", retain=True, on_done=lambda _verdict: online.set())
    assert online.wait(10)
    print("ready", flush=True)
    time.sleep(60)
    """
)


def _retained(connect: Callable[..., Connection], protocol: str, topic: str) -> Message:
    inbox = Inbox()
    connect(protocol, _cid("viewer"), subscriptions=(Topic(topic, filter=True),),
            on_message=inbox)
    inbox.wait_for(lambda ms: len(ms) >= 1)
    return inbox.messages[0]


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_will_is_published_when_the_client_dies(
    broker: Mosquitto, connect: Callable[..., Connection], protocol: str, tmp_path: Path
) -> None:
    topic = f"iomt/site-1/victim-{protocol}/status"
    script = tmp_path / "victim.py"
    script.write_text(_VICTIM)
    proc = subprocess.Popen([sys.executable, str(script), broker.url, protocol,
                             _cid("victim"), topic],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            cwd=Path(__file__).resolve().parents[2])
    try:
        assert proc.stdout is not None
        seen = b""
        while not seen.endswith(b"ready\n"):  # it logs "mqtt_connected" first
            line = proc.stdout.readline()
            assert line, f"the client exited early:\n{seen.decode()}"
            seen += line
        assert _retained(connect, protocol, topic).payload == b"online"

        live = Inbox()
        connect(protocol, _cid("watcher"), subscriptions=(Topic(topic, filter=True),),
                on_message=live, subscribed=threading.Event())
        proc.send_signal(signal.SIGKILL)  # no DISCONNECT: the socket just dies
        proc.wait(10)
        live.wait_for(lambda ms: any(m.payload == b"offline" for m in ms))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    retained = _retained(connect, protocol, topic)
    assert retained.payload == b"offline" and retained.retain


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_will_is_not_published_on_a_clean_stop(
    connect: Callable[..., Connection], protocol: str
) -> None:
    topic = f"iomt/site-1/clean-{protocol}/status"
    live = Inbox()
    connect(protocol, _cid("watcher"), subscriptions=(Topic(topic, filter=True),),
            on_message=live, subscribed=threading.Event())
    conn = connect(protocol, _cid("clean"), will=Will(Topic(topic), b"offline"))
    done = Done()
    conn.publish(Topic(topic), b"online", retain=True, on_done=done)
    done.wait()
    conn.stop()
    # A marker published after the stop arrives after any will would have.
    marker = connect(protocol, _cid("marker"))
    marker.publish(Topic(topic), b"marker")
    live.wait_for(lambda ms: any(m.payload == b"marker" for m in ms))
    assert [m.payload for m in live.messages] == [b"online", b"marker"]
