"""Shared fixtures: real Mosquitto brokers on free loopback ports."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def mosquitto_binary() -> str | None:
    return shutil.which("mosquitto") or (
        "/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None
    )


@dataclass
class Mosquitto:
    port: int
    proc: subprocess.Popen[bytes]
    log: Path

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"


@pytest.fixture
def mosquitto_factory(tmp_path: Path) -> Iterator[Callable[..., Mosquitto]]:
    """Start Mosquitto brokers with their own config; all are stopped at teardown."""
    binary = mosquitto_binary()
    if binary is None:
        pytest.fail("mosquitto is not installed: run `make test` (it installs it) or "
                    "`apt-get install mosquitto`")
    started: list[Mosquitto] = []

    def start(name: str = "broker", settings: str = "allow_anonymous true") -> Mosquitto:
        """``settings``: listener options (authentication, TLS) for this broker."""
        port = _free_port()
        conf = tmp_path / f"{name}.conf"
        log = tmp_path / f"{name}.log"
        # user root: a broker started by root would otherwise drop to user mosquitto and
        # could not read files (passwords, certificates) in pytest's private tmp dir.
        conf.write_text(
            f"listener {port} 127.0.0.1\n"
            f"{settings}\n"
            "user root\n"
            "persistence false\n"
            "max_queued_messages 100000\n"
            "log_dest stderr\n"
            "log_type error\nlog_type warning\nlog_type notice\n"
        )
        # The broker logs to stderr, kept in a file of ours.
        with log.open("wb") as log_file:
            proc = subprocess.Popen([binary, "-c", str(conf)], stdout=log_file,
                                    stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                if proc.poll() is not None:
                    pytest.fail(f"mosquitto exited: {log.read_text() if log.exists() else ''}")
                time.sleep(0.05)
        broker = Mosquitto(port, proc, log)
        started.append(broker)
        return broker

    yield start
    for b in started:
        b.proc.terminate()
        try:
            b.proc.wait(5)
        except subprocess.TimeoutExpired:
            b.proc.kill()


@pytest.fixture(autouse=True)
def _fresh_structlog() -> Iterator[None]:
    """A test that runs a CLI entry point configures structlog for the process (e.g. the
    doctor filters below "error"); start every test from structlog's defaults."""
    import structlog

    yield
    structlog.reset_defaults()
