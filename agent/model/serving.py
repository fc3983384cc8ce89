"""Load the model a config names and prove it fit to serve: the bundle (every digest), the
runtime (or ``auto``'s choice of runtime and precision) and the accuracy guard.

Used at start (a refusal stops the agent: exit 2) and on ``systemctl reload`` (a refusal
leaves the previous model serving: see ``agent.daemon.service``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from agent.backends import (
    RUNTIMES,
    BackendError,
    ModelRunner,
    RunnerOptions,
    open_runner,
    runner_options,
    runtime_installed,
)
from agent.config import ModelSection
from agent.log import get_logger
from agent.model.bundle import ModelBundle, load_bundle
from agent.model.guard import GuardFailed, GuardReport, check_guard, format_db, run_guard
from agent.model.guard_cause import REBUILD_FOR_CPU
from agent.model.select import Choice, candidate_files, choose_runner

log = get_logger("agent.model.serving")

BACKEND_CACHE = "backend-choice.json"  # under the state dir


@dataclass
class ServedModel:
    """A bundle open on a runtime that passed the guard."""

    bundle: ModelBundle
    runner: ModelRunner
    guard: GuardReport
    settings: ModelSection  # the [model] section it was loaded with
    selection: Choice | None = None  # backend = "auto" only
    # More sessions of the served file, one per further model worker (``model.workers``).
    extra_runners: tuple[ModelRunner, ...] = field(default=())

    @property
    def runners(self) -> tuple[ModelRunner, ...]:
        """One per model worker: the guarded runner first."""
        return (self.runner, *self.extra_runners)

    @property
    def runtime(self) -> str:
        return self.runner.runtime

    @property
    def precision(self) -> str:
        """The precision of the served file: the bundle's (int8), or fp32 where
        ``backend = "auto"`` found its fp32 reference faster on this CPU."""
        return self.selection.precision if self.selection else self.bundle.precision

    @property
    def digest(self) -> str:
        """sha256 of the served model file: the model half of every idempotency key."""
        return self.selection.digest if self.selection else self.bundle.digest(self.runtime)

    @property
    def context(self) -> int:
        """Neighbours each side the model needs (0: a 2D model)."""
        return self.bundle.input.context_slices

    def summary(self) -> dict[str, Any]:
        """The status message's ``model`` member."""
        providers = self.runner.describe().get("providers")  # onnxruntime only
        return {
            "name": self.bundle.name,
            "version": self.bundle.version,
            "digest": self.digest,
            "runtime": self.runtime,
            "precision": self.precision,
            "backend": self.settings.backend,  # "auto" or the configured runtime
            **({"providers": providers} if providers else {}),
            "context_slices": self.context,
            **({"selection": self.selection.summary()} if self.selection else {}),
            "workers": len(self.runners),
            "guard": self.guard.summary(),
        }

    def close(self) -> None:
        for runner in self.runners:
            runner.close()


def usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


def worker_count(settings: ModelSection) -> int:
    """``model.workers``, 0 resolved: two sessions where there are two cores to keep busy."""
    return settings.workers or (2 if usable_cpus() >= 2 else 1)


def _worker_options(settings: ModelSection, options: RunnerOptions) -> RunnerOptions:
    """With several workers and ``intra_op_threads = 0``, the cores are shared out."""
    workers = worker_count(settings)
    if workers > 1 and settings.intra_op_threads == 0:
        return replace(options, intra_op_threads=max(1, usable_cpus() // workers))
    return options


def _with_workers(model: ServedModel, path: Path, options: RunnerOptions) -> ServedModel:
    """Open a session of the served file for each further worker. An accelerator provider
    keeps one (the device runs one slice at a time anyway). The guard ran on the first
    session; the others run the same file on the same runtime with the same options."""
    providers = model.runner.describe().get("providers") or ["cpu"]
    extra: list[ModelRunner] = []
    if providers[0] == "cpu":
        try:
            for _ in range(worker_count(model.settings) - 1):
                extra.append(open_runner(model.runtime, str(path), options))
        except BaseException:
            for runner in (model.runner, *extra):
                runner.close()
            raise
    return replace(model, extra_runners=tuple(extra))


def load_model(settings: ModelSection, state_dir: Path) -> ServedModel:
    """Open ``settings.bundle`` on the configured runtime and run the guard.

    Raises ``BundleError`` (``GuardFailed`` when the guard refuses it) or ``BackendError``;
    nothing is left open when it raises."""
    bundle = load_bundle(settings.bundle)
    options = _worker_options(settings, runner_options(settings, bundle, state_dir))
    if settings.backend == "auto":
        # Every installed runtime x {int8, fp32} the bundle has a file for is guarded and
        # timed on the golden set; the fastest that passes serves (int8 on a tie). Cached per
        # model key, so a restart only re-runs the guard. Raises GuardFailed when none passes.
        runner, selection = choose_runner(bundle, options, state_dir / BACKEND_CACHE)
        path = candidate_files(bundle)[(selection.runtime, selection.precision)].path
        return _with_workers(ServedModel(bundle, runner, selection.guard, settings, selection),
                             path, options)
    path = bundle.backend_file(settings.backend).path
    runner = open_runner(settings.backend, str(path), options)
    try:  # never serve a model that misses its floor on this CPU
        guard = check_guard(bundle, runner)
    except GuardFailed as exc:
        runner.close()
        raise GuardFailed(_name_what_passes(bundle, exc.report, options)) from None
    except BaseException:
        runner.close()
        raise
    return _with_workers(ServedModel(bundle, runner, guard, settings), path, options)


def _name_what_passes(bundle: ModelBundle, report: GuardReport,
                      options: RunnerOptions) -> GuardReport:
    """The refusal of the configured runtime, its fix naming the other runtimes' int8 files
    that pass on this CPU (each guarded here; only on this failure path). A bundle that never
    passed keeps its fix: rebuild it."""
    if report.cause not in ("this_cpu", "unknown"):
        return report
    passing: list[tuple[str, str]] = []
    failing: list[tuple[str, str]] = []
    for runtime in RUNTIMES:
        if runtime == report.runtime or runtime not in bundle.backends:
            continue
        if not runtime_installed(runtime):
            continue
        try:
            runner = open_runner(runtime, str(bundle.backends[runtime].path), options)
        except BackendError as exc:
            log.info("guard_alternative_unavailable", runtime=runtime, error=str(exc))
            continue
        try:
            other = run_guard(bundle, runner)
        finally:
            runner.close()
        figure = f"{format_db(other.worst_psnr_db)} dB"
        (passing if other.ok else failing).append((runtime, figure))
    if passing:
        runtime, figure = passing[0]
        return report.with_fix(
            f'set model.backend = "{runtime}" (it passes on this CPU: {figure}) or "auto" '
            "(the fastest runtime x precision that passes here)")
    if failing and bundle.reference is not None:
        names = ", ".join(f"{rt} {f}" for rt, f in failing)
        return report.with_fix(
            f"no other runtime's int8 file passes on this CPU either ({names}): set "
            'model.backend = "auto" to serve the bundle\'s fp32 file where it passes, or '
            f"{REBUILD_FOR_CPU}")
    return report
