"""Benchmark: the agent end to end through Mosquitto, against a naive script and the raw backend.

Runs on one machine, everything on loopback:
  * two Mosquitto brokers (edge, cloud); the agent (``iomt-agent run``) and the naive script
    (``bench/naive_script.py``) as subprocesses, both running throughout on their own scan
    topics, and a subscriber on the cloud broker that timestamps each result;
  * READY: the agent is started twice with the same state dir; seconds from process start to
    its retained status ``online`` (the model is loaded and guarded before that), the second
    start with the runtime choice of ``backend = "auto"`` cached;
  * rounds taking turns (script, agent, raw backend; the order rotating round by round, so
    that no one always runs right after the same contestant): each contestant
    gets the same number of fresh DICOM slices (series at 256 x 256 / 1.0 mm and
    320 x 320 / 0.8 mm taking turns), published as fast as the broker takes them; throughput
    = slices / (first publish -> last result received). Ratios are taken round by round
    (back to back, so they share the machine's load) and reported as medians;
  * the agent's stage timings (its ``slice_processed`` log lines), CPU time per slice per
    process (with its decoder child) and per thread, and of the whole machine (brokers and
    this benchmark's publisher and subscriber included: on 2 cores a round is CPU-bound, so
    raw's machine CPU per slice over the agent round's bounds end to end / raw), RSS after
    all its rounds, and latency when paced at half its rate.
``--compare DIR`` adds a second agent contestant run from another checkout's ``agent``
package (``git archive COMMIT agent | tar -x -C DIR``): before/after in one run;
``--compare-threads N`` one with another ``model.intra_op_threads``, ``--compare-workers N``
one with another ``model.workers``.
Prints a table and writes JSON. Needs mosquitto (``make mosquitto``) and scipy (dev extra).

    python -m bench.e2e --slices 1000 --json bench-out/e2e.json
"""

from __future__ import annotations

import argparse
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
from agent.config import BrokerConfig, load_config
from agent.cpu import read_cpu
from agent.model.bundle import load_bundle
from agent.ops.scaffold import default_bundle
from agent.transport.mqtt import Connection
from bench import contestants, procs, report, rounds, slices
from bench.brokers import start_mosquitto
from bench.contestants import Entrant


def parse_args() -> argparse.Namespace:
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
    ap.add_argument("--compare", type=Path, default=None, metavar="DIR",
                    help="also run the agent package found in DIR (another checkout's)")
    ap.add_argument("--compare-threads", type=int, default=None, metavar="N",
                    help="also run an agent with model.intra_op_threads = N (with --compare: "
                    "that agent)")
    ap.add_argument("--agent-workers", type=int, default=None,
                    help="model.workers for the agent (default: what `iomt-agent init` writes)")
    ap.add_argument("--compare-workers", type=int, default=None, metavar="N",
                    help="also run an agent with model.workers = N (with --compare: that "
                    "agent)")
    ap.add_argument("--json", type=Path, default=Path("bench-out/e2e.json"))
    return ap.parse_args()


def paced_latency(agent: Entrant, source: Connection, sink: rounds.Sink,
                  payloads: list[bytes]) -> dict[str, float]:
    """Publish at half the agent's median end-to-end rate; p50/p95 publish -> result."""
    gap = 2.0 / agent.stats.median_rate()
    before = sink.count(agent.result_topic)
    sent = []
    for p in payloads:
        sent.append(time.perf_counter())
        source.publish(agent.scan_topic, p, qos=1)
        time.sleep(gap)
    sink.wait(agent.result_topic, before + len(payloads), timeout=60 + 2 * len(payloads))
    got = sink.arrivals(agent.result_topic)[before:]
    lat = [(g - s) * 1000 for g, s in zip(got, sent, strict=True)]
    return {"p50": float(np.percentile(lat, 50)), "p95": float(np.percentile(lat, 95)),
            "paced_at_slices_per_s": 1 / gap, "n": len(lat)}


def main() -> int:
    args = parse_args()
    per_round = max(1, args.slices // args.rounds)
    bundle = load_bundle(args.bundle)
    vols = slices.volumes()
    inputs = slices.model_inputs(vols, bundle)
    compare = (args.compare is not None or args.compare_threads is not None
               or args.compare_workers is not None)
    sites = {"agent": "bench", **({"agent (--compare)": "benchb"} if compare else {})}

    work = Path(tempfile.mkdtemp(prefix="iomt-bench-"))
    brokers = [start_mosquitto(work, name) for name in ("edge", "cloud")]
    (_, edge_url), (_, cloud_url) = brokers
    sink = rounds.Sink(cloud_url)
    for site in sites.values():
        sink.stream(contestants.result_topic(site), rounds.envelope_id)
        sink.status(contestants.status_topic(site))
    contestants.watch_naive(sink)
    entrants: list[Entrant] = []
    runner = None
    try:
        sink.start()
        for name, site in sites.items():
            entrants.append(contestants.launch_agent(
                name, work, site, edge_url, cloud_url, sink, bundle=args.bundle,
                backend=args.backend, code=args.compare if site != "bench" else None,
                threads=args.agent_threads if site == "bench" or args.compare_threads is None
                else args.compare_threads,
                workers=args.agent_workers if site == "bench" or args.compare_workers is None
                else args.compare_workers))
        agent = entrants[0]
        naive = contestants.launch_naive(work, edge_url, cloud_url, args.bundle)
        entrants.insert(0, naive)
        assert agent.config is not None
        model = load_config(agent.config).model
        runner = open_runner(agent.runtime, str(bundle.backend_file(agent.runtime).path),
                             runner_options(model, bundle))
        source = Connection(BrokerConfig(url=edge_url), "bench-source", name="edge")
        source.start()
        source.wait_connected(10)

        # Built before anything is timed, fresh UIDs for every slice of every round.
        batches = {e.name: [slices.payloads(vols, per_round) for _ in range(args.rounds)]
                   for e in entrants}
        for e in entrants:  # warm-up (not timed): first-call costs, the brokers' sessions
            e.round(source, slices.payloads(vols, 48), sink, timed=False)
        raw = report.Contestant()
        rounds.raw_round(runner, inputs, 5)  # warm-up
        threads_before = {e.name: procs.thread_cpu_s(e.child.pid) for e in entrants}
        def raw_turn() -> None:
            assert runner is not None
            c0 = procs.cpu_s(os.getpid())  # this process's other threads are idle meanwhile
            m0 = procs.machine_busy_s()
            raw.rounds.append(rounds.raw_round(runner, inputs, per_round))
            raw.cpu_s.append(procs.cpu_s(os.getpid()) - c0)
            raw.tree_cpu_s.append(raw.cpu_s[-1])
            raw.machine_cpu_s.append(procs.machine_busy_s() - m0)

        turns: list[Entrant | None] = [*entrants, None]  # None: the raw backend
        for i in range(args.rounds):
            # The order rotates round by round: on this machine the same agent ran about 5 %
            # faster second in a round than first (after the script), so no one keeps a seat.
            k = i % len(turns)
            for turn in turns[k:] + turns[:k]:
                if turn is None:
                    raw_turn()
                else:
                    turn.round(source, batches[turn.name][i], sink)
            print(f"round {i + 1}/{args.rounds}: " + ", ".join(
                f"{e.name} {e.stats.rounds[-1].rate:.1f}" for e in entrants)
                + f", raw {raw.rounds[-1].rate:.1f} slices/s", flush=True)
        for e in entrants:
            e.threads = report.thread_ms_per_slice(
                threads_before[e.name], procs.thread_cpu_s(e.child.pid), per_round * args.rounds)
        rss = {e.name: (e.done, *procs.rss_mb(e.child.pid)) for e in entrants}
        latency = (paced_latency(agent, source, sink, slices.payloads(vols, args.paced))
                   if args.paced else None)
        source.stop()
    finally:
        sink.stop()
        for e in entrants:
            e.child.stop()
        if runner is not None:
            runner.close()
        for proc, _ in brokers:
            proc.terminate()
        if os.environ.get("BENCH_KEEP"):
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)

    cpu = read_cpu()
    result: dict[str, Any] = {
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(),
                    "cpu_model": cpu.model, "isa": list(cpu.isa), "int8_dot": cpu.int8_dot},
        "model": {"name": bundle.name, "version": bundle.version},
        "backend": model.backend,
        "agent_runtime": agent.runtime,
        "agent_intra_op_threads": args.agent_threads,
        "agent_workers": args.agent_workers,
        "compare": {"code": str(args.compare) if args.compare else None,
                    "threads": args.compare_threads, "workers": args.compare_workers},
        "contestants": {e.name: {
            **e.stats.summary(),
            "threads_cpu_ms_per_slice": e.threads,
            "rss_mb": {"after_slices": rss[e.name][0], "now": rss[e.name][1],
                       "peak": rss[e.name][2]},
            **({"stages_ms": report.stage_medians(e.events), "ready_s": e.ready_s,
                "runtime": e.runtime} if e is not naive else {}),
        } for e in entrants},
        "raw_backend": raw.summary(),
        "agent_over_script": report.pairwise_ratio(agent.stats, naive.stats),
        "e2e_over_raw": report.pairwise_ratio(agent.stats, raw),
        "e2e_over_raw_cpu_bound": report.cpu_bound_ratio(agent.stats, raw),
        **({"agent_over_compare": report.pairwise_ratio(agent.stats, entrants[2].stats)}
           if compare else {}),
        "latency_ms": latency,
    }
    report.print_table(result)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2, default=str))
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
