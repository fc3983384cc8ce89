"""Benchmark: raw backend throughput vs end-to-end throughput through Mosquitto.

Runs in one process tree on one machine:
  * raw: the reference model on onnxruntime, one slice at a time, same thread settings as
    the agent (measured before and after the end-to-end phase, A/B);
  * end to end: two Mosquitto brokers, the agent as a subprocess, N DICOM slices published
    as fast as the broker takes them; a subscriber on the cloud broker timestamps each sealed
    result (publish -> sealed result received);
  * latency: a paced phase at half the measured end-to-end rate, p50/p95;
  * the agent's RSS after the flood.
Prints a table and writes JSON. Needs mosquitto (``make test`` installs it).

    python bench/e2e.py --slices 1000 --json bench-out/e2e.json
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pydicom

from agent.backends import RunnerOptions, open_runner
from agent.backends.select import servable_digests
from agent.bundle import load_bundle
from agent.config import BrokerConfig
from agent.derive import result_message_id
from agent.mqtt import Connection, Message
from agent.preprocess import normalise, to_model_grid
from agent.sample_series import build_series, load_demo_slab
from agent.scaffold import InitOptions, default_bundle, write_directory
from agent.seal import peek_header
from agent.topics import Topics


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_mosquitto(workdir: Path, name: str) -> tuple[subprocess.Popen[bytes], str]:
    binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    port = free_port()
    conf = workdir / f"{name}.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\n"
                    "max_queued_messages 1000000\nmax_inflight_messages 0\n")
    proc = subprocess.Popen([binary, "-c", str(conf)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            time.sleep(0.05)
    return proc, f"mqtt://127.0.0.1:{port}"


def raw_throughput(bundle_dir: Path, inputs: list[np.ndarray], threads: int, n: int) -> float:
    bundle = load_bundle(bundle_dir)
    runner = open_runner("onnxruntime", str(bundle.backend_file("onnxruntime").path),
                         RunnerOptions(intra_op_threads=threads,
                                       input_name=bundle.input.input_name,
                                       output_name=bundle.output.output_name))
    for x in inputs[:5]:
        runner.run(x)
    t0 = time.perf_counter()
    for i in range(n):
        runner.run(inputs[i % len(inputs)])
    return n / (time.perf_counter() - t0)


def rss_mb(pid: int) -> tuple[float, float]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slices", type=int, default=1000)
    ap.add_argument("--paced", type=int, default=200, help="slices in the latency phase")
    ap.add_argument("--raw", type=int, default=300, help="slices per raw phase")
    ap.add_argument("--bundle", type=Path, default=default_bundle())
    ap.add_argument("--json", type=Path, default=Path("bench-out/e2e.json"))
    ap.add_argument("--agent-threads", type=int, default=0,
                    help="model.intra_op_threads for the agent (raw is always measured at 0 = "
                    "one per core, the runtime's best)")
    args = ap.parse_args()

    slab = load_demo_slab()
    bundle = load_bundle(args.bundle)
    grids = [to_model_grid(sl.astype(np.float32), (1.0, 1.0), bundle.input)[0]
             for sl in slab.t1]
    k = bundle.input.context_slices  # a 2.5D model: each slice with its neighbours
    inputs = []
    for i in range(len(grids)):
        stack = np.stack([grids[min(max(i + d, 0), len(grids) - 1)] for d in range(-k, k + 1)])
        inputs.append(normalise(stack, bundle.input.normalisation)[None])

    work = Path(tempfile.mkdtemp(prefix="iomt-bench-"))
    edge, edge_url = start_mosquitto(work, "edge")
    cloud, cloud_url = start_mosquitto(work, "cloud")
    agent = None
    try:
        config_path = write_directory(InitOptions(work / "node", edge_url, cloud_url,
                                                  site="bench", device_id="node-1",
                                                  bundle=args.bundle))
        text = config_path.read_text().replace('format = "auto"', 'format = "json"')
        text = text.replace("intra_op_threads = 0", f"intra_op_threads = {args.agent_threads}")
        config_path.write_text(text)
        threads = 0

        raw_a = raw_throughput(args.bundle, inputs, threads, args.raw)

        # Payloads with fresh UIDs for every slice.
        payloads: list[bytes] = []
        while len(payloads) < args.slices + args.paced:
            payloads += build_series(slab.t1)
        payloads = payloads[: args.slices + args.paced]
        # backend = "auto" (what init writes) picks the served file at start: a result is
        # counted under its slice's id for the first digest, whichever file served it.
        digests = sorted(servable_digests(bundle))
        sops = [str(pydicom.dcmread(io.BytesIO(p), stop_before_pixels=True).SOPInstanceUID)
                for p in payloads]
        ids = [result_message_id(sop, digests[0]) for sop in sops]
        alias = {result_message_id(sop, d): mid for sop, mid in zip(sops, ids, strict=True)
                 for d in digests}

        arrived: dict[str, float] = {}
        lock = threading.Lock()
        topics = Topics("bench", "node-1")

        def on_result(msg: Message) -> None:
            mid = peek_header(msg.payload).message_id
            mid = alias.get(mid, mid)
            with lock:
                arrived.setdefault(mid, time.perf_counter())

        sink = Connection(BrokerConfig(url=cloud_url), "bench-sink", name="cloud",
                          subscriptions=(topics.results_filter(),), on_message=on_result)
        sink.start()
        sink.wait_connected(10)
        log = (work / "agent.log").open("wb")
        agent = subprocess.Popen([sys.executable, "-m", "agent", "run", "--config",
                                  str(config_path)], stdout=log, stderr=subprocess.STDOUT)
        while (work / "agent.log").read_text().count("mqtt_connected") < 2:
            time.sleep(0.1)
        source = Connection(BrokerConfig(url=edge_url), "bench-source", name="edge")
        source.start()
        source.wait_connected(10)

        def wait_for(keys: list[str], timeout: float) -> None:
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                with lock:
                    if all(k in arrived for k in keys):
                        return
                time.sleep(0.05)
            raise SystemExit(f"only {sum(k in arrived for k in keys)} of {len(keys)} arrived")

        # Flood phase: throughput.
        flood = payloads[: args.slices]
        sent_at: dict[str, float] = {}
        t0 = time.perf_counter()
        for p, mid in zip(flood, ids[: args.slices], strict=True):
            sent_at[mid] = time.perf_counter()
            source.publish(topics.scan("bench"), p, qos=1)
        wait_for(ids[: args.slices], timeout=args.slices * 2.0)
        t_end = max(arrived[m] for m in ids[: args.slices])
        e2e = args.slices / (t_end - t0)
        rss, hwm = rss_mb(agent.pid)

        # Paced phase: latency at half the end-to-end rate.
        gap = 2.0 / e2e
        paced_ids = ids[args.slices :]
        for p, mid in zip(payloads[args.slices :], paced_ids, strict=True):
            sent_at[mid] = time.perf_counter()
            source.publish(topics.scan("bench"), p, qos=1)
            time.sleep(gap)
        wait_for(paced_ids, timeout=60)
        lat = [(arrived[m] - sent_at[m]) * 1000 for m in paced_ids]
        source.stop()
        sink.stop()
        agent.send_signal(signal.SIGTERM)
        agent.wait(30)
        agent = None
        raw_b = raw_throughput(args.bundle, inputs, threads, args.raw)
    finally:
        if agent is not None:
            agent.kill()
        for proc in (edge, cloud):
            proc.terminate()
        shutil.rmtree(work, ignore_errors=True)

    raw = statistics.mean([raw_a, raw_b])
    result = {
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(),
                    "processor": platform.processor()},
        "model": {"name": bundle.name, "version": bundle.version, "digest": bundle.digest()},
        "slices": args.slices,
        "agent_intra_op_threads": args.agent_threads,
        "raw_slices_per_s": {"before": raw_a, "after": raw_b, "mean": raw},
        "e2e_slices_per_s": e2e,
        "e2e_over_raw": e2e / raw,
        "latency_ms": {"p50": float(np.percentile(lat, 50)), "p95": float(np.percentile(lat, 95)),
                       "paced_at_slices_per_s": 1 / gap, "n": len(lat)},
        "agent_rss_mb_after_flood": rss,
        "agent_peak_rss_mb": hwm,
    }
    rows = [
        ("raw backend (slices/s, before / after)", f"{raw_a:.1f} / {raw_b:.1f}"),
        (f"end to end, {args.slices} slices (slices/s)", f"{e2e:.1f}"),
        ("end to end / raw", f"{e2e / raw:.2f}"),
        (f"latency p50 / p95 at {1 / gap:.1f} slices/s (ms)",
         f"{result['latency_ms']['p50']:.0f} / {result['latency_ms']['p95']:.0f}"),
        ("agent RSS after flood / peak (MB)", f"{rss:.0f} / {hwm:.0f}"),
    ]
    width = max(len(r[0]) for r in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
