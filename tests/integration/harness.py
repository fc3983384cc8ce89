"""Helpers for integration tests: the agent and the receiver as subprocesses, and a
recording MQTT client."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from agent.config import BrokerConfig
from agent.transport.mqtt import Connection, Message
from agent.transport.topics import Topic

REPO = Path(__file__).resolve().parents[2]
REFERENCE_BUNDLE = Path(os.environ.get("IOMT_TEST_BUNDLE", REPO / "models" / "t1w-to-t2w-lite"))


def cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "agent", *args], capture_output=True,
                          text=True, timeout=timeout, check=False)


@dataclass
class Proc:
    proc: subprocess.Popen[bytes]
    log: Path

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def events(self, name: str) -> list[dict[str, object]]:
        out = []
        for line in self.text().splitlines():
            if f'"{name}"' in line:
                with contextlib.suppress(json.JSONDecodeError):
                    out.append(json.loads(line))
        return out

    def wait_for(self, needle: str, count: int = 1, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.text().count(needle) >= count:
                return
            if self.proc.poll() is not None:
                raise AssertionError(f"process exited {self.proc.returncode}:\n{self.text()}")
            time.sleep(0.1)
        raise AssertionError(f"timed out waiting for {needle!r} x{count}:\n{self.text()[-3000:]}")

    def terminate(self, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)


def spawn(args: list[str], log: Path) -> Proc:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    with log.open("ab") as f:
        p = subprocess.Popen([sys.executable, "-m", "agent", *args], stdout=f,
                             stderr=subprocess.STDOUT, env=env)
    return Proc(p, log)


@dataclass
class Recorder:
    """Records every message on a broker (topic filter '#')."""

    conn: Connection
    messages: list[Message] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    @classmethod
    def start(cls, url: str, name: str, pattern: str = "#") -> Recorder:
        rec: Recorder
        def on_message(msg: Message) -> None:
            with rec.lock:
                rec.messages.append(msg)

        conn = Connection(BrokerConfig(url=url), f"recorder-{name}-{time.monotonic_ns()}",
                          name=name, subscriptions=(Topic(pattern, filter=True),),
                          on_message=on_message)
        rec = cls(conn)
        conn.start()
        assert conn.wait_connected(10), f"recorder cannot connect to {url}"
        time.sleep(0.3)  # let the SUBSCRIBE land before traffic starts
        return rec

    def on(self, suffix: str) -> list[Message]:
        with self.lock:
            return [m for m in self.messages if m.topic.endswith(suffix)]

    def wait(self, suffix: str, count: int, timeout: float = 60) -> list[Message]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            got = self.on(suffix)
            if len(got) >= count:
                return got
            time.sleep(0.1)
        raise AssertionError(f"only {len(self.on(suffix))} of {count} messages on *{suffix}")

    def stop(self) -> None:
        self.conn.stop()
