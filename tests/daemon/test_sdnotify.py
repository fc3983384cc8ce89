"""sd_notify against real unix datagram sockets (a path and the abstract namespace), with the
watchdog driven by a loop the test controls."""

from __future__ import annotations

import itertools
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import structlog

from agent.daemon.sdnotify import (
    BrokerState,
    Notifier,
    ServiceNotifier,
    add_syslog_prefix,
    socket_address,
    status_line,
    stream_is_journal,
    watchdog_timeout,
)

REPO = Path(__file__).resolve().parents[2]


@dataclass
class Listener:
    """What systemd does: a bound AF_UNIX datagram socket, one datagram per message."""

    name: str  # the $NOTIFY_SOCKET value
    sock: socket.socket
    received: list[tuple[float, str]] = field(default_factory=list)
    _thread: threading.Thread | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self) -> None:
        def run() -> None:
            while True:
                try:
                    data = self.sock.recv(4096)
                except OSError:
                    return
                with self._lock:
                    self.received.append((time.monotonic(), data.decode()))

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()

    def messages(self) -> list[str]:
        with self._lock:
            return [m for _, m in self.received]

    def times_of(self, assignment: str) -> list[float]:
        with self._lock:
            return [t for t, m in self.received if assignment in m.splitlines()]

    def wait_for(self, assignment: str, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.times_of(assignment):
                return
            time.sleep(0.01)
        raise AssertionError(f"no {assignment} in {self.messages()}")


def _listener(address: str | bytes, name: str) -> Iterator[Listener]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(address)
    listener = Listener(name, sock)
    listener.start()
    yield listener
    sock.close()


@pytest.fixture
def path_socket(tmp_path: Path) -> Iterator[Listener]:
    path = tmp_path / "notify"
    yield from _listener(str(path), str(path))


@pytest.fixture
def abstract_socket() -> Iterator[Listener]:
    name = f"iomt-test-{uuid.uuid4().hex}"
    yield from _listener(b"\0" + name.encode(), "@" + name)


def test_address_forms() -> None:
    assert socket_address("/run/systemd/notify") == "/run/systemd/notify"
    assert socket_address("@abc") == b"\0abc"
    assert socket_address("@") is None
    assert socket_address("vsock:2:1") is None


@pytest.mark.parametrize("kind", ["path", "abstract"])
def test_messages_arrive_one_datagram_each(
    kind: str, path_socket: Listener, abstract_socket: Listener
) -> None:
    listener = path_socket if kind == "path" else abstract_socket
    n = Notifier.from_environ({"NOTIFY_SOCKET": listener.name})
    assert n.enabled
    assert n.ready("ok: processed 0")
    assert n.status("two\nlines  here")
    assert n.watchdog()
    assert n.extend_timeout(1.5)
    assert n.stopping("stopping: SIGTERM")
    listener.wait_for("STOPPING=1")
    n.close()
    assert listener.messages() == [
        "READY=1\nSTATUS=ok: processed 0\n",
        "STATUS=two lines here\n",  # a newline would end the assignment
        "WATCHDOG=1\n",
        "EXTEND_TIMEOUT_USEC=1500000\n",
        "STOPPING=1\nSTATUS=stopping: SIGTERM\n",
    ]


def test_without_notify_socket_nothing_happens() -> None:
    n = Notifier.from_environ({})
    assert not n.enabled
    assert not n.ready("x")
    sn = ServiceNotifier.from_environ({})
    sn.beat(ready=True, status="x")  # no error, no socket
    sn.stopping()
    assert not sn.enabled


def test_unreachable_socket_is_not_fatal(tmp_path: Path) -> None:
    n = Notifier(str(tmp_path / "gone"))
    assert not n.watchdog()
    assert n.last_error is not None


def test_watchdog_timeout_from_environment() -> None:
    assert watchdog_timeout({}) is None
    assert watchdog_timeout({"WATCHDOG_USEC": "30000000"}) == 30.0
    assert watchdog_timeout({"WATCHDOG_USEC": "0"}) is None
    assert watchdog_timeout({"WATCHDOG_USEC": "x"}) is None
    mine = {"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": str(os.getpid())}
    assert watchdog_timeout(mine) == 2.0
    assert watchdog_timeout({**mine, "WATCHDOG_PID": str(os.getpid() + 1)}) is None


class ControlledLoop:
    """A processing loop the test can stall: each turn does 'work' then beats."""

    def __init__(self, notifier: ServiceNotifier) -> None:
        self.sd = notifier
        self.running = threading.Event()
        self.running.set()
        self.stop = threading.Event()
        self.brokers_up = threading.Event()
        self.turns = 0
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        while not self.stop.is_set():
            self.running.wait()  # a stuck stage: the loop makes no progress here
            self.turns += 1
            self.sd.beat(ready=self.brokers_up.is_set(),
                         status=lambda: f"turn {self.turns // 100}")
            time.sleep(0.005)


def test_ready_once_after_start_up_then_watchdog_below_half(abstract_socket: Listener) -> None:
    env = {"NOTIFY_SOCKET": abstract_socket.name, "WATCHDOG_USEC": "800000",
           "WATCHDOG_PID": str(os.getpid())}
    sd = ServiceNotifier.from_environ(env)
    assert sd.watchdog_s == 0.8
    loop = ControlledLoop(sd)
    loop.thread.start()
    try:
        time.sleep(0.5)  # starting: brokers not connected yet
        assert not abstract_socket.times_of("READY=1")
        assert abstract_socket.times_of("EXTEND_TIMEOUT_USEC=15000000")  # the 15 s floor
        loop.brokers_up.set()
        abstract_socket.wait_for("READY=1")
        ready_at = abstract_socket.times_of("READY=1")[0]
        time.sleep(2.0)
    finally:
        loop.stop.set()
        loop.thread.join(5)
    assert len(abstract_socket.times_of("READY=1")) == 1
    pings = [t for t in abstract_socket.times_of("WATCHDOG=1") if t > ready_at]
    assert len(pings) >= 6, pings
    gaps = [b - a for a, b in itertools.pairwise(pings)]
    assert max(gaps) < 0.8 / 2, gaps  # below half of WATCHDOG_USEC
    assert min(gaps) > 0.1, gaps  # rate-limited, not one per loop turn
    # start-up extensions stop once ready
    assert all(t < ready_at for t in abstract_socket.times_of("EXTEND_TIMEOUT_USEC=15000000"))


def test_no_watchdog_once_the_loop_is_stuck(path_socket: Listener) -> None:
    sd = ServiceNotifier.from_environ({"NOTIFY_SOCKET": path_socket.name,
                                       "WATCHDOG_USEC": "400000"})
    loop = ControlledLoop(sd)
    loop.brokers_up.set()
    loop.thread.start()
    try:
        path_socket.wait_for("READY=1")
        time.sleep(0.5)
        loop.running.clear()  # the loop hangs (e.g. a stage blocks forever)
        time.sleep(0.15)  # a turn in progress may still finish
        stuck_at = time.monotonic()
        turns = loop.turns
        time.sleep(1.0)  # 2.5 x WatchdogSec: systemd would have killed us
        during = [t for t in path_socket.times_of("WATCHDOG=1") if t > stuck_at]
        assert loop.turns == turns
        assert during == []
        loop.running.set()  # a loop that recovers pings again
        resumed_at = time.monotonic()
        time.sleep(0.5)
        assert [t for t in path_socket.times_of("WATCHDOG=1") if t > resumed_at]
    finally:
        loop.running.set()
        loop.stop.set()
        loop.thread.join(5)


def test_the_first_model_load_extends_the_start_timeout_for_a_bounded_time(
        path_socket: Listener) -> None:
    """No loop turns while the model loads: a timer thread extends the start timeout (and
    pings the watchdog), and stops at the end of the load or at its limit."""
    sd = ServiceNotifier.from_environ({"NOTIFY_SOCKET": path_socket.name,
                                       "WATCHDOG_USEC": "400000"})  # a ping every 0.1 s
    extend = "EXTEND_TIMEOUT_USEC=15000000"
    with sd.loading():
        time.sleep(0.55)  # auto timing its candidates
    ended = time.monotonic()
    during = path_socket.times_of(extend)
    assert len(during) >= 4 and len(path_socket.times_of("WATCHDOG=1")) >= 4, during
    time.sleep(0.3)
    assert all(t <= ended for t in path_socket.times_of(extend))
    assert not path_socket.times_of("READY=1")

    began = time.monotonic()
    with sd.loading(limit_s=0.25):
        time.sleep(1.2)  # a load that hangs: systemd's timeout is left to expire
    late = [t for t in path_socket.times_of(extend) if t > began + 0.75]
    assert late == [] and len(path_socket.times_of(extend)) >= len(during) + 2

    sd.beat(ready=True)
    path_socket.wait_for("READY=1")
    count = len(path_socket.messages())
    with sd.loading():  # once ready, a reload's load is covered by the loop's own beats
        time.sleep(0.25)
    assert len(path_socket.messages()) == count


def test_status_changes_are_sent_not_repeated(path_socket: Listener) -> None:
    now = [0.0]
    sd = ServiceNotifier(Notifier(path_socket.name), 30.0, clock=lambda: now[0],
                         status_interval_s=5.0)
    sd.beat(ready=False, status="waiting for brokers: cloud")
    now[0] = 1.0
    sd.beat(ready=False, status="never computed before due")
    now[0] = 6.0
    sd.beat(ready=False, status="waiting for brokers: cloud")  # same text: nothing
    now[0] = 7.0
    sd.beat(ready=True, status="ok: processed 0")  # READY carries its status at once
    now[0] = 13.0
    sd.beat(ready=True, status="ok: processed 5")
    sd.stopping("stopping: SIGTERM")
    sd.beat(ready=True, status="after stop")  # beats end with STOPPING
    sd.stopping("stopping: draining outbox (3 left)")
    path_socket.wait_for("STATUS=stopping: draining outbox (3 left)")
    assert path_socket.messages() == [
        "STATUS=waiting for brokers: cloud\nWATCHDOG=1\nEXTEND_TIMEOUT_USEC=22500000\n",
        "READY=1\nSTATUS=ok: processed 0\n",
        "STATUS=ok: processed 5\nWATCHDOG=1\n",  # due again 7.5 s after the first ping
        "STOPPING=1\nSTATUS=stopping: SIGTERM\n",
        "STATUS=stopping: draining outbox (3 left)\n",
    ]


def test_stopping_on_sigterm_from_a_real_process(abstract_socket: Listener) -> None:
    script = textwrap.dedent("""
        import signal, threading
        from agent.daemon.sdnotify import ServiceNotifier
        sd = ServiceNotifier.from_environ()
        stop = threading.Event()
        def on_term(signum, frame):
            sd.stopping("stopping: " + signal.Signals(signum).name)
            stop.set()
        signal.signal(signal.SIGTERM, on_term)
        while not stop.is_set():
            sd.beat(ready=True, status="ok")
            stop.wait(0.02)
        sd.status("stopped")
    """)
    env = dict(os.environ, NOTIFY_SOCKET=abstract_socket.name, WATCHDOG_USEC="1000000")
    proc = subprocess.Popen([sys.executable, "-c", script], env=env, cwd=REPO)
    try:
        abstract_socket.wait_for("READY=1", timeout=20)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    abstract_socket.wait_for("STOPPING=1")
    msgs = abstract_socket.messages()
    assert "STOPPING=1\nSTATUS=stopping: SIGTERM\n" in msgs
    assert msgs[-1] == "STATUS=stopped\n"


def test_status_line_reads_well() -> None:
    up = [BrokerState("edge", "mqtt://gw:1883", True), BrokerState("cloud", "mqtts://c:8883", True)]
    assert status_line(brokers=up, inbox=0, outbox=2, processed=120, failed=1,
                       last_latency_ms=43.4) == (
        "ok: processed 120, rejected 1, inbox 0, outbox 2, last 43 ms")
    refused = "connection refused: Not authorized"
    down = [up[0], BrokerState("cloud", "mqtts://c:8883", False, refused)]
    assert status_line(brokers=down, inbox=3, outbox=0, processed=0, failed=0, ready=False) == (
        "waiting for brokers: cloud broker mqtts://c:8883 not connected "
        "(connection refused: Not authorized); processed 0, rejected 0, inbox 3, outbox 0")
    assert status_line(brokers=down, inbox=0, outbox=9, processed=5, failed=0).startswith(
        "degraded: cloud broker mqtts://c:8883 not connected")


def test_journald_level_prefix(tmp_path: Path) -> None:
    with (tmp_path / "stream").open("w") as stream:
        st = os.fstat(stream.fileno())
        assert stream_is_journal(stream, {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"})
        assert not stream_is_journal(stream, {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino + 1}"})
        assert not stream_is_journal(stream, {})
    logger = structlog.wrap_logger(
        structlog.ReturnLogger(),
        processors=[structlog.processors.JSONRenderer(), add_syslog_prefix],
    )
    assert logger.warning("outbox_full") == '<4>{"event": "outbox_full"}'
    assert logger.error("x").startswith("<3>{")
    assert logger.info("x").startswith("<6>{")
    assert logger.debug("x").startswith("<7>{")
