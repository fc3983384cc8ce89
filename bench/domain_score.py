"""What the domain-shift score costs per slice: ``DomainReference.score`` (statistics of the
normalised input and the model output, Mahalanobis distance) and the whole serving check
(``DomainCheck.judge``: score, series median, counters), on the shipped demo slab against
the shipped lite bundle's ``domain.json``, with the lite model's real outputs. Also timed
alongside for scale: ``normalise`` (the preprocessing every slice gets anyway).

The three take turns slice by slice so that a shared machine's noise falls on all alike;
reported are medians and 90th percentiles in microseconds, and the CPU.

    python bench/domain_score.py [--rounds 20] [--clock wall|cpu] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from agent.backends import RunnerOptions, open_runner  # noqa: E402
from agent.config_domain import DomainSection  # noqa: E402
from agent.daemon.domain_check import DomainCheck  # noqa: E402
from agent.demo.sample_series import load_demo_slab  # noqa: E402
from agent.model.bundle import load_bundle  # noqa: E402
from agent.model.preprocess import normalise  # noqa: E402

BUNDLE = ROOT / "models" / "t1w-to-t2w-lite"


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="wall: perf_counter; cpu: this thread's CPU time (less sensitive "
                        "to other processes on a shared machine)")
    args = parser.parse_args()
    bundle = load_bundle(BUNDLE)
    assert bundle.domain is not None, "the lite bundle has no domain.json"
    reference = bundle.domain
    raw = load_demo_slab().t1.astype(np.float32)
    xs = [normalise(s, bundle.input.normalisation) for s in raw]
    runner = open_runner("onnxruntime", str(bundle.backend_file("onnxruntime").path),
                         RunnerOptions(1))
    ys = [runner.run(x[None, None])[0, 0] for x in xs]
    runner.close()
    check = DomainCheck(reference, DomainSection())
    clock = time.perf_counter if args.clock == "wall" else time.thread_time
    times: dict[str, list[float]] = {"score": [], "judge": [], "normalise": []}
    for r in range(args.rounds + 1):
        for i, (s, x, y) in enumerate(zip(raw, xs, ys, strict=True)):
            t0 = clock()
            reference.score(x, y)
            t1 = clock()
            check.judge(x, y, f"series-{i % 3}", "s")
            t2 = clock()
            normalise(s, bundle.input.normalisation)
            t3 = clock()
            if r:  # the first round warms caches
                times["score"].append((t1 - t0) * 1e6)
                times["judge"].append((t2 - t1) * 1e6)
                times["normalise"].append((t3 - t2) * 1e6)
    cpu = cpu_name()
    us = {k: {"median": round(statistics.median(v), 1),
              "p90": round(float(np.percentile(v, 90)), 1)} for k, v in times.items()}
    result = {"cpu": cpu, "clock": args.clock, "load_average": list(os.getloadavg()),
              "cores": os.cpu_count(), "slices": len(times["score"]),
              "grid": list(xs[0].shape), "us": us}
    print(f"CPU: {cpu} ({result['cores']} cores); {result['slices']} slices, "
          f"{xs[0].shape[0]} x {xs[0].shape[1]} model grid; clock {args.clock}, load average "
          f"{os.getloadavg()[0]:.1f}")
    print(f"{'step':12s} {'median us':>10s} {'p90 us':>10s}")
    for k, v in us.items():
        print(f"{k:12s} {v['median']:10.1f} {v['p90']:10.1f}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
