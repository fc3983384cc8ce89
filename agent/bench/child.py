"""Peak memory of one configuration, in a fresh process.

``measure_rss`` starts ``python -m agent.bench.child SPEC`` (SPEC: JSON). The child imports
numpy, notes its peak RSS (the interpreter's own share), opens the runner, runs a few
batches of one item, notes the peak again, runs the larger batch, notes it a third time and
prints the three figures as JSON.

Why not ``ru_maxrss``: on Linux a child's ``getrusage`` peak includes its parent's resident
set at fork time (the kernel carries the old memory map's high-water mark across
``execve``), so a child of a 400 MiB parent "peaks" at 400 MiB before it does anything.
``VmHWM`` in ``/proc/self/status`` belongs to the new memory map only; ``ru_maxrss`` is the
fallback where there is no /proc (macOS, where it is in bytes).
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import agent

CHILD_TIMEOUT_S = 300


@dataclass(frozen=True)
class RssFigures:
    before_load_mib: float  # interpreter + numpy + inputs, before the runtime is imported
    batch1_mib: float  # after loading the model and running batch 1
    batch_mib: float | None  # after also running the larger batch (None: it failed)
    batch: int
    source: str  # "VmHWM" or "ru_maxrss"


def peak_rss_mib() -> tuple[float, str]:
    """This process's peak resident set in MiB, and where the figure came from."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:  # noqa: PTH123 - hot, tiny
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024, "VmHWM"
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return (peak / 2**20 if sys.platform == "darwin" else peak / 1024), "ru_maxrss"


def child_main(spec: dict[str, Any]) -> dict[str, Any]:
    """What the child does (see the module docstring)."""
    import numpy as np

    from agent.backends import RunnerOptions, open_runner

    shape = tuple(int(d) for d in spec["item_shape"])
    batch = int(spec["batch"])
    x = np.random.default_rng(0).random((batch, *shape), dtype=np.float32)
    before, source = peak_rss_mib()
    runner = open_runner(spec["runtime"], spec["path"], RunnerOptions(
        intra_op_threads=int(spec["threads"]), input_name=spec["input_name"],
        output_name=spec["output_name"]))
    for _ in range(3):
        runner.run(x[:1])
    one, _ = peak_rss_mib()
    many: float | None = None
    try:  # a model with a fixed batch size may refuse the larger batch
        for _ in range(2):
            runner.run(x)
        many, _ = peak_rss_mib()
    except Exception:  # noqa: S110 - the batch-1 figure stands on its own
        pass
    runner.close()
    return {"before_load_mib": before, "batch1_mib": one, "batch_mib": many,
            "batch": batch, "source": source}


def measure_rss(runtime: str, path: Path, *, threads: int, batch: int,
                item_shape: tuple[int, ...], input_name: str,
                output_name: str) -> RssFigures:
    """Run one configuration in a fresh interpreter and return its peak RSS figures.
    Raises ``RuntimeError`` with the child's last error line when it fails."""
    spec = {"runtime": runtime, "path": str(path), "threads": threads, "batch": batch,
            "item_shape": list(item_shape), "input_name": input_name,
            "output_name": output_name}
    env = dict(os.environ)
    # The child imports the same `agent` as this process (a checkout may shadow the install).
    root = str(Path(agent.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    try:
        done = subprocess.run(
            [sys.executable, "-m", "agent.bench.child", json.dumps(spec)],
            capture_output=True, text=True, env=env, timeout=CHILD_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"the memory probe took over {CHILD_TIMEOUT_S} s") from None
    if done.returncode != 0:
        lines = [ln for ln in done.stderr.strip().splitlines() if ln.strip()]
        raise RuntimeError(lines[-1] if lines else f"exit status {done.returncode}")
    out = json.loads(done.stdout.strip().splitlines()[-1])
    return RssFigures(before_load_mib=float(out["before_load_mib"]),
                      batch1_mib=float(out["batch1_mib"]),
                      batch_mib=None if out["batch_mib"] is None else float(out["batch_mib"]),
                      batch=int(out["batch"]), source=str(out["source"]))


if __name__ == "__main__":
    print(json.dumps(child_main(json.loads(sys.argv[1]))))
