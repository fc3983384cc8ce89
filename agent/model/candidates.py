"""The candidates of ``backend = "auto"`` (``agent.model.select``): which files the bundle
offers to each runtime x precision, opening and guarding them, and timing the survivors.

Kept apart from the choosing (what wins, what is cached): serving
(``agent.model.serving``) times the served model with the same ``measure_medians`` when it
resolves ``model.workers``.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import numpy as np
import numpy.typing as npt

from agent.backends import (
    INSTALL_HINTS,
    RUNTIMES,
    BackendError,
    ModelRunner,
    RunnerOptions,
    open_runner,
)
from agent.model.bundle import BundleFile, ModelBundle
from agent.model.choice import FP32, Candidate, Key
from agent.model.guard import FLOAT_PRECISIONS, GuardReport, load_golden, run_guard

Floats = npt.NDArray[np.float32]
# (runners by candidate, inputs, rounds) -> median batch-1 ms by candidate
Timer = Callable[[dict[Key, ModelRunner], Floats, int], dict[Key, float]]


def candidate_files(bundle: ModelBundle,
                    runtimes: tuple[str, ...] = RUNTIMES) -> dict[Key, BundleFile]:
    """Every runtime x precision the bundle has a file for, in preference order: the
    served precision first, then fp32 (none for an fp32 bundle: its served files are)."""
    served = bundle.precision
    files = {(rt, served): bundle.backends[rt] for rt in runtimes if rt in bundle.backends}
    if served.lower() not in FLOAT_PRECISIONS:
        for rt in runtimes:
            ref = bundle.reference_file(rt)
            if ref is not None:
                files[(rt, FP32)] = ref
    return files


def servable_digests(bundle: ModelBundle) -> set[str]:
    """The digests of every file ``auto`` may serve: a consumer that predicts result ids
    (the demo, the e2e bench) accepts the id of whichever it chose."""
    return {f.sha256 for f in candidate_files(bundle).values()}


def timing_inputs(bundle: ModelBundle) -> Floats:
    """What candidates are timed on: the golden inputs, else seeded ones of the contract's
    shape."""
    if bundle.golden is not None:
        x, _ref = load_golden(bundle)
        return x
    channels = bundle.input_channels
    rng = np.random.default_rng(0)
    return rng.random((2, channels, *bundle.input.shape), dtype=np.float32)


def measure_medians(runners: dict[Key, ModelRunner], x: Floats, rounds: int) -> dict[Key, float]:
    """Median batch-1 latency (ms) per runner over ``rounds`` passes of the inputs (the
    default ``Timer``)."""
    times: dict[Key, list[float]] = {k: [] for k in runners}
    order = list(runners)
    for r in range(rounds):
        for key in order[r % len(order):] + order[: r % len(order)]:  # rotate who goes first
            runner = runners[key]
            for i in range(len(x)):
                t0 = time.perf_counter()
                runner.run(x[i : i + 1])
                times[key].append((time.perf_counter() - t0) * 1000)
    return {k: statistics.median(t) for k, t in times.items()}


def on_accelerator(runner: ModelRunner) -> bool:
    """Whether the session runs on an accelerator provider (onnxruntime's first provider
    is not the CPU's); LiteRT's sessions name none and run on the CPU."""
    return bool((runner.describe().get("providers") or ["cpu"])[0] != "cpu")


def guard_candidates(
    bundle: ModelBundle, options: RunnerOptions, files: dict[Key, BundleFile],
    installed: list[str],
) -> tuple[dict[Key, ModelRunner], dict[Key, Candidate], dict[Key, GuardReport]]:
    """Open and guard every candidate: the runners that pass, the rest's reasons."""
    out: dict[Key, Candidate] = {}
    reports: dict[Key, GuardReport] = {}
    runners: dict[Key, ModelRunner] = {}
    for cand, file in files.items():
        rt, precision = cand
        if rt not in installed:
            out[cand] = Candidate(rt, precision, False, f"not installed ({INSTALL_HINTS[rt]})")
            continue
        try:
            runner = open_runner(rt, str(file.path), options)
        except BackendError as exc:
            out[cand] = Candidate(rt, precision, False, f"cannot load the model: {exc}")
            continue
        report = run_guard(bundle, runner, precision=precision)
        reports[cand] = report
        if report.ok:
            runners[cand] = runner
        else:
            runner.close()
            # Without the report's fix: it would point at `auto`, which is choosing now.
            why = "; ".join(t for t in (report.shortfall, report.explanation) if t)
            out[cand] = Candidate(rt, precision, False, why or report.reason,
                                  worst_psnr_db=report.worst_psnr_db)
    return runners, out, reports
