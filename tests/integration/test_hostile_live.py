"""The hostile corpus (tests/fuzz/corpus.py) through the running agent between two real
Mosquitto brokers: no crash, no hang, RSS bounded, every payload acked by the agent and
answered (a result or an error report).

The suite sends a seeded subset (every family in it); ``make hostile`` sends all 10,000
(``IOMT_HOSTILE_N=10000``). The figures go to stdout and, with ``IOMT_HOSTILE_JSON``, to a
JSON file.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest

from agent.config import BrokerConfig
from agent.transport.mqtt import Connection
from tests.conftest import Mosquitto
from tests.fuzz import corpus
from tests.integration.harness import REFERENCE_BUNDLE, Recorder, cli, spawn

pytestmark = pytest.mark.integration

NODE = "iomt/site-a/node-1"
N = int(os.environ.get("IOMT_HOSTILE_N", "150"))
RSS_BOUND = 1536 * 1024 * 1024  # daemon and decoder process, each (peak)


def _payloads(n: int) -> dict[str, tuple[int, bytes]]:
    """sha256 -> (corpus index, payload): distinct payloads only, so that each error
    report names exactly one."""
    if n >= corpus.SIZE:
        return corpus.distinct(n)
    out: dict[str, tuple[int, bytes]] = {}
    for i in corpus.sample(n):
        p = corpus.payload(i)
        out.setdefault(hashlib.sha256(p).hexdigest(), (i, p))
    return out


def _peak_rss(pid: int) -> int:
    with Path(f"/proc/{pid}/status").open(encoding="ascii") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def test_every_hostile_payload_is_acked_and_answered_and_the_agent_stays_up(
        tmp_path: Path, mosquitto_factory: Callable[[str], Mosquitto]) -> None:
    edge, cloud = mosquitto_factory("edge"), mosquitto_factory("cloud")
    r = cli("init", str(tmp_path / "node"), "--edge-url", edge.url, "--cloud-url", cloud.url,
            "--site", "site-a", "--device-id", "node-1", "--bundle", str(REFERENCE_BUNDLE))
    assert r.returncode == 0, r.stderr
    config = tmp_path / "node" / "agent.toml"
    config.write_text(config.read_text().replace('format = "auto"', 'format = "json"')
                      .replace('backend = "auto"', 'backend = "onnxruntime"')
                      .replace("timeout_s = 10.0", "timeout_s = 2.0")
                      .replace("memory_bytes = 1073741824", "memory_bytes = 536870912"))
    payloads = _payloads(N)
    out = Recorder.start(cloud.url, "out", f"{NODE}/+")
    agent = spawn(["run", "--config", str(config)], tmp_path / "agent.log")
    daemon = psutil.Process(agent.proc.pid)
    peaks = {"daemon": 0, "decoder": 0}  # RSS sampled every 0.1 s over the whole run
    sampling = threading.Event()

    def sample() -> None:
        while not sampling.wait(0.1):
            with contextlib.suppress(psutil.Error):
                peaks["daemon"] = max(peaks["daemon"], daemon.memory_info().rss)
                for c in daemon.children():
                    peaks["decoder"] = max(peaks["decoder"], c.memory_info().rss)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        agent.wait_for('"mqtt_connected"', 2)
        [child] = daemon.children()  # the decoder process
        gateway = Connection(BrokerConfig(url=edge.url), "gateway", name="gw")
        gateway.start()
        assert gateway.wait_connected(10)
        acked = threading.Semaphore(0)
        t0 = time.monotonic()
        for _sha, (_i, p) in payloads.items():
            gateway.publish("iomt/site-a/scans/gw", p, qos=1, on_done=lambda _v: acked.release())
        assert all(acked.acquire(timeout=120) for _ in payloads)
        gateway.stop()
        deadline = time.monotonic() + 60 + 0.5 * len(payloads)

        def answered() -> int:
            return len(out.on("/results")) + len(out.on("/errors"))

        while answered() < len(payloads):
            assert agent.proc.poll() is None, agent.text()[-3000:]
            assert time.monotonic() < deadline, (
                f"{answered()} of {len(payloads)} answered:\n{agent.text()[-3000:]}")
            time.sleep(0.2)
        elapsed = time.monotonic() - t0
        time.sleep(0.5)
        reports = [json.loads(m.payload) for m in out.on("/errors")]
        results = out.on("/results")
        assert len(results) + len(reports) == len(payloads)  # one answer each, no more
        assert {r["payload_sha256"] for r in reports} <= set(payloads)
        assert len({r["payload_sha256"] for r in reports}) == len(reports)
        peak_daemon = _peak_rss(agent.proc.pid)  # the kernel's high-water mark
        sampling.set()
        assert agent.terminate() == 0
        time.sleep(0.3)
    finally:
        agent.kill()
    last = json.loads(out.on("/status")[-1].payload)
    assert last["state"] == "offline"
    assert last["processed"] + last["failed"] == len(payloads)
    assert peak_daemon < RSS_BOUND and peaks["decoder"] < RSS_BOUND
    reasons = Counter(str(r["reason"]) for r in reports)
    families = Counter(corpus.family(i) for i, _ in payloads.values())
    restarts = sum(1 for e in agent.events("decode_budget_exceeded")
                   if e.get("event") == "decode_budget_exceeded")
    figures = {
        "payloads": len(payloads), "results": len(results), "error_reports": len(reports),
        "reasons": dict(reasons), "families": dict(families),
        "decoder_restarts": restarts, "first_decoder_pid": child.pid,
        "peak_rss_daemon_mib": round(peak_daemon / 2**20, 1),
        "max_sampled_rss_daemon_mib": round(peaks["daemon"] / 2**20, 1),
        "max_sampled_rss_decoder_mib": round(peaks["decoder"] / 2**20, 1),
        "seconds": round(elapsed, 1),
    }
    print(json.dumps(figures, indent=1))
    if os.environ.get("IOMT_HOSTILE_JSON"):
        Path(os.environ["IOMT_HOSTILE_JSON"]).write_text(json.dumps(figures, indent=1))
