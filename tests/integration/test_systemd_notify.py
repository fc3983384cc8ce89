"""The real agent speaking sd_notify to a unix datagram socket, as systemd would hear it:
STATUS while starting, READY only once both brokers are connected, WATCHDOG from the loop
below half of WATCHDOG_USEC, STOPPING on SIGTERM."""

from __future__ import annotations

import itertools
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from agent.ops.scaffold import InitOptions, write_directory
from tests.bundles import make_scale_bundle
from tests.conftest import Mosquitto, mosquitto_binary

pytestmark = pytest.mark.integration

# The agent's loop turns at least once a second and pings every WATCHDOG_S / 4 at most:
# gaps stay below half of WATCHDOG_S from 5 s up (the unit uses 60 s).
WATCHDOG_S = 5.0


class NotifySocket:
    """systemd's end: an abstract-namespace datagram socket that records each message."""

    def __init__(self) -> None:
        self.name = f"@iomt-notify-{uuid.uuid4().hex}"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(b"\0" + self.name[1:].encode())
        self.messages: list[tuple[float, dict[str, str]]] = []
        self.lock = threading.Lock()
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        while True:
            try:
                data = self.sock.recv(65536).decode()
            except OSError:
                return
            fields = dict(line.split("=", 1) for line in data.splitlines() if "=" in line)
            with self.lock:
                self.messages.append((time.monotonic(), fields))

    def having(self, key: str) -> list[tuple[float, dict[str, str]]]:
        with self.lock:
            return [(t, m) for t, m in self.messages if key in m]

    def statuses(self) -> list[str]:
        return [m["STATUS"] for _, m in self.having("STATUS")]

    def wait_for(self, key: str, value: str | None = None, timeout: float = 60) -> float:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for t, m in self.having(key):
                if value is None or m[key].startswith(value):
                    return t
            time.sleep(0.05)
        raise AssertionError(f"no {key}={value or ''}... in {self.messages}")


@pytest.fixture
def notify() -> Iterator[NotifySocket]:
    n = NotifySocket()
    yield n
    n.sock.close()


def _node(tmp: Path, edge_url: str, cloud_url: str) -> Path:
    bundle = make_scale_bundle(tmp / "bundle")
    config = write_directory(InitOptions(directory=tmp / "node", edge_url=edge_url,
                                         cloud_url=cloud_url, bundle=bundle))
    config.write_text(config.read_text().replace('format = "auto"', 'format = "json"'))
    return config


def _spawn(config: Path, notify: NotifySocket, log: Path) -> subprocess.Popen[bytes]:
    env = dict(os.environ, NOTIFY_SOCKET=notify.name,
               WATCHDOG_USEC=str(int(WATCHDOG_S * 1e6)), PYTHONUNBUFFERED="1")
    with log.open("ab") as f:
        return subprocess.Popen([sys.executable, "-m", "agent", "run", "--config", str(config)],
                                stdout=f, stderr=subprocess.STDOUT, env=env)


def test_ready_watchdog_stopping(tmp_path: Path, notify: NotifySocket,
                                 mosquitto_factory: Callable[[str], Mosquitto]) -> None:
    edge, cloud = mosquitto_factory("edge"), mosquitto_factory("cloud")
    config = _node(tmp_path, edge.url, cloud.url)
    proc = _spawn(config, notify, tmp_path / "agent.log")
    try:
        ready_at = notify.wait_for("READY")
        assert notify.statuses()[0].startswith("starting: loading model bundle")
        _, ready = notify.having("READY")[0]
        assert ready["STATUS"].startswith("ok: processed 0"), ready
        time.sleep(2 * WATCHDOG_S)
        pings = [t for t, _ in notify.having("WATCHDOG") if t >= ready_at]
        assert len(pings) >= 4, notify.messages
        assert max(b - a for a, b in itertools.pairwise(pings)) < WATCHDOG_S / 2
        assert len(notify.having("READY")) == 1
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, (tmp_path / "agent.log").read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
    stopping_at = notify.wait_for("STOPPING")
    _, first_stop = notify.having("STOPPING")[0]
    assert first_stop["STATUS"].startswith("stopping: SIGTERM")
    assert notify.statuses()[-1].startswith("stopped: inbox 0, outbox 0")
    assert not [t for t, _ in notify.having("WATCHDOG") if t > stopping_at + 0.5]


def test_not_ready_until_both_brokers_connect(
    tmp_path: Path, notify: NotifySocket, mosquitto_factory: Callable[[str], Mosquitto]
) -> None:
    edge = mosquitto_factory("edge")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        cloud_port = s.getsockname()[1]
    config = _node(tmp_path, edge.url, f"mqtt://127.0.0.1:{cloud_port}")
    proc = _spawn(config, notify, tmp_path / "agent.log")
    cloud: subprocess.Popen[bytes] | None = None
    try:
        notify.wait_for("STATUS", "waiting for brokers: cloud broker mqtt://127.0.0.1:", 60)
        notify.wait_for("EXTEND_TIMEOUT_USEC")  # start-up is alive, give it time
        assert not notify.having("READY")
        conf = tmp_path / "cloud.conf"
        conf.write_text(f"listener {cloud_port} 127.0.0.1\nallow_anonymous true\n")
        binary = mosquitto_binary()
        assert binary is not None
        cloud = subprocess.Popen([binary, "-c", str(conf)], stdout=subprocess.DEVNULL,
                                 stderr=subprocess.DEVNULL)
        notify.wait_for("READY", timeout=60)  # paho retries with a growing delay
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        if cloud is not None:
            cloud.terminate()
            cloud.wait(5)
