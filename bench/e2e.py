"""Benchmark: the agent end to end through Mosquitto, against a naive script and the raw backend.

Runs on one machine, everything on loopback:
  * two Mosquitto brokers (edge, cloud); the agent (``iomt-agent run``) and the naive script
    (``bench/naive_script.py``) as subprocesses, both running throughout on their own scan
    topics, and a subscriber on the cloud broker that timestamps each result;
  * READY: the agent is started twice with the same state dir; seconds from process start to
    its retained status ``online`` (the model is loaded and guarded before that), the second
    start with the runtime choice of ``backend = "auto"`` cached;
  * rounds taking turns (script, agent, raw backend, script, agent, ...): each contestant
    gets the same number of fresh DICOM slices (series at 256 x 256 / 1.0 mm and
    320 x 320 / 0.8 mm taking turns), published as fast as the broker takes them; throughput
    = slices / (first publish -> last result received). Ratios are taken round by round
    (back to back, so they share the machine's load) and reported as medians;
  * the agent's stage timings (its ``slice_processed`` log lines), CPU time per slice per
    process and per thread, RSS after all its rounds, and latency when paced at half its rate.
Prints a table and writes JSON. Needs mosquitto (``make mosquitto``) and scipy (dev extra).

    python -m bench.e2e --slices 1000 --json bench-out/e2e.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from agent.backends import open_runner, runner_options
from agent.bundle import load_bundle
from agent.config import BrokerConfig, load_config
from agent.cpu import read_cpu
from agent.mqtt import Connection
from agent.scaffold import InitOptions, default_bundle, write_directory
from agent.topics import Topic, Topics
from bench import procs, report, rounds, slices
from bench.brokers import start_mosquitto

NAIVE_SCANS, NAIVE_RESULTS = "bench/naive/scans/x", "bench/naive/results"


def configure(work: Path, edge_url: str, cloud_url: str, args: argparse.Namespace) -> Path:
    """An ``iomt-agent init`` directory, logging JSON, with the benchmark's model settings."""
    config = write_directory(InitOptions(work / "node", edge_url, cloud_url, site="bench",
                                         device_id="node-1", bundle=args.bundle))
    text = config.read_text().replace('format = "auto"', 'format = "json"')
    text = text.replace("intra_op_threads = 0", f"intra_op_threads = {args.agent_threads}")
    if args.backend:
        lines = [f'backend = "{args.backend}"' if ln.startswith("backend = ") else ln
                 for ln in text.splitlines()]
        text = "\n".join(lines) + "\n"
    config.write_text(text)
    return config


def start_ready(config: Path, log: Path, sink: rounds.Sink) -> tuple[procs.Child, float]:
    """Start the agent; returns it and the seconds until its status said online."""
    agent = procs.start_agent(config, log)
    online = sink.wait_online(after=agent.started, timeout=120)
    return agent, online - agent.started


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slices", type=int, default=1000, help="slices per contestant in all")
    ap.add_argument("--rounds", type=int, default=5, help="rounds per contestant")
    ap.add_argument("--paced", type=int, default=200, help="slices in the latency phase")
    ap.add_argument("--bundle", type=Path, default=default_bundle())
    ap.add_argument("--backend", choices=("onnxruntime", "litert", "auto"), default=None,
                    help="model.backend for the agent (default: what `iomt-agent init` writes)")
    ap.add_argument("--agent-threads", type=int, default=0,
                    help="model.intra_op_threads for the agent and the raw backend (0 = one "
                    "per core)")
    ap.add_argument("--json", type=Path, default=Path("bench-out/e2e.json"))
    args = ap.parse_args()
    per_round = max(1, args.slices // args.rounds)

    bundle = load_bundle(args.bundle)
    vols = slices.volumes()
    inputs = slices.model_inputs(vols, bundle)
    # Built before anything is timed, with fresh UIDs for every slice of every round.
    batches = {who: [slices.payloads(vols, per_round) for _ in range(args.rounds)]
               for who in ("naive", "agent")}
    warmup = {who: slices.payloads(vols, 48) for who in ("naive", "agent")}
    paced = slices.payloads(vols, args.paced)

    work = Path(tempfile.mkdtemp(prefix="iomt-bench-"))
    brokers = [start_mosquitto(work, name) for name in ("edge", "cloud")]
    (_, edge_url), (_, cloud_url) = brokers
    topics = Topics("bench", "node-1")
    sink = rounds.Sink(cloud_url, topics.status)
    sink.stream(str(topics.results), rounds.envelope_id)
    numbers = itertools.count()  # every raw array is a new result: nothing to tell apart
    sink.stream(NAIVE_RESULTS, lambda _m: str(next(numbers)))
    children: list[procs.Child] = []
    runner = None
    try:
        sink.start((topics.results_filter(), topics.status, Topic(NAIVE_RESULTS)))
        config = configure(work, edge_url, cloud_url, args)
        log = work / "agent.log"
        first, ready_first = start_ready(config, log, sink)
        first.stop()
        first.mark_log()  # the second start's lines only
        agent, ready_second = start_ready(config, log, sink)
        children.append(agent)
        starting = agent.events("agent_starting")[0]
        naive = procs.start_naive(edge_url, cloud_url, args.bundle, "bench/naive/scans/#",
                                  NAIVE_RESULTS, work / "naive.log")
        children.append(naive)
        model = load_config(config).model
        runner = open_runner(starting["runtime"],
                             str(bundle.backend_file(starting["runtime"]).path),
                             runner_options(model, bundle))
        source = Connection(BrokerConfig(url=edge_url), "bench-source", name="edge")
        source.start()
        source.wait_connected(10)
        scan_topic = str(topics.scan("bench"))

        # Warm-up (not timed): first-call costs, page cache, the brokers' sessions.
        rounds.flood(source, NAIVE_SCANS, warmup["naive"], sink, NAIVE_RESULTS)
        rounds.flood(source, scan_topic, warmup["agent"], sink, str(topics.results))
        agent_done = len(warmup["agent"])

        res = {"naive": report.Contestant(), "agent": report.Contestant(),
               "raw": report.Contestant()}
        events: list[dict[str, Any]] = []
        threads_before = procs.thread_cpu_s(agent.pid)
        for i in range(args.rounds):
            c0 = procs.cpu_s(naive.pid)
            res["naive"].rounds.append(rounds.flood(source, NAIVE_SCANS, batches["naive"][i],
                                                    sink, NAIVE_RESULTS))
            res["naive"].cpu_s.append(procs.cpu_s(naive.pid) - c0)
            agent.mark_log()
            c0 = procs.cpu_s(agent.pid)
            res["agent"].rounds.append(rounds.flood(source, scan_topic, batches["agent"][i],
                                                    sink, str(topics.results)))
            res["agent"].cpu_s.append(procs.cpu_s(agent.pid) - c0)
            agent_done += per_round
            time.sleep(0.3)  # the last slice's log line
            events += agent.events("slice_processed")
            res["raw"].rounds.append(rounds.raw_round(runner, inputs, per_round))
            print(f"round {i + 1}/{args.rounds}: script {res['naive'].rounds[-1].rate:.1f}, "
                  f"agent {res['agent'].rounds[-1].rate:.1f}, "
                  f"raw {res['raw'].rounds[-1].rate:.1f} slices/s", flush=True)
        threads = report.thread_ms_per_slice(threads_before, procs.thread_cpu_s(agent.pid),
                                             agent.pid, per_round * args.rounds)
        rss, peak = procs.rss_mb(agent.pid)

        latency = None
        if args.paced:  # latency at half the agent's end-to-end rate
            gap = 2.0 / res["agent"].median_rate()
            sent = []
            target = sink.count(str(topics.results))
            for p in paced:
                sent.append(time.perf_counter())
                source.publish(scan_topic, p, qos=1)
                time.sleep(gap)
            sink.wait(str(topics.results), target + len(paced), timeout=60 + 2 * len(paced))
            got = sink.arrivals(str(topics.results))[target:]
            lat = [(g - s) * 1000 for g, s in zip(got, sent, strict=True)]
            latency = {"p50": float(np.percentile(lat, 50)), "p95": float(np.percentile(lat, 95)),
                       "paced_at_slices_per_s": 1 / gap, "n": len(lat)}
        source.stop()
    finally:
        sink.stop()
        for child in children:
            child.stop()
        if runner is not None:
            runner.close()
        for proc, _ in brokers:
            proc.terminate()
        shutil.rmtree(work, ignore_errors=True)

    cpu = read_cpu()
    result: dict[str, Any] = {
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(),
                    "cpu_model": cpu.model, "isa": list(cpu.isa), "int8_dot": cpu.int8_dot},
        "model": {"name": bundle.name, "version": bundle.version},
        "backend": model.backend,
        "agent_runtime": starting["runtime"],
        "agent_intra_op_threads": args.agent_threads,
        "naive_script": res["naive"].summary(),
        "agent": res["agent"].summary(),
        "raw_backend": res["raw"].summary(),
        "agent_over_script": report.pairwise_ratio(res["agent"], res["naive"]),
        "e2e_over_raw": report.pairwise_ratio(res["agent"], res["raw"]),
        "agent_stages_ms": report.stage_medians(events),
        "agent_thread_ms_per_slice": threads,
        "agent_rss": {"rss_mb": rss, "peak_mb": peak, "after_slices": agent_done},
        "ready_s": {"first": ready_first, "second": ready_second,
                    "second_cached": starting.get("runtime_cached")},
        "latency_ms": latency,
    }
    report.print_table(result)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2, default=str))
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
