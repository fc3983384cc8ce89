"""Inference helpers shared by the recipe steps: onnxruntime sessions, batched inference and
interleaved latency, for sessions and for the agent's runners (anything with ``run(x)``)."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

THREADS = 2
AVX2_KERNELS_TOOL = Path(__file__).resolve().parents[2] / "bench" / "avx2_kernels.py"


def make_session(path: Path, threads: int = THREADS) -> ort.InferenceSession:
    """CPU session as the agent runs it: fixed intra-op threads, no idle spinning (two
    sessions used in turn in one process otherwise slow each other down)."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


def predict(sess: ort.InferenceSession, inputs: np.ndarray, batch: int = 8) -> np.ndarray:
    """Run [N, 1, H, W] float32 inputs through a session in batches."""
    outs = [
        sess.run(["output"], {"input": inputs[i : i + batch].astype(np.float32)})[0]
        for i in range(0, len(inputs), batch)
    ]
    return np.concatenate(outs)


def interleaved_latency_ms(
    sessions: dict[str, ort.InferenceSession],
    sample: np.ndarray,
    runs: int = 40,
    warmup: int = 5,
) -> dict[str, float]:
    """Median batch-1 latency per session (ms), the sessions taking turns so that machine
    noise hits them alike."""
    x = sample[None, None].astype(np.float32) if sample.ndim == 2 else sample[:1]
    times: dict[str, list[float]] = {name: [] for name in sessions}
    for i in range(warmup + runs):
        for name, sess in sessions.items():
            t0 = time.perf_counter()
            sess.run(["output"], {"input": x})
            if i >= warmup:
                times[name].append((time.perf_counter() - t0) * 1000)
    return {name: round(statistics.median(t), 2) for name, t in times.items()}


def run_batched(runner: Any, x: np.ndarray, batch: int = 8) -> np.ndarray:
    """Run [N, C, H, W] inputs through one of the agent's runners in batches."""
    return np.concatenate([runner.run(x[i : i + batch]) for i in range(0, len(x), batch)])


def runner_times_ms(runners: dict[str, Any], sample: np.ndarray, runs: int,
                    warmup: int) -> dict[str, list[float]]:
    """Batch-1 latencies (ms) of each of the agent's runners, the runners taking turns so
    that machine noise hits them alike."""
    times: dict[str, list[float]] = {name: [] for name in runners}
    for i in range(warmup + runs):
        for name, runner in runners.items():
            t0 = time.perf_counter()
            runner.run(sample)
            if i >= warmup:
                times[name].append((time.perf_counter() - t0) * 1000)
    return times


def json_on_avx2_kernels(module_args: list[str], out: Path, cwd: Path | None = None
                         ) -> tuple[Any, str]:
    """Run ``python -m <module_args>`` under bench/avx2_kernels.py (the runtimes on their
    AVX2 kernels) and read the JSON it writes to ``out``; (None, why) when the kernels cannot
    be forced here or the child fails."""
    proc = subprocess.run([sys.executable, str(AVX2_KERNELS_TOOL), "--", sys.executable, "-m",
                           *module_args], cwd=cwd, capture_output=True, text=True, check=False)
    if proc.returncode != 0 or not out.exists():
        return None, (proc.stderr.strip().splitlines() or ["no output"])[-1]
    return json.loads(out.read_text(encoding="utf-8")), ""
