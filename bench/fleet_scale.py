"""Fleet scale: N light nodes on one Mosquitto take one published bundle.

Each node is the agent's real update path in one process (``FleetUpdater``: its own MQTT
connection, ngclient refresh over retained messages, the chunked download, TUF's length and
sha256 check, safe unpacking, the strict bundle check, the ``current`` symlink switch) but
not the daemon: no model load or guard (that cost is per node and does not depend on the
fleet's size; see ``iomt-agent model verify``). The script starts its own Mosquitto on a
free loopback port, makes a fresh repository, starts the nodes, publishes, and reports the
time from the start of ``publish`` until each node reports ``active``, the bytes each node
took (metadata and target chunks), the total, and how many failed.

    python bench/fleet_scale.py [--nodes 50] [--bundle models/t1w-to-t2w-full] [--json OUT]

Needs Mosquitto (``make mosquitto``).
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from agent.config import BrokerConfig, FleetSection
from agent.fleet.publish import CHUNK_BYTES, publish
from agent.fleet.repo import init_repo
from agent.fleet.updater import FleetUpdater
from agent.log import configure

REPO = Path(__file__).resolve().parents[1]


def _mosquitto(work: Path) -> tuple[subprocess.Popen[bytes], int]:
    binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    conf = work / "mosquitto.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\nuser root\n"
                    "persistence false\nmax_queued_messages 100000\n")
    proc = subprocess.Popen([binary, "-c", str(conf)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return proc, port
        except OSError:
            time.sleep(0.05)
    raise SystemExit("mosquitto did not start")


def _activate_when_ready(nodes: list[FleetUpdater], stop: threading.Event,
                         done_at: dict[int, float]) -> None:
    """The daemon's part, minus the guard: take each candidate and make it current."""
    while not stop.is_set():
        for i, node in enumerate(nodes):
            candidate = node.take_candidate()
            if candidate is not None:
                node.activated(candidate)
                done_at[i] = time.monotonic()
        time.sleep(0.01)


def run(n: int, bundle: Path, timeout: float, chunk_kib: int) -> dict[str, object]:
    work = Path(tempfile.mkdtemp(prefix="fleet-scale-"))
    proc, port = _mosquitto(work)
    broker = BrokerConfig(url=f"mqtt://127.0.0.1:{port}")
    try:
        root = init_repo(work / "repo")
        nodes = [FleetUpdater(FleetSection(group="bench", root=root, check_interval_s=3600),
                              broker, f"bench-node-{i}", work / f"node-{i}")
                 for i in range(n)]
        for node in nodes:
            node.start()
        deadline = time.monotonic() + 30
        while not all(node.conn.connected for node in nodes) and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)  # the subscriptions land
        done_at: dict[int, float] = {}
        stop = threading.Event()
        watcher = threading.Thread(target=_activate_when_ready, args=(nodes, stop, done_at),
                                   daemon=True)
        watcher.start()
        started = time.monotonic()
        release = publish(work / "repo", bundle, "bench", broker,
                          chunk_bytes=chunk_kib * 1024, timeout=120)
        published = time.monotonic() - started
        while len(done_at) < n and time.monotonic() - started < timeout:
            time.sleep(0.05)
        stop.set()
        times = sorted(t - started for t in done_at.values())
        metadata = [sum(len(p) for p in node.cache._metadata.values()) for node in nodes]
        target = [node.fetcher.bytes_received for node in nodes]
        failed = [node.status() for i, node in enumerate(nodes) if i not in done_at]
        for node in nodes:
            node.stop()
        return {
            "nodes": n, "bundle": str(bundle), "target_bytes": len(release.target),
            "chunk_bytes": chunk_kib * 1024, "publish_s": round(published, 3),
            "first_active_s": round(times[0], 3) if times else None,
            "median_active_s": round(statistics.median(times), 3) if times else None,
            "all_active_s": round(times[-1], 3) if len(times) == n else None,
            "active": len(times), "failed": len(failed),
            "failures": [f.get("reason") for f in failed][:5],
            "bytes_per_node": {"metadata": max(metadata, default=0),
                               "target": max(target, default=0)},
            "bytes_total_to_nodes": sum(metadata) + sum(target),
        }
    finally:
        proc.terminate()
        proc.wait(10)
        shutil.rmtree(work, ignore_errors=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nodes", type=int, default=50)
    p.add_argument("--bundle", type=Path, default=REPO / "models" / "t1w-to-t2w-full")
    p.add_argument("--chunk-kib", type=int, default=CHUNK_BYTES // 1024)
    p.add_argument("--timeout", type=float, default=300.0)
    p.add_argument("--json", type=Path, help="also write the figures here")
    args = p.parse_args()
    configure("warning", "console")
    result = run(args.nodes, args.bundle, args.timeout, args.chunk_kib)
    for key, value in result.items():
        print(f"{key:>22}  {value}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0 if result["failed"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
