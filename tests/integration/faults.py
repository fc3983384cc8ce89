"""Helpers of the fault tests: Mosquitto brokers configured as docs/reliability.md
recommends (persistence as snapshots, ``autosave_interval 60``) that can be SIGKILLed and
restarted on the same port, and SQLite integrity checks of the agent's stores."""

from __future__ import annotations

import signal
import socket
import sqlite3
import subprocess
import time
from pathlib import Path

from tests.conftest import _free_port, mosquitto_binary


class Broker:
    """One Mosquitto with persistence on a fixed loopback port; ``kill`` is SIGKILL (no
    final snapshot: what it acked since the last autosave is gone)."""

    def __init__(self, name: str, tmp: Path) -> None:
        binary = mosquitto_binary()
        assert binary is not None, "mosquitto is not installed: run `make test`"
        self.binary = binary
        self.name = name
        self.port = _free_port()
        data = tmp / f"{name}-data"
        data.mkdir(parents=True, exist_ok=True)
        self.conf = tmp / f"{name}.conf"
        self.log = tmp / f"{name}.log"
        self.conf.write_text(
            f"listener {self.port} 127.0.0.1\nallow_anonymous true\nuser root\n"
            f"persistence true\npersistence_location {data}/\nautosave_interval 60\n"
            "max_queued_messages 10000\nmax_inflight_messages 64\n"
            "log_dest stderr\nlog_type error\nlog_type warning\nlog_type notice\n")
        self.proc: subprocess.Popen[bytes] | None = None
        self.kills = 0

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def start(self) -> None:
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen([self.binary, "-c", str(self.conf)], stdout=log,
                                         stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                assert self.proc.poll() is None, self.log.read_text()
                time.sleep(0.05)
        raise AssertionError(f"{self.name} broker did not start")

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)
        self.kills += 1

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def integrity_check(state_dir: Path) -> dict[str, str]:
    """``PRAGMA integrity_check`` of every SQLite store under ``state_dir`` (opening one
    also recovers its WAL, as the agent's next start does)."""
    results = {}
    for db in sorted(state_dir.rglob("*.db")):
        conn = sqlite3.connect(db)
        try:
            results[db.name] = str(conn.execute("PRAGMA integrity_check").fetchone()[0])
        finally:
            conn.close()
    return results
