"""The measurements of ``iomt-agent bench``: configurations taking turns, and fidelity.

Timing: every configuration that is compared runs in this one process and they **take
turns**: in each round each runs once, and who goes first rotates from round to round, so
that a burst of load from another process hits them all alike (the machine this was
written on is shared with a training job). Each configuration runs twice untimed first
(allocations and thread pools on the first run are not the model's latency).

Fidelity follows the guard's convention (``agent.model.guard``): PSNR with the data range
L = max(ref) - min(0, min(ref)) over the whole reference set (1.0 when that is not
positive), and the figure that counts is the worst of the pooled PSNR and every per-input
PSNR; plus the largest absolute difference.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from agent.model.fidelity import data_range, worst_psnr

Floats = npt.NDArray[np.float32]
WARMUP_RUNS = 2


@dataclass(frozen=True)
class Latency:
    median_ms: float
    p95_ms: float
    min_ms: float
    runs: int
    threads: int


@dataclass(frozen=True)
class Throughput:
    threads: int
    batch: int
    items_per_s: float
    runs: int  # timed batches


@dataclass(frozen=True)
class Fidelity:
    psnr_db: float  # pooled
    worst_psnr_db: float  # min of pooled and per-input (what the guard gates)
    max_abs_error: float
    data_range: float
    reference: str  # what the outputs were compared with


def take_turns(tasks: Mapping[str, Callable[[int], object]], rounds: int,
               warmup: int = WARMUP_RUNS) -> dict[str, list[float]]:
    """Run every task once per round, rotating who goes first; seconds per call.

    A task gets the round number (to pick its input). ``warmup`` untimed calls each first,
    also taking turns."""
    order = list(tasks)
    for r in range(warmup):
        for key in order:
            tasks[key](r)
    seconds: dict[str, list[float]] = {key: [] for key in order}
    for r in range(rounds):
        shift = r % len(order) if order else 0
        for key in order[shift:] + order[:shift]:
            started = time.perf_counter()
            tasks[key](r)
            seconds[key].append(time.perf_counter() - started)
    return seconds


def latency(seconds: list[float], threads: int) -> Latency:
    """Median, p95 (linear interpolation) and minimum of batch-1 run times."""
    ms = np.asarray(seconds, dtype=np.float64) * 1000
    return Latency(median_ms=float(np.median(ms)), p95_ms=float(np.percentile(ms, 95)),
                   min_ms=float(ms.min()), runs=len(ms), threads=threads)


def throughput(seconds: list[float], threads: int, batch: int) -> Throughput:
    """Items per second from the median time of one batch."""
    return Throughput(threads=threads, batch=batch,
                      items_per_s=batch / statistics.median(seconds), runs=len(seconds))


def items(x: Floats, n: int) -> Floats:
    """A batch of ``n`` items drawn in turn from the inputs ``x`` [N, C, H, W]."""
    return np.ascontiguousarray(x[np.arange(n) % len(x)])


def fidelity(outputs: Floats, reference: Floats, label: str) -> Fidelity:
    """Compare outputs [N, ...] with reference outputs of the same shape (guard convention,
    see the module docstring). Non-finite outputs give -inf dB."""
    if outputs.shape != reference.shape:
        raise ValueError(f"outputs are {list(outputs.shape)}, the reference is "
                         f"{list(reference.shape)}")
    ref = reference.astype(np.float64)
    got = outputs.astype(np.float64)
    span = data_range(ref)
    if not np.all(np.isfinite(got)):
        return Fidelity(-math.inf, -math.inf, math.inf, span, label)
    pooled, worst = worst_psnr(got, ref, span)
    return Fidelity(psnr_db=pooled, worst_psnr_db=worst,
                    max_abs_error=float(np.max(np.abs(got - ref))), data_range=span,
                    reference=label)
