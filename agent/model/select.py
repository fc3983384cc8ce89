"""``backend = "auto"``: serve the bundle on the fastest installed runtime x precision that
passes the guard, and remember the choice.

The candidates are every runtime the bundle has a file for and whose library is
installed, each in two precisions: the served files (``bundle.json`` ``backends``:
``onnxruntime`` -> ``model.int8.onnx``, ``litert`` -> ``model.int8.tflite``) and the fp32
references (``reference`` -> ``model.fp32.onnx`` for onnxruntime, ``references.litert`` ->
``model.fp32.tflite``). An fp32 bundle has only its served files. ``choose_runner``:

1. opens each candidate's runner (a file the runtime cannot load drops out, with the reason);
2. runs the guard on it (``agent.model.guard.run_guard``, the fp32 files too): a candidate whose
   outputs miss the bundle's fidelity floor is never chosen, however fast;
3. times the survivors on the bundle's golden inputs, batch of one, the candidates taking
   turns round by round so that machine noise hits them alike (inputs of the contract's
   shape when the bundle has no golden set);
4. keeps the one with the lowest median latency, int8 winning a tie within
   ``TIE_MARGIN`` (``agent.model.choice.pick``), and says why in one sentence
   (``explain``: where fp32 wins, how much faster and what about this CPU makes it so);
5. under a ``WorkerPlan`` that applies (the cores shared out: several model workers for a
   model at least the plan's ``min_ms`` slow on all cores, or one worker on a worker's
   share for a model under its ``share_below_ms``, the other cores left to the agent's own
   work), guards and times the survivors again on sessions of one worker's share and
   ranks them on that, since runtimes scale differently over the cores; the chosen
   session is handed back as the first worker.

int8 is expected to win; on a CPU without int8 dot products (AVX2 without VNNI, a
Cortex-A72) an fp32 file can be faster, and then it serves, and the status, the log line
and ``iomt-agent bench`` say so.

The choice is cached (``agent.model.choice_cache``; the caller gives the path, under the
agent's state dir) keyed by the bundle's model key: the sha256 of its model files'
digests taken together, so that replacing any of them starts a new selection. An entry
also records the precision, the thread count, the runtimes that were installed, the CPU
it was timed on (``agent.cpu``'s label: model and ISA) and the plan; a change in any of
the last four starts a new selection (a state directory moved to another board is timed
again), as does a per-worker choice whose session now runs on an accelerator (no plan
applies where any candidate does). On a
cache hit only the cached candidate is opened, and the guard still runs on it: if it now
fails (or the runtime cannot open the file) the entry is dropped and every candidate is
tried again.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from agent.backends import (
    RUNTIMES,
    BackendError,
    ModelRunner,
    RunnerOptions,
    open_runner,
    runtime_installed,
)
from agent.cpu import CpuInfo, read_cpu
from agent.log import get_logger
from agent.model.bundle import BundleFile, ModelBundle
from agent.model.candidates import (
    Timer,
    candidate_files,
    guard_candidates,
    measure_medians,
    on_accelerator,
    servable_digests,
    timing_inputs,
)
from agent.model.choice import (
    TIE_MARGIN,
    Candidate,
    Choice,
    Key,
    WorkerPlan,
    explain,
    explain_for_workers,
    label,
    pick,
)
from agent.model.choice_cache import forget, read_cache, remember
from agent.model.guard import GuardFailed, GuardReport, run_guard
from agent.model.guard_cause import REBUILD, REBUILD_FOR_CPU

log = get_logger("agent.model.select")

DEFAULT_ROUNDS = 5
# Under a plan, only candidates this close to the fastest on all cores are timed again as a
# worker runs them: on the AVX2 kernels the per-worker figures reordered candidates within
# 1.65x of one another (LiteRT int8 1.80x slower on 1 thread than on 2, onnxruntime fp32 1.09x).
PLAN_WITHIN = 2.0

__all__ = ["DEFAULT_ROUNDS", "TIE_MARGIN", "Candidate", "Choice", "Timer", "WorkerPlan",
           "candidate_files", "choose_runner", "measure_medians", "model_key",
           "servable_digests", "timing_inputs"]


def model_key(bundle: ModelBundle) -> str:
    """The cache key: sha256 over the digests of the bundle's model files (served and
    fp32 references) and of its golden set and floor."""
    lines = [f"{rt}={f.sha256}" for rt, f in sorted(bundle.backends.items())]
    if bundle.reference is not None:
        lines.append(f"reference={bundle.reference.sha256}")
    lines += [f"reference.{rt}={f.sha256}" for rt, f in sorted(bundle.references.items())]
    if bundle.golden is not None:
        lines.append(f"golden={bundle.golden.sha256}:{bundle.golden.min_psnr_db:g}")
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def nothing_passes_fix(reports: Iterable[GuardReport]) -> str:
    """What to do when no candidate passes: rebuild the bundle, for this CPU where the
    int8 files passed where it was built."""
    causes = {r.cause for r in reports}
    if causes & {"fp32_mismatch", "never_passed"} or "this_cpu" not in causes:
        return REBUILD
    return (f"the int8 files passed where the bundle was built and no fp32 file serves: "
            f"{REBUILD_FOR_CPU}")


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def _options(bundle: ModelBundle, options: RunnerOptions) -> RunnerOptions:
    return replace(options, input_name=bundle.input.input_name,
                   output_name=bundle.output.output_name)


def _read_cpu() -> CpuInfo | None:
    try:
        return read_cpu()
    except Exception:  # the CPU reading only words the reason; never fail a selection on it
        return None


def cpu_label(cpu: CpuInfo | None) -> str:
    """The CPU a cached choice was timed on: its label names the ISA the kernels use (and
    "AVX2 kernels forced" under ``bench/avx2_kernels.py``)."""
    return cpu.label if cpu is not None else "unknown CPU"


def _plan_dict(plan: WorkerPlan | None) -> dict[str, Any] | None:
    return plan.as_dict() if plan is not None else None


def _from_cache(bundle: ModelBundle, options: RunnerOptions, cache_path: Path, key: str,
                files: dict[Key, BundleFile], installed: list[str],
                cpu: str, plan: WorkerPlan | None) -> tuple[ModelRunner, Choice] | None:
    entry = read_cache(cache_path).get(key)
    if not isinstance(entry, dict):
        return None
    if entry.get("plan", "none recorded") != _plan_dict(plan):
        # Chosen for another share of the cores (model.workers, the cores this process
        # may use), or before the cache kept it: the ranking may differ.
        log.info("backend_cache_other_plan", model=bundle.name,
                 cached_for=entry.get("plan", "none recorded"), plan=_plan_dict(plan))
        return None
    if "cpu" not in entry:  # written before the cache kept the CPU: timed once again
        log.info("backend_cache_without_cpu", model=bundle.name, cpu=cpu)
        return None
    if entry["cpu"] != cpu:
        # The state directory moved to another board (a Pi 4's card in a Pi 5) or the
        # kernels changed: the ranking timed there says nothing here.
        log.info("backend_cache_other_cpu", model=bundle.name, cached_on=entry["cpu"],
                 cpu=cpu)
        return None
    cand = (str(entry.get("runtime")), str(entry.get("precision")))
    if (cand not in files or cand[0] not in installed
            or entry.get("threads") != options.intra_op_threads
            or sorted(entry.get("installed", [])) != sorted(installed)):
        return None
    split = plan is not None and entry.get("worker_threads") == plan.threads
    opened = replace(options, intra_op_threads=plan.threads) if split and plan else options
    try:
        runner = open_runner(cand[0], str(files[cand].path), opened)
    except BackendError as exc:
        log.warning("backend_cache_stale", model=bundle.name, candidate=label(cand),
                    error=str(exc))
        forget(cache_path, key)
        return None
    if split and on_accelerator(runner):
        # Ranked per worker on the CPU; an accelerator serves now (onnxruntime-gpu added).
        runner.close()
        log.info("backend_cache_other_plan", model=bundle.name, cached_for=entry["plan"],
                 plan="an accelerator serves: one worker")
        return None
    report = run_guard(bundle, runner, precision=cand[1])
    if not report.ok:
        runner.close()
        log.warning("backend_cache_stale", model=bundle.name, candidate=label(cand),
                    error=report.reason)
        forget(cache_path, key)
        return None
    try:
        candidates = tuple(Candidate.from_dict(c) for c in entry.get("candidates", []))
    except (KeyError, TypeError):
        candidates = ()
    choice = Choice(runtime=cand[0], precision=cand[1], digest=files[cand].sha256,
                    model_key=key, threads=options.intra_op_threads, cached=True,
                    candidates=candidates, reason=str(entry.get("reason", "")),
                    guard=report, chosen_at=str(entry.get("chosen_at", "")),
                    workers=int(entry.get("workers") or 1) if split else 1,
                    worker_threads=plan.threads if split and plan else None,
                    plan_ms=entry.get("plan_ms") if split else None,
                    unsplit="" if split else str(entry.get("unsplit") or ""))
    return runner, choice


def _for_workers(bundle: ModelBundle, options: RunnerOptions, plan: WorkerPlan,
                 files: dict[Key, BundleFile], all_core: dict[Key, ModelRunner],
                 candidates: dict[Key, Candidate], reports: dict[Key, GuardReport],
                 timer: Timer | None, rounds: int,
                 ) -> tuple[dict[Key, ModelRunner], dict[Key, GuardReport]]:
    """Close the all-core sessions, open and guard the survivors on ``plan.threads``
    threads and time them there (``candidates`` gain ``worker_ms``; one that fails on such a
    session drops out with the reason). Returns the sessions that pass and their reports."""
    for runner in all_core.values():
        runner.close()  # one session per candidate at the peak, not two
    shared = replace(options, intra_op_threads=plan.threads)
    installed = [rt for rt, _ in all_core]
    runners, failed, split_reports = guard_candidates(
        bundle, shared, {c: files[c] for c in all_core}, installed)
    for cand, why in failed.items():
        candidates[cand] = replace(why, reason=f"on a {plan.threads}-thread session: "
                                               f"{why.reason}",
                                   median_ms=candidates[cand].median_ms)
    if not runners:
        return runners, {**reports, **split_reports}
    try:
        per_worker = (timer or measure_medians)(runners, timing_inputs(bundle), max(1, rounds))
    except Exception:
        for runner in runners.values():
            runner.close()
        raise
    for cand in runners:
        candidates[cand] = replace(candidates[cand], worker_ms=round(per_worker[cand], 3),
                                   worst_psnr_db=split_reports[cand].worst_psnr_db)
    return runners, {**reports, **split_reports}


def choose_runner(
    bundle: ModelBundle,
    options: RunnerOptions,
    cache_path: Path | None = None,
    *,
    runtimes: tuple[str, ...] | None = None,
    rounds: int = DEFAULT_ROUNDS,
    timer: Timer | None = None,
    cpu: CpuInfo | None = None,
    plan: WorkerPlan | None = None,
) -> tuple[ModelRunner, Choice]:
    """Open the bundle on the fastest installed runtime x precision that passes the guard.

    ``runtimes`` narrows the candidates (default: every runtime in ``RUNTIMES``); ``timer``
    replaces the timing (``measure_medians``) and ``cpu`` the reading of this CPU (used for
    the reason when fp32 wins), for tests. With a ``plan`` that applies to the fastest
    all-core median (not on an accelerator), the survivors are guarded and timed again on
    sessions of ``plan.threads`` threads and ranked on those; the choice then says
    ``workers``/``worker_threads`` and the runner handed back is such a session. Returns
    the open runner (the caller closes it) and the choice. Raises ``GuardFailed`` when
    candidates ran the golden set but none reached the floor (the report of the closest
    one, its reason naming every candidate's), ``BackendError`` when none could open its
    model at all."""
    options = _options(bundle, options)
    files = candidate_files(bundle, runtimes or RUNTIMES)
    if not files:
        raise BackendError(
            f"bundle {bundle.name} has no file for any runtime this agent knows "
            f"({', '.join(runtimes or RUNTIMES)}); it has: {', '.join(sorted(bundle.backends))}"
        )
    installed = [rt for rt in dict.fromkeys(k[0] for k in files) if runtime_installed(rt)]
    key = model_key(bundle)
    this_cpu = cpu if cpu is not None else _read_cpu()
    if cache_path is not None:
        hit = _from_cache(bundle, options, cache_path, key, files, installed,
                          cpu_label(this_cpu), plan)
        if hit is not None:
            log.info("backend_selected", model=bundle.name, **hit[1].summary())
            return hit

    runners, candidates, reports = guard_candidates(bundle, options, files, installed)
    if not runners:
        why = "; ".join(f"{label(c.key)}: {c.reason}" for c in candidates.values())
        if reports:  # every candidate that could open its model missed the floor
            closest = max(reports.values(), key=lambda r: r.worst_psnr_db or -math.inf)
            fix = nothing_passes_fix(reports.values())
            raise GuardFailed(replace(closest, fix=fix, reason=(
                f"no runtime serves {bundle.name} {bundle.version} within its fidelity "
                f"floor on this CPU: {why}: {fix}")))
        raise BackendError(f"no runtime can serve {bundle.name} {bundle.version}: {why}")

    try:
        medians = (timer or measure_medians)(runners, timing_inputs(bundle), max(1, rounds))
    except Exception:
        for runner in runners.values():
            runner.close()
        raise
    # Ranked on the figures the candidates keep (and the status shows), so that they
    # reproduce the choice: unrounded, a tie within TIE_MARGIN could read otherwise.
    medians = {cand: round(ms, 3) for cand, ms in medians.items()}
    chosen = pick(medians, bundle.precision)
    providers = runners[chosen].describe().get("providers") or ["cpu"]
    accelerator = None if providers[0] == "cpu" else f"onnxruntime's {providers[0]} provider"
    # Any candidate on an accelerator: one worker serves (a per-worker ranking could pick
    # it, and threads say nothing about it), so the plan is not applied.
    any_accelerated = any(on_accelerator(r) for r in runners.values())
    for cand in runners:
        candidates[cand] = Candidate(cand[0], cand[1], True, "passes the guard, slower",
                                     median_ms=medians[cand],
                                     worst_psnr_db=reports[cand].worst_psnr_db)
    plan_ms = medians[chosen]
    unsplit = ""
    # Under a plan that applies the candidates are ranked as a worker's session runs them:
    # plan.workers sessions for a model at least plan.min_ms slow on all cores, one for a
    # model under plan.share_below_ms (the other cores left to the agent's own work).
    split = plan is not None and not any_accelerated and plan.applies(plan_ms)
    workers = plan.workers_for(plan_ms) if plan is not None else 1
    if split and plan is not None:
        for cand in [c for c in runners if medians[c] > PLAN_WITHIN * medians[chosen]]:
            runners.pop(cand).close()  # a first start on a slow board: time only contenders
            candidates[cand] = replace(candidates[cand], reason=(
                f"passes the guard, over {PLAN_WITHIN:g}x slower on all cores: not timed "
                "as a worker runs it"))
        retimed = ", ".join(label(c) for c in runners)
        runners, reports = _for_workers(bundle, options, plan, files, runners, candidates,
                                        reports, timer, rounds)
        if runners:
            chosen = pick({c: candidates[c].worker_ms or math.inf for c in runners},
                          bundle.precision)
        else:  # no session of a worker's share passed: one all-core session serves
            split = False
            unsplit = f"no {plan.threads}-thread session of {retimed} passed the guard"
            runners, _, reports = guard_candidates(bundle, options, {chosen: files[chosen]},
                                                   installed)
            if not runners:
                if chosen in reports:
                    raise GuardFailed(reports[chosen])
                raise BackendError(f"{label(chosen)} could not be opened again on all cores")
            candidates[chosen] = replace(candidates[chosen], ok=True)
    for cand, runner in runners.items():
        if cand == chosen:
            candidates[cand] = replace(candidates[cand], reason="chosen")
        else:
            runner.close()
    ordered = tuple(candidates[c] for c in files)
    if split and plan is not None:
        reason = explain_for_workers(chosen, list(ordered), bundle.precision,
                                     replace(plan, workers=workers), this_cpu)
    else:
        reason = explain(chosen, list(ordered), bundle.precision, this_cpu, accelerator)
    choice = Choice(runtime=chosen[0], precision=chosen[1], digest=files[chosen].sha256,
                    model_key=key, threads=options.intra_op_threads, cached=False,
                    candidates=ordered, reason=reason, guard=reports[chosen],
                    chosen_at=_now(), workers=workers if split else 1,
                    worker_threads=plan.threads if split and plan else None,
                    plan_ms=plan_ms if split else None, unsplit=unsplit)
    if cache_path is not None:
        entry: dict[str, Any] = {
            "runtime": chosen[0], "precision": chosen[1], "reason": reason,
            "threads": options.intra_op_threads, "installed": installed,
            "cpu": cpu_label(this_cpu), "plan": _plan_dict(plan), "workers": choice.workers,
            "worker_threads": choice.worker_threads, "plan_ms": choice.plan_ms,
            "unsplit": unsplit,
            "chosen_at": choice.chosen_at, "bundle": bundle.name, "version": bundle.version,
            "candidates": [c.as_dict() for c in ordered]}
        remember(cache_path, key, entry)
    # Loud where int8 did not pay: the site engineer sees it in journalctl.
    say = log.info if chosen[1] == bundle.precision else log.warning
    say("backend_selected", model=bundle.name, **choice.summary())
    return runners[chosen], choice
