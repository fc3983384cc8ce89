"""Load the model a config names and prove it fit to serve: the bundle (every digest), the
runtime (or ``auto``'s choice of runtime and precision) and the accuracy guard.

Used at start (a refusal stops the agent: exit 2) and on ``systemctl reload`` (a refusal
leaves the previous model serving: see ``agent.daemon.service``).
"""

from __future__ import annotations

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
from agent.cpu import usable_cpus
from agent.log import get_logger
from agent.model.bundle import BundleError, ModelBundle, load_bundle
from agent.model.candidates import on_accelerator
from agent.model.guard import GuardFailed, GuardReport, check_guard, format_db, run_guard
from agent.model.guard_cause import REBUILD_FOR_CPU
from agent.model.select import (
    Choice,
    WorkerPlan,
    candidate_files,
    choose_runner,
    measure_medians,
    timing_inputs,
)

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
    workers_reason: str = ""  # why this many (``model.workers`` or its resolution)

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
            **({"workers_reason": self.workers_reason} if self.workers_reason else {}),
            "guard": self.guard.summary(),
        }

    def close(self) -> None:
        for runner in self.runners:
            runner.close()


WORKERS_MIN_MS = 10.0  # model.workers = 0: two workers for a model at least this slow
SHARE_BELOW_MS = 5.0  # ... and one worker on half the cores for a model under this


def served_ms(model: ServedModel) -> float:
    """The served runner's median batch-1 latency: ``auto``'s timing of its choice, else
    timed here on the golden inputs (a few runs: the guard has warmed it up)."""
    if model.selection is not None:
        for cand in model.selection.candidates:
            if cand.key == (model.selection.runtime, model.selection.precision) \
                    and cand.median_ms is not None:
                return float(cand.median_ms)
    key = (model.runtime, model.precision)
    return measure_medians({key: model.runner}, timing_inputs(model.bundle)[:2], 2)[key]


def worker_count(settings: ModelSection, model_ms: float | None,
                 accelerated: bool = False) -> tuple[int, str]:
    """``model.workers``, 0 resolved, and why. Two sessions pay where the model is the
    slowest stage: on the 2-core AVX2-kernel bench (lite int8 on onnxruntime, 12-16 ms) two
    1-thread sessions gave 1.13-1.26x the agent's throughput of one 2-thread session; with
    LiteRT's VNNI kernels (6.6 ms) 0.93-1.03x, as the agent's own work then bounds it.
    Below ``SHARE_BELOW_MS`` the one session gets a worker's share of the cores where they
    are shared out (``_on_a_share``, and ``auto``'s plan), so that the model and the
    agent's own work each have cores of their own. lite 1.1.0 on 2 cores, one 1-thread
    session against one 2-thread session: 1.07x (1.05-1.11) and 1.08x (1.04-1.13) the
    agent's throughput on LiteRT's VNNI kernels (3.6 ms on all cores, 6.6 on one), but
    0.96x (0.90-0.98) and 0.97x (0.93-1.11) on onnxruntime's AVX2 kernels (6.7 ms on all
    cores, 11 on one: the model's one thread became the slowest stage); two 1-thread
    sessions there 0.95x (0.91-1.06) of one 2-thread session, so between the two thresholds
    one session on all cores serves."""
    if settings.workers:
        return settings.workers, "model.workers in the config"
    if accelerated:
        return 1, "an accelerator serves the model"
    cpus = usable_cpus()
    if cpus < 2:
        return 1, "one core"
    if model_ms is None or model_ms < WORKERS_MIN_MS:
        return 1, (f"the model takes {model_ms or 0:.1f} ms per slice (< {WORKERS_MIN_MS:.0f} "
                   "ms): one worker, as beside a model this fast a second one does not pay")
    return 2, (f"the model takes {model_ms:.1f} ms per slice (>= {WORKERS_MIN_MS:.0f} ms): "
               f"two slices at once keep the {cpus} cores busier")


def worker_plan(workers: int = 0, intra_op_threads: int = 0) -> WorkerPlan | None:
    """How serving shares out the cores for the config's ``model.workers`` and
    ``model.intra_op_threads`` (defaults: what ``init`` writes; ``worker_count`` and
    ``_on_a_share``), for ``auto`` to rank its candidates on (``agent.model.select``): two
    workers of half the cores each for a model of ``WORKERS_MIN_MS`` or more on all cores,
    one such worker under ``SHARE_BELOW_MS``; None where every session gets the
    configured threads (a site's ``intra_op_threads``), where one worker serves whatever the
    model's speed (``workers = 1``), and on one core (a worker's share is all of it: the
    all-core ranking holds, however many workers)."""
    cpus = usable_cpus()
    if intra_op_threads or workers == 1 or cpus < 2:
        return None
    return WorkerPlan(workers=workers or 2, threads=max(1, cpus // (workers or 2)),
                      min_ms=0.0 if workers else WORKERS_MIN_MS,
                      share_below_ms=0.0 if workers else SHARE_BELOW_MS)


def _split_reason(model: ServedModel, selection: Choice) -> str:
    """Why ``auto``'s per-worker choice serves on ``selection.workers`` workers of
    ``selection.worker_threads`` threads: the plan it ranked under, applied to its fastest
    all-core median (``choose_runner``)."""
    threads = selection.worker_threads
    if selection.workers == 1:
        ranked = (f"auto ranked its candidates on {threads}-thread sessions, as that worker "
                  "runs them")
        return (f"auto's pick on all cores took {selection.plan_ms or 0:.1f} ms per slice (< "
                f"{SHARE_BELOW_MS:.0f} ms): one model worker, "
                f"{_ONE_ON_A_SHARE.format(threads, usable_cpus())}; {ranked}")
    ranked = (f"auto ranked its candidates on {threads}-thread sessions, as each of the "
              f"{selection.workers} workers runs them")
    if model.settings.workers:
        return f"model.workers in the config; {ranked}"
    if selection.plan_ms is None:  # a cache entry written before it kept the figure
        return f"the model takes {WORKERS_MIN_MS:.0f} ms or more per slice on all cores; {ranked}"
    return (f"auto's pick on all cores took {selection.plan_ms:.1f} ms per slice (>= "
            f"{WORKERS_MIN_MS:.0f} ms): two slices at once keep the {usable_cpus()} cores "
            f"busier; {ranked}")


# A fast model's one worker: its session's share of the cores, the rest for everything else.
_ONE_ON_A_SHARE = ("its session on {0} of the {1} cores, the others left to the agent's own "
                   "work (decode, derive, seal, delivery)")


def _with_workers(model: ServedModel, path: Path, options: RunnerOptions) -> ServedModel:
    """The served model with one session per model worker, each guarded.

    Where ``auto`` chose under a worker plan, its runner is already a session of a worker's
    share of the cores and becomes the first worker. Otherwise, with ``intra_op_threads =
    0``, each session gets the cores shared out, so the guarded all-core session is closed
    first (one session less at the peak) and the new ones replace it; an explicit thread
    count keeps it as the first worker. Where the further sessions cannot be had (one does
    not open or fails its guard), a single session serves and the status says why: with the
    cores shared out, one on all cores (opened and guarded again); with the site's thread
    count, the guarded one. Where ``auto`` found that no session of a worker's share
    passes (``Choice.unsplit``), its all-core session serves alone and none is tried.
    Nothing is left open when it raises."""
    # auto's choice under a worker plan (its runner a session of a worker's share), or None
    per_worker = model.selection if model.selection is not None \
        and model.selection.worker_threads is not None else None
    if model.selection is not None and model.selection.unsplit:
        # auto found that no session of a worker's share passes: further ones would not.
        return replace(model, workers_reason=f"{model.selection.unsplit}; one guarded "
                                             "session serves on all cores")
    timed: float | None = None
    try:
        if per_worker is not None:
            workers, why = per_worker.workers, _split_reason(model, per_worker)
        else:
            accelerated = on_accelerator(model.runner)
            timed = None if model.settings.workers or accelerated else served_ms(model)
            workers, why = worker_count(model.settings, timed, accelerated=accelerated)
    except BaseException:
        model.runner.close()
        raise
    split = model.settings.intra_op_threads == 0
    if workers == 1:
        # The plan auto would rank under (none with the site's threads or on one core) says
        # whether a fast model's one session moves to a worker's share of the cores.
        plan = worker_plan(intra_op_threads=model.settings.intra_op_threads)
        if per_worker is None and timed is not None and plan is not None and plan.applies(timed):
            return _on_a_share(model, path, options, why, plan.threads)  # all cores so far
        return replace(model, workers_reason=why)
    shared = replace(options, intra_op_threads=max(1, usable_cpus() // workers)) \
        if split else options
    if per_worker is not None:
        shared = replace(options, intra_op_threads=per_worker.worker_threads or 1)
    elif split:
        model.runner.close()
    runners, failure = _open_guarded(
        model, path, shared, workers,
        keep=(model.runner,) if per_worker is not None or not split else ())
    if not failure:
        log.info("model_workers", workers=workers, reason=why,
                 intra_op_threads=shared.intra_op_threads)
        return replace(model, runner=runners[0], extra_runners=tuple(runners[1:]),
                       workers_reason=why)
    log.warning("model_workers", workers=1, wanted=workers, reason=failure,
                fix="nothing to do: one guarded session serves")
    alone = f"{failure}; one guarded session serves"
    if not split:
        return replace(model, workers_reason=alone)
    if per_worker is not None:
        model.runner.close()  # a worker's share: one session gets all the cores again
        alone += " on all cores (auto had ranked the candidates per worker)"
    runner = open_runner(model.runtime, str(path), options)  # the all-core one, again
    try:
        guard = run_guard(model.bundle, runner, precision=model.precision)
        if not guard.ok:
            raise GuardFailed(guard)
    except BaseException:
        runner.close()
        raise
    # The status then says what serves: one worker on all cores, not auto's plan.
    selection = model.selection if per_worker is None else replace(
        per_worker, workers=1, worker_threads=None, plan_ms=None, guard=guard)
    return replace(model, runner=runner, guard=guard, selection=selection,
                   workers_reason=alone)


def _on_a_share(model: ServedModel, path: Path, options: RunnerOptions, why: str,
                threads: int) -> ServedModel:
    """A fast model's one session (under ``SHARE_BELOW_MS``, the cores shared out) on half
    the cores instead of all, so that the model keeps to its share while
    the agent's own work runs on the rest: a new session, guarded; where it cannot be had,
    the all-core one keeps serving and the status says why."""
    runners, failure = _open_guarded(model, path, replace(options, intra_op_threads=threads),
                                     1, keep=())
    if failure:
        return replace(model, workers_reason=f"{why}; {failure}: its all-core session serves")
    model.runner.close()
    why = f"{why}; {_ONE_ON_A_SHARE.format(threads, usable_cpus())}"
    log.info("model_workers", workers=1, reason=why, intra_op_threads=threads)
    return replace(model, runner=runners[0], workers_reason=why)


def _open_guarded(model: ServedModel, path: Path, options: RunnerOptions, workers: int,
                  keep: tuple[ModelRunner, ...]) -> tuple[list[ModelRunner], str]:
    """``keep`` plus further guarded sessions up to ``workers``, or ``([], why)`` with the
    further ones closed (``keep`` stays open) when one cannot be opened or fails its guard."""
    runners = list(keep)
    failure = ""
    try:
        while len(runners) < workers:
            runner = open_runner(model.runtime, str(path), options)
            runners.append(runner)
            report = run_guard(model.bundle, runner, precision=model.precision)
            if not report.ok:
                failure = f"a further session failed the guard: {report.reason}"
                break
    except BackendError as exc:
        failure = f"a further session could not be opened: {exc}"
    except BaseException:
        for runner in runners:
            runner.close()  # keep too: load_model leaves nothing open when it raises
        raise
    if failure:
        for runner in runners[len(keep):]:
            runner.close()
        return [], failure
    return runners, ""


def load_model(settings: ModelSection, state_dir: Path) -> ServedModel:
    """Open ``settings.bundle`` on the configured runtime and run the guard.

    Raises ``BundleError`` (``GuardFailed`` when the guard refuses it) or ``BackendError``;
    nothing is left open when it raises."""
    try:
        bundle = load_bundle(settings.bundle)
    except BundleError as exc:  # which bundle: the config may name several over time
        raise BundleError(f"model.bundle {settings.bundle}: {exc}") from None
    options = runner_options(settings, bundle, state_dir)
    if settings.backend == "auto":
        # Every installed runtime x {int8, fp32} the bundle has a file for is guarded and
        # timed on the golden set; the fastest that passes serves (int8 on a tie). Cached per
        # model key, so a restart only re-runs the guard. Raises GuardFailed when none passes.
        runner, selection = choose_runner(bundle, options, state_dir / BACKEND_CACHE,
                                          plan=worker_plan(settings.workers,
                                                           settings.intra_op_threads))
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
