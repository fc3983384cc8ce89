"""``backend = "auto"``: serve the bundle on the fastest installed runtime that passes the
guard, and remember the choice.

For each runtime the bundle has a file for (``bundle.json`` ``backends``: ``onnxruntime``
-> ``model.int8.onnx``, ``litert`` -> ``model.int8.tflite``) and whose library is
installed, ``choose_runner``:

1. opens the runner (a file the runtime cannot load drops out, with the reason);
2. runs the int8 guard on it (``agent.guard.run_guard``): a runtime whose outputs miss the
   bundle's fidelity floor is never chosen, however fast;
3. times the survivors on the bundle's golden inputs, batch of one, the runtimes taking
   turns round by round so that machine noise hits them alike (inputs of the contract's
   shape when the bundle has no golden set);
4. keeps the one with the lowest median latency; one within ``TIE_MARGIN`` of it that comes
   earlier in ``RUNTIMES`` wins the tie, so that noise does not flip the choice.

The choice is cached in a JSON file (the caller gives its path, under the agent's state
dir) keyed by the bundle's model digest: the sha256 of its backend files taken together,
so that replacing any of them starts a new selection. An entry also records the thread
count and the runtimes that were installed; a change in either starts a new selection. On
a cache hit only the cached runtime is opened, and the guard still runs on it: if it now
fails (or the runtime cannot open the file) the entry is dropped and all runtimes are
tried again.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import statistics
import time
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from agent.backends import (
    INSTALL_HINTS,
    RUNTIMES,
    BackendError,
    ModelRunner,
    RunnerOptions,
    open_runner,
    runtime_installed,
)
from agent.bundle import ModelBundle
from agent.guard import GuardFailed, GuardReport, load_golden, run_guard
from agent.log import get_logger

log = get_logger("agent.backends.select")

CACHE_FORMAT = 1
CACHE_MAX_ENTRIES = 16
TIE_MARGIN = 0.05  # a runtime this much slower than the fastest still wins if preferred
DEFAULT_ROUNDS = 5


@dataclass(frozen=True)
class Candidate:
    """One runtime's result in a selection."""

    runtime: str
    ok: bool
    reason: str
    median_ms: float | None = None
    worst_psnr_db: float | None = None

    def as_dict(self) -> dict[str, Any]:
        db = self.worst_psnr_db
        psnr: float | str | None = db
        if db is not None:
            psnr = round(db, 3) if math.isfinite(db) else (None if math.isnan(db) else "inf")
        return {"runtime": self.runtime, "ok": self.ok, "reason": self.reason,
                "median_ms": self.median_ms, "worst_psnr_db": psnr}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Candidate:
        psnr = d.get("worst_psnr_db")
        return cls(runtime=str(d["runtime"]), ok=bool(d["ok"]), reason=str(d["reason"]),
                   median_ms=d.get("median_ms"),
                   worst_psnr_db=math.inf if psnr == "inf" else psnr)


@dataclass(frozen=True)
class Choice:
    """What ``choose_runner`` picked and why (for status and logs)."""

    runtime: str
    model_key: str  # the cache key: digest of the bundle's backend files
    threads: int
    cached: bool  # True: taken from the cache, only the guard ran
    candidates: tuple[Candidate, ...]
    guard: GuardReport = field(repr=False)  # the chosen runner's guard report
    chosen_at: str = ""

    def summary(self) -> dict[str, Any]:
        """JSON-safe, for the status message and the selection log line."""
        return {
            "mode": "auto",
            "runtime": self.runtime,
            "cached": self.cached,
            "chosen_at": self.chosen_at,
            "model_key": self.model_key[:16],
            "candidates": [c.as_dict() for c in self.candidates],
        }


def model_key(bundle: ModelBundle) -> str:
    """The cache key: sha256 over the bundle's backend files' digests (and golden set's)."""
    lines = [f"{rt}={f.sha256}" for rt, f in sorted(bundle.backends.items())]
    if bundle.golden is not None:
        lines.append(f"golden={bundle.golden.sha256}:{bundle.golden.min_psnr_db:g}")
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


# -- the cache ----------------------------------------------------------------------------
def _read_cache(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        log.warning("backend_cache_unreadable", path=str(path), error=str(exc),
                    fix="it is rebuilt; nothing to do")
        return {}
    if not isinstance(data, dict) or data.get("format") != CACHE_FORMAT:
        return {}
    entries = data.get("choices")
    return entries if isinstance(entries, dict) else {}


def _write_cache(path: Path, entries: dict[str, Any]) -> None:
    # The newest entries only: a device that cycles through many models keeps a small file.
    newest = sorted(entries.items(), key=lambda kv: str(kv[1].get("chosen_at", "")))
    kept = dict(newest[-CACHE_MAX_ENTRIES:])
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"format": CACHE_FORMAT, "choices": kept}, indent=2) + "\n",
                   encoding="utf-8")
    tmp.replace(path)


def _forget(path: Path, key: str) -> None:
    entries = _read_cache(path)
    if entries.pop(key, None) is not None:
        with contextlib.suppress(OSError):
            _write_cache(path, entries)


# -- selection ----------------------------------------------------------------------------
def _options(bundle: ModelBundle, options: RunnerOptions) -> RunnerOptions:
    return replace(options, input_name=bundle.input.input_name,
                   output_name=bundle.output.output_name)


def _timing_inputs(bundle: ModelBundle) -> npt.NDArray[np.float32]:
    if bundle.golden is not None:
        x, _ref = load_golden(bundle)
        return x
    channels = bundle.input_channels
    rng = np.random.default_rng(0)
    return rng.random((2, channels, *bundle.input.shape), dtype=np.float32)


def _time(runners: dict[str, ModelRunner], x: npt.NDArray[np.float32],
          rounds: int) -> dict[str, float]:
    """Median batch-1 latency (ms) per runner over ``rounds`` passes of the inputs."""
    times: dict[str, list[float]] = {rt: [] for rt in runners}
    order = list(runners)
    for r in range(rounds):
        for rt in order[r % len(order):] + order[: r % len(order)]:  # rotate who goes first
            runner = runners[rt]
            for i in range(len(x)):
                t0 = time.perf_counter()
                runner.run(x[i : i + 1])
                times[rt].append((time.perf_counter() - t0) * 1000)
    return {rt: statistics.median(t) for rt, t in times.items()}


def _pick(medians: dict[str, float]) -> str:
    fastest = min(medians.values())
    for rt in RUNTIMES:  # preference order
        if rt in medians and medians[rt] <= fastest * (1 + TIE_MARGIN):
            return rt
    return min(medians, key=lambda rt: medians[rt])


def _from_cache(bundle: ModelBundle, options: RunnerOptions, cache_path: Path, key: str,
                installed: list[str]) -> tuple[ModelRunner, Choice] | None:
    entry = _read_cache(cache_path).get(key)
    if not isinstance(entry, dict):
        return None
    runtime = entry.get("runtime")
    if (runtime not in installed or entry.get("threads") != options.intra_op_threads
            or sorted(entry.get("installed", [])) != sorted(installed)):
        return None
    try:
        runner = open_runner(runtime, str(bundle.backend_file(runtime).path), options)
    except BackendError as exc:
        log.warning("backend_cache_stale", model=bundle.name, runtime=runtime, error=str(exc))
        _forget(cache_path, key)
        return None
    report = run_guard(bundle, runner)
    if not report.ok:
        runner.close()
        log.warning("backend_cache_stale", model=bundle.name, runtime=runtime,
                    error=report.reason)
        _forget(cache_path, key)
        return None
    try:
        candidates = tuple(Candidate.from_dict(c) for c in entry.get("candidates", []))
    except (KeyError, TypeError):
        candidates = ()
    choice = Choice(runtime=runtime, model_key=key, threads=options.intra_op_threads,
                    cached=True, candidates=candidates, guard=report,
                    chosen_at=str(entry.get("chosen_at", "")))
    return runner, choice


def choose_runner(
    bundle: ModelBundle,
    options: RunnerOptions,
    cache_path: Path | None = None,
    *,
    runtimes: tuple[str, ...] | None = None,
    rounds: int = DEFAULT_ROUNDS,
) -> tuple[ModelRunner, Choice]:
    """Open the bundle on the fastest installed runtime that passes the guard.

    ``runtimes`` narrows the candidates (default: every runtime in ``RUNTIMES`` that the
    bundle has a file for). Returns the open runner (the caller closes it) and the choice.
    Raises ``GuardFailed`` when runtimes ran the golden set but none reached the floor (the
    report of the closest one, its reason naming every runtime's), ``BackendError`` when no
    runtime could open the model at all."""
    options = _options(bundle, options)
    wanted = [rt for rt in (runtimes or RUNTIMES) if rt in bundle.backends]
    if not wanted:
        raise BackendError(
            f"bundle {bundle.name} has no file for any runtime this agent knows "
            f"({', '.join(runtimes or RUNTIMES)}); it has: {', '.join(sorted(bundle.backends))}"
        )
    installed = [rt for rt in wanted if runtime_installed(rt)]
    key = model_key(bundle)
    if cache_path is not None:
        hit = _from_cache(bundle, options, cache_path, key, installed)
        if hit is not None:
            log.info("backend_selected", model=bundle.name, **hit[1].summary())
            return hit

    candidates: dict[str, Candidate] = {}
    reports: dict[str, GuardReport] = {}
    runners: dict[str, ModelRunner] = {}
    for rt in wanted:
        if rt not in installed:
            candidates[rt] = Candidate(rt, False, f"not installed ({INSTALL_HINTS[rt]})")
            continue
        try:
            runner = open_runner(rt, str(bundle.backend_file(rt).path), options)
        except BackendError as exc:
            candidates[rt] = Candidate(rt, False, f"cannot load the model: {exc}")
            continue
        report = run_guard(bundle, runner)
        reports[rt] = report
        if report.ok:
            runners[rt] = runner
        else:
            runner.close()
            candidates[rt] = Candidate(rt, False, report.reason,
                                       worst_psnr_db=report.worst_psnr_db)
    if not runners:
        why = "; ".join(f"{c.runtime}: {c.reason}" for c in candidates.values())
        if reports:  # every runtime that could open the model missed the floor
            closest = max(reports.values(), key=lambda r: r.worst_psnr_db or -math.inf)
            raise GuardFailed(replace(closest, reason=(
                f"no runtime serves {bundle.name} {bundle.version} within its fidelity "
                f"floor: {why}")))
        raise BackendError(f"no runtime can serve {bundle.name} {bundle.version}: {why}")

    try:
        medians = _time(runners, _timing_inputs(bundle), max(1, rounds))
    except Exception:
        for runner in runners.values():
            runner.close()
        raise
    chosen = _pick(medians)
    for rt, runner in runners.items():
        candidates[rt] = Candidate(
            rt, True, "chosen" if rt == chosen else "passes the guard, slower",
            median_ms=round(medians[rt], 3), worst_psnr_db=reports[rt].worst_psnr_db)
        if rt != chosen:
            runner.close()
    ordered = tuple(candidates[rt] for rt in wanted)
    choice = Choice(runtime=chosen, model_key=key, threads=options.intra_op_threads,
                    cached=False, candidates=ordered, guard=reports[chosen], chosen_at=_now())
    if cache_path is not None:
        entries = _read_cache(cache_path)
        entries[key] = {"runtime": chosen, "threads": options.intra_op_threads,
                        "installed": installed, "chosen_at": choice.chosen_at,
                        "bundle": bundle.name, "version": bundle.version,
                        "candidates": [c.as_dict() for c in ordered]}
        try:
            _write_cache(cache_path, entries)
        except OSError as exc:
            log.warning("backend_cache_unwritable", path=str(cache_path), error=str(exc),
                        fix="check that the agent's state dir is writable")
    log.info("backend_selected", model=bundle.name, **choice.summary())
    return runners[chosen], choice
