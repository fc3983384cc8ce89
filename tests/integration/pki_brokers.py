"""Mosquitto started with exactly the files of ``iomt-agent certs init``."""

from __future__ import annotations

import json
import socket
import subprocess
import time
from pathlib import Path

from tests.conftest import mosquitto_binary


def start_brokers(pki: Path, log_dir: Path) -> list[subprocess.Popen[bytes]]:
    """``mosquitto -c DIR/mosquitto/{edge,cloud}.conf``, waiting until each listens."""
    binary = mosquitto_binary()
    assert binary, "mosquitto is not installed: run `make test` or apt-get install mosquitto"
    ports = json.loads((pki / "pki.json").read_text())["ports"]
    procs = []
    for broker in ("edge", "cloud"):
        with (log_dir / f"{broker}-broker.log").open("wb") as log:
            procs.append(subprocess.Popen(
                [binary, "-c", str(pki / "mosquitto" / f"{broker}.conf")],
                stdout=log, stderr=subprocess.STDOUT))
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", ports[broker]), timeout=0.2).close()
                break
            except OSError:
                assert procs[-1].poll() is None, (log_dir / f"{broker}-broker.log").read_text()
                assert time.monotonic() < deadline, f"{broker} broker does not listen"
                time.sleep(0.05)
    return procs


def stop_brokers(procs: list[subprocess.Popen[bytes]]) -> None:
    for proc in procs:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
