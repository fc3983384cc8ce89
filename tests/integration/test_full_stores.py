"""Full stores and a full disk with the running agent between two real Mosquitto brokers:
backpressure to the edge broker (scans wait unacked in the session), ``drop_oldest`` with an
error report per dropped result, and a state directory on a small tmpfs filled to the last
byte. Every slice is counted at the end: delivered, or reported on the error topic."""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from agent.config import BrokerConfig
from agent.demo.sample_series import build_series, load_demo_slab
from agent.transport.mqtt import Connection
from tests.conftest import Mosquitto
from tests.integration.harness import REFERENCE_BUNDLE, Recorder, cli, spawn

pytestmark = pytest.mark.integration

NODE = "iomt/site-a/node-1"


def _init(tmp: Path, edge: Mosquitto, cloud: Mosquitto, **replace: str) -> Path:
    r = cli("init", str(tmp / "node"), "--edge-url", edge.url, "--cloud-url", cloud.url,
            "--site", "site-a", "--device-id", "node-1", "--bundle", str(REFERENCE_BUNDLE))
    assert r.returncode == 0, r.stderr
    config = tmp / "node" / "agent.toml"
    text = config.read_text().replace('format = "auto"', 'format = "json"').replace(
        'backend = "auto"', 'backend = "onnxruntime"')  # no runtime race at each start
    for old, new in replace.items():
        assert old in text, old
        text = text.replace(old, new)
    config.write_text(text)
    return config


def _scans(tmp: Path, n: int, name: str = "scans") -> list[Path]:
    slab = load_demo_slab().t1
    vol = np.concatenate([slab] * -(-n // slab.shape[0]))[:n]
    out = tmp / name
    out.mkdir()
    paths = []
    for i, payload in enumerate(build_series(vol)):
        paths.append(out / f"{i:03d}.dcm")
        paths[-1].write_bytes(payload)
    return paths


def _send(config: Path, *paths: Path) -> None:
    """What ``iomt-agent send`` does, in this process (a subprocess costs seconds)."""
    url = next(line.split('"')[1] for line in config.read_text().splitlines()
               if line.startswith("url = "))  # [edge] comes first
    conn = Connection(BrokerConfig(url=url), f"gateway-{time.monotonic_ns()}", name="gw")
    conn.start()
    assert conn.wait_connected(10)
    acked = threading.Semaphore(0)
    for path in paths:
        conn.publish("iomt/site-a/scans/gw", path.read_bytes(), qos=1,
                     on_done=lambda _v: acked.release())
    assert all(acked.acquire(timeout=30) for _ in paths)
    conn.stop()


def _statuses(rec: Recorder) -> list[dict[str, object]]:
    return [json.loads(m.payload) for m in rec.on("/status")]


def _until(pred: Callable[[], bool], what: str, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def _reason(status: dict[str, object]) -> object:
    bp = status.get("backpressure")
    return bp.get("reason") if isinstance(bp, dict) else None


def _results(rec: Recorder) -> set[bytes]:
    return {m.payload for m in rec.on("/results")}


@pytest.fixture
def brokers(mosquitto_factory: Callable[[str], Mosquitto]) -> tuple[Mosquitto, Mosquitto]:
    return mosquitto_factory("edge"), mosquitto_factory("cloud")


def test_a_full_outbox_stops_taking_scans_and_every_one_arrives_later(
        tmp_path: Path, brokers: tuple[Mosquitto, Mosquitto]) -> None:
    """No consumer yet: the cloud broker answers "no matching subscribers", the results stay
    in a 1 MiB outbox (about seven), and the agent stops acking scans: the rest wait with the
    edge broker. Once a consumer subscribes, all 30 come out."""
    n, first = 24, 16
    edge, cloud = brokers
    config = _init(tmp_path, edge, cloud, **{"outbox_max_bytes = 2147483648":
                                             "outbox_max_bytes = 1048576"})
    paths = _scans(tmp_path, n)
    status = Recorder.start(cloud.url, "status", f"{NODE}/status")
    agent = spawn(["run", "--config", str(config)], tmp_path / "agent.log")
    try:
        agent.wait_for('"mqtt_connected"', 2)
        _send(config, *paths[:first])  # more than the outbox holds
        _until(lambda: any(_reason(s) == "outbox_full" for s in _statuses(status)),
               "status backpressure.reason outbox_full")
        _send(config, *paths[first:])  # these wait with the edge broker, unacked
        agent.wait_for('"backpressure"', 2)  # processing waits, and now ingest too
        time.sleep(1.0)
        full = _statuses(status)[-1]
        assert _reason(full) == "outbox_full"
        taken = int(full["processed"]) + int(full["inbox_depth"])  # type: ignore[call-overload]
        assert taken <= first, "the agent took scans although its outbox was full"
        results = Recorder.start(cloud.url, "results", f"{NODE}/results")
        _until(lambda: len(_results(results)) >= n, f"{n} results", timeout=120)
        _until(lambda: _reason(_statuses(status)[-1]) is None, "backpressure over")
        time.sleep(0.5)
        assert len(_results(results)) == n and not results.on("/errors")
        assert not agent.events("mqtt_disconnected")  # held, not dropped: the session stayed
        assert agent.terminate() == 0
    finally:
        agent.kill()
    print(f"outbox backpressure: sent {n}, taken while full {taken}, delivered "
          f"{len(_results(results))}, errors 0")


def test_drop_oldest_reports_each_dropped_result_and_loses_no_slice(
        tmp_path: Path, brokers: tuple[Mosquitto, Mosquitto]) -> None:
    n = 20
    edge, cloud = brokers
    config = _init(tmp_path, edge, cloud, **{"outbox_max_bytes = 2147483648":
                                             "outbox_max_bytes = 1048576",
                                             'outbox_full = "backpressure"':
                                             'outbox_full = "drop_oldest"'})
    paths = _scans(tmp_path, n + 1)
    errors = Recorder.start(cloud.url, "errors", f"{NODE}/errors")
    agent = spawn(["run", "--config", str(config)], tmp_path / "agent.log")
    try:
        agent.wait_for('"mqtt_connected"', 2)
        _send(config, *paths[:n])
        agent.wait_for('"slice_processed"', n)  # nothing waited: the oldest made room
        results = Recorder.start(cloud.url, "results", f"{NODE}/results")
        _send(config, paths[n])  # its result is claimed: the held ones are due at once
        dropped: set[str] = set()

        def counted() -> int:
            reports = [json.loads(m.payload) for m in errors.on("/errors")]
            assert {r["reason"] for r in reports} <= {"outbox_overflow"}, reports
            dropped.update(str(r["detail"]).split()[1] for r in reports)
            return len(_results(results)) + len(dropped)

        _until(lambda: counted() >= n + 1, f"{n + 1} slices accounted for", timeout=120)
        time.sleep(0.5)
        assert counted() == n + 1 and dropped
        assert agent.events("outbox_overflow")
        assert agent.terminate() == 0
    finally:
        agent.kill()
    print(f"drop_oldest: sent {n + 1}, delivered {len(_results(results))}, "
          f"dropped and reported {len(dropped)}")


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 24 MiB tmpfs for the state directory (the test runs as root, as `make test` does
    on the project's machines)."""
    if os.geteuid() != 0:
        pytest.fail("the full-disk test mounts a tmpfs: run it as root")
    mnt = tmp_path / "state"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m,mode=0700", "tmpfs", str(mnt)],
                   check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def _fill(directory: Path) -> Path:
    """Write a file until the filesystem has no byte left."""
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for chunk in (1 << 20, 65536, 4096, 1):
            with contextlib.suppress(OSError):
                while True:
                    os.write(fd, b"\0" * chunk)
    finally:
        os.close(fd)
    return filler


def test_a_full_disk_holds_scans_says_so_and_resumes_by_itself(
        tmp_path: Path, brokers: tuple[Mosquitto, Mosquitto], small_disk: Path) -> None:
    """No reserve (``min_free_disk_bytes = 0``): SQLite itself meets the full disk, in the
    inbox insert, the result's commit or a delivered row's delete."""
    n_before, n_full = 4, 12
    edge, cloud = brokers
    config = _init(tmp_path, edge, cloud, **{'state_dir = "state"':
                                             f'state_dir = "{small_disk}"',
                                             "min_free_disk_bytes = 67108864":
                                             "min_free_disk_bytes = 0"})
    paths = _scans(tmp_path, n_before + n_full)
    status = Recorder.start(cloud.url, "status", f"{NODE}/status")
    results = Recorder.start(cloud.url, "results", f"{NODE}/results")
    agent = spawn(["run", "--config", str(config)], tmp_path / "agent.log")
    try:
        agent.wait_for('"mqtt_connected"', 2)
        _send(config, *paths[:n_before])
        _until(lambda: len(_results(results)) >= n_before, "the first results")
        filler = _fill(small_disk)
        _send(config, *paths[n_before:])
        _until(lambda: any(_reason(s) == "disk_full" for s in _statuses(status)),
               "status backpressure.reason disk_full")
        time.sleep(1.0)  # stays so, and the agent stays up
        assert agent.proc.poll() is None
        during = len(_results(results))
        assert during < n_before + n_full
        filler.unlink()  # space returns
        _until(lambda: len(_results(results)) >= n_before + n_full, "every result")
        _until(lambda: _reason(_statuses(status)[-1]) is None, "backpressure over")
        assert not results.on("/errors")
        assert agent.terminate() == 0
    finally:
        agent.kill()
    db = sqlite3.connect(small_disk / "agent.db")
    assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    assert db.execute("SELECT COUNT(*) FROM outbox").fetchone() == (0,)
    db.close()
    print(f"full disk: sent {n_before + n_full}, delivered before the fill {n_before}, "
          f"while full {during}, at the end {len(_results(results))}, errors 0")


def test_the_edge_copy_of_the_status_says_when_the_cloud_broker_is_down_and_why(
        tmp_path: Path, brokers: tuple[Mosquitto, Mosquitto]) -> None:
    """A site engineer watching the edge broker sees the cloud link go and come back (in
    ``brokers``), within a beat of it, not at the next 15 s republish."""
    edge, cloud = brokers
    config = _init(tmp_path, edge, cloud)
    status = Recorder.start(edge.url, "status", f"{NODE}/status")
    agent = spawn(["run", "--config", str(config)], tmp_path / "agent.log")

    def cloud_link() -> dict[str, object]:
        found = _statuses(status)
        brokers_now = found[-1].get("brokers") if found else None
        return brokers_now.get("cloud", {}) if isinstance(brokers_now, dict) else {}

    try:
        agent.wait_for('"mqtt_connected"', 2)
        _until(lambda: cloud_link().get("connected") is True, "cloud connected in the status")
        cloud.proc.terminate()
        cloud.proc.wait(5)
        down = time.monotonic()
        _until(lambda: cloud_link().get("connected") is False, "cloud down in the status",
               timeout=10)
        assert time.monotonic() - down < 10  # the 15 s republish would be later
        agent.wait_for('"mqtt_unreachable"')
        _until(lambda: "connection refused" in str(cloud_link().get("error")),
               "the reason in the status", timeout=10)
        assert agent.terminate() == 0
    finally:
        agent.kill()
