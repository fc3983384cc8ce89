"""``backend = "auto"`` (agent.backends.select): every installed runtime x {int8, fp32} file
that passes the guard is timed and the fastest serves, int8 winning a tie; a candidate that
fails the guard is never chosen; the choice (with its precision) is cached per model key
and a cached choice is guarded again. Real models on real runtimes (the test net of
test_litert); where LiteRT is not installed the onnxruntime-only cases still run.

Nothing here depends on which runtime or precision is fastest on the CPU that runs it:
either the assertion is the rule itself (the choice is ``pick`` of the measured medians),
or the timings are forced through ``choose_runner``'s ``timer``."""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from structlog.testing import capture_logs

from agent.backends import BackendError, ModelRunner, RunnerOptions
from agent.config import ModelSection
from agent.cpu import identify
from agent.model import candidates
from agent.model import select as sel
from agent.model.bundle import ModelBundle, load_bundle
from agent.model.choice import TIE_MARGIN, Key, pick
from agent.model.guard import GuardFailed
from agent.model.serving import ServedModel
from tests.backends.test_litert import (
    FLOOR_DB,
    HAVE_LITERT,
    build_nets,
    needs_litert,
    psnr,
    write_bundle,
)
from tests.bundles import quantize_qdq
from tests.test_cpu import (
    A72_FEATURES,
    A76_FEATURES,
    CASCADE_LAKE_FLAGS,
    HASWELL_FLAGS,
    arm_cpuinfo,
    x86_cpuinfo,
)

OPTS = RunnerOptions(intra_op_threads=1)
ORT8, ORT32 = ("onnxruntime", "int8"), ("onnxruntime", "fp32")
TFL8, TFL32 = ("litert", "int8"), ("litert", "fp32")
AVX2 = identify(x86_cpuinfo("AMD EPYC 7B13", HASWELL_FLAGS, cores=2, threads_per_core=1),
                machine="x86_64")
VNNI = identify(x86_cpuinfo("Intel Xeon", CASCADE_LAKE_FLAGS, cores=2, threads_per_core=1),
                machine="x86_64")


@pytest.fixture(scope="module")
def nets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    d = tmp_path_factory.mktemp("select-nets")
    built = build_nets(d)
    quantize_qdq(built["files"]["onnx_fp32"], d / "net.int8.safe.onnx")
    built["files"]["onnx_int8"] = d / "net.int8.safe.onnx"
    return built


def forced(ms: dict[Key, float], default: float = 50.0) -> sel.Timer:
    """A timer that reports ``ms`` (others: ``default``) and records what it was given."""

    def timer(runners: dict[Key, ModelRunner], x: np.ndarray, rounds: int) -> dict[Key, float]:
        timer.seen = set(runners)  # type: ignore[attr-defined]
        return {k: ms.get(k, default) for k in runners}

    return timer


def no_timing(*_args: Any) -> dict[Key, float]:
    raise AssertionError("a cached choice must not time the candidates again")


def cache_entries(path: Path) -> dict[str, Any]:
    data = json.loads(path.read_text())
    assert data["format"] == 2
    entries: dict[str, Any] = data["choices"]
    return entries


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def with_refs(root: Path, refs: dict[str, Path]) -> ModelBundle:
    """Add fp32 reference files ({runtime: file}) to the bundle at ``root``."""
    meta = json.loads((root / "bundle.json").read_text())
    for rt, src in refs.items():
        dst = root / ("model.fp32.onnx" if rt == "onnxruntime" else "model.fp32.tflite")
        dst.write_bytes(src.read_bytes())
        spec = {"path": dst.name, "sha256": _sha(dst)}
        if rt == "onnxruntime":
            meta["reference"] = spec
        else:
            meta.setdefault("references", {})[rt] = spec
    (root / "bundle.json").write_text(json.dumps(meta))
    return load_bundle(root)


def onnx_pair(nets: dict[str, Any], root: Path, *, int8: str = "onnx_int8",
              fp32: str = "onnx_fp32") -> ModelBundle:
    """onnxruntime only: an int8 served file and an fp32 reference."""
    write_bundle(root, {"onnxruntime": nets["files"][int8]}, nets["golden"])
    return with_refs(root, {"onnxruntime": nets["files"][fp32]})


# --- the rule and its wording (pure) -------------------------------------------------------


def test_pick_prefers_int8_within_the_margin_and_fp32_beyond_it() -> None:
    inside, beyond = 1 + TIE_MARGIN * 0.8, 1 + TIE_MARGIN * 1.2
    assert pick({ORT8: 10.0 * inside, ORT32: 10.0}, "int8") == ORT8
    assert pick({ORT8: 10.0 * beyond, ORT32: 10.0}, "int8") == ORT32
    # int8 on the less preferred runtime still beats fp32 on the preferred one in a tie
    assert pick({TFL8: 10.0 * inside, ORT32: 10.0, TFL32: 20.0}, "int8") == TFL8
    # every int8 slower beyond the margin: the fastest fp32
    assert pick({ORT8: 20.0, TFL8: 13.0, ORT32: 12.0, TFL32: 10.0}, "int8") == TFL32
    # the same precision: the runtime order breaks a tie, the margin still applies
    assert pick({ORT8: 10.0 * inside, TFL8: 10.0}, "int8") == ORT8
    assert pick({ORT8: 10.0 * beyond, TFL8: 10.0}, "int8") == TFL8
    assert pick({TFL8: 3.0}, "int8") == TFL8
    with pytest.raises(ValueError):
        pick({}, "int8")


def _timed(ms: dict[Key, float], failed: dict[Key, str] | None = None) -> list[sel.Candidate]:
    out = [sel.Candidate(rt, p, True, "", median_ms=v) for (rt, p), v in ms.items()]
    return out + [sel.Candidate(rt, p, False, why) for (rt, p), why in (failed or {}).items()]


def test_the_reason_when_fp32_wins_says_how_much_and_why() -> None:
    cands = _timed({ORT8: 46.0, TFL8: 42.0, ORT32: 35.0, TFL32: 44.0})
    text = sel.explain(ORT32, cands, "int8", AVX2)
    assert text.startswith("fp32 on onnxruntime is 1.20x faster than the best int8 "
                           "(litert int8 42.0 ms vs 35.0 ms): ")
    assert "no int8 dot product (AVX2, FMA)" in text
    text = sel.explain(ORT32, cands, "int8", VNNI)
    assert "although this CPU has int8 dot products (AVX-512 VNNI)" in text
    assert "could not be identified" in sel.explain(ORT32, cands, "int8", None)
    pi4 = identify(arm_cpuinfo(["0xd08"] * 4, A72_FEATURES, "Raspberry Pi 4"),
                   machine="aarch64")
    assert "no int8 dot product (NEON)" in sel.explain(ORT32, cands, "int8", pi4)
    pi5 = identify(arm_cpuinfo(["0xd0b"] * 4, A76_FEATURES, "Raspberry Pi 5"),
                   machine="aarch64")
    assert "has int8 dot products (SDOT/UDOT" in sel.explain(ORT32, cands, "int8", pi5)
    on_gpu = sel.explain(ORT32, cands, "int8", pi5, "onnxruntime's cuda provider")
    assert on_gpu.endswith("vs 35.0 ms): it runs on onnxruntime's cuda provider, not on the CPU")


def test_the_reason_when_no_int8_file_serves_names_them() -> None:
    cands = _timed({ORT32: 35.0}, {ORT8: "misses its fidelity floor: 31.4 dB < 50 dB",
                                   TFL8: "cannot load the model: bad file"})
    text = sel.explain(ORT32, cands, "int8", AVX2)
    assert text.startswith("fp32 on onnxruntime (35.0 ms): no int8 file can serve here")
    assert "onnxruntime int8: misses its fidelity floor" in text
    assert "litert int8: cannot load" in text


def test_the_reason_when_int8_wins() -> None:
    text = sel.explain(TFL8, _timed({ORT8: 14.0, TFL8: 7.0, ORT32: 23.0, TFL32: 16.5}),
                       "int8", VNNI)
    assert text == ("int8 on litert (7.00 ms): the fastest; 2.36x faster than the best fp32 "
                    "(litert fp32 16.5 ms)")
    text = sel.explain(ORT8, _timed({ORT8: 10.2, ORT32: 10.0}), "int8", AVX2)
    assert "within 5% of the fastest (onnxruntime fp32 10.0 ms)" in text
    assert "preferred on a tie" in text
    assert sel.explain(ORT8, _timed({ORT8: 4.0}), "int8") == (
        "int8 on onnxruntime (4.00 ms): the fastest that passes the guard")


def test_candidate_files_cover_both_precisions_in_preference_order(
    nets: dict[str, Any], tmp_path: Path
) -> None:
    write_bundle(tmp_path / "b", {"onnxruntime": nets["files"]["onnx_int8"]}, nets["golden"])
    bundle = with_refs(tmp_path / "b", {"onnxruntime": nets["files"]["onnx_fp32"],
                                        "litert": nets["files"]["onnx_fp32"]})
    files = sel.candidate_files(bundle)
    assert list(files) == [ORT8, ORT32, TFL32]
    assert files[ORT32].path.name == "model.fp32.onnx"
    assert sel.servable_digests(bundle) == {f.sha256 for f in files.values()}
    # an fp32 bundle: its served files are fp32 already, nothing is added
    fp32 = load_bundle(write_bundle(tmp_path / "f", {"onnxruntime": nets["files"]["onnx_fp32"]},
                                    nets["golden"], precision="fp32"))
    assert list(sel.candidate_files(fp32)) == [("onnxruntime", "fp32")]


# --- onnxruntime alone (runs with or without LiteRT) -----------------------------------


def test_picks_the_runtime_that_loads_and_caches_it(nets: dict[str, Any],
                                                    tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.tflite"
    garbage.write_bytes(b"\x00" * 64)  # not a model: LiteRT (if installed) cannot load it
    bundle = load_bundle(write_bundle(
        tmp_path / "b", {"onnxruntime": nets["files"]["onnx_int8"], "litert": garbage},
        nets["golden"]))
    cache = tmp_path / "state" / "backend-choice.json"
    runner, choice = sel.choose_runner(bundle, OPTS, cache)
    try:
        assert choice.runtime == runner.runtime == "onnxruntime" and not choice.cached
        assert choice.precision == "int8" and choice.digest == bundle.digest("onnxruntime")
        assert choice.guard.ok and choice.guard.runtime == "onnxruntime"
        by_rt = {c.runtime: c for c in choice.candidates}
        assert by_rt["onnxruntime"].ok and by_rt["onnxruntime"].median_ms is not None
        assert not by_rt["litert"].ok
        assert ("cannot load" in by_rt["litert"].reason if HAVE_LITERT
                else "pip install ai-edge-litert" in by_rt["litert"].reason)
        x, ref = nets["golden"]
        assert psnr(runner.run(x), ref) >= FLOOR_DB
    finally:
        runner.close()
    entry = cache_entries(cache)[sel.model_key(bundle)]
    assert entry["runtime"] == "onnxruntime" and entry["precision"] == "int8"
    assert entry["threads"] == 1 and entry["reason"] == choice.reason
    summary = choice.summary()
    assert summary["mode"] == "auto" and summary["runtime"] == "onnxruntime"
    assert summary["precision"] == "int8" and summary["reason"].startswith("int8 on onnxruntime")
    json.dumps(summary, allow_nan=False)  # status-safe


def test_fp32_serves_only_when_faster_beyond_the_margin(nets: dict[str, Any],
                                                        tmp_path: Path) -> None:
    bundle = onnx_pair(nets, tmp_path / "b")
    timer = forced({ORT8: 10.0, ORT32: 10.0 / (1 + TIE_MARGIN * 0.5)})
    runner, choice = sel.choose_runner(bundle, OPTS, timer=timer, cpu=AVX2)
    runner.close()
    assert timer.seen == {ORT8, ORT32}  # type: ignore[attr-defined]  # both were guarded + timed
    assert (choice.runtime, choice.precision) == ORT8

    runner, choice = sel.choose_runner(bundle, OPTS, timer=forced({ORT8: 12.0, ORT32: 10.0}),
                                       cpu=AVX2)
    try:
        assert (choice.runtime, choice.precision) == ORT32
        assert choice.digest == bundle.reference.sha256 != bundle.digest()  # type: ignore[union-attr]
        assert choice.guard.ok and choice.guard.precision == "fp32"
        assert choice.reason.startswith("fp32 on onnxruntime is 1.20x faster than the best int8")
        assert "no int8 dot product" in choice.reason
        x, ref = nets["golden"]
        assert psnr(runner.run(x), ref) >= FLOOR_DB
    finally:
        runner.close()


def test_an_fp32_choice_is_cached_with_its_precision_and_guarded_again(
    nets: dict[str, Any], tmp_path: Path
) -> None:
    bundle = onnx_pair(nets, tmp_path / "b")
    cache = tmp_path / "choice.json"
    first, choice = sel.choose_runner(bundle, OPTS, cache, timer=forced({ORT32: 1.0}), cpu=AVX2)
    first.close()
    entry = cache_entries(cache)[sel.model_key(bundle)]
    assert (entry["runtime"], entry["precision"]) == ORT32
    assert {(c["runtime"], c["precision"]) for c in entry["candidates"]} == {ORT8, ORT32}
    runner, again = sel.choose_runner(bundle, OPTS, cache, timer=no_timing, cpu=AVX2)
    runner.close()
    assert again.cached and (again.runtime, again.precision) == ORT32
    assert again.guard.ok and again.guard.precision == "fp32"  # the guard ran again
    assert again.digest == choice.digest and again.reason == choice.reason
    assert [c.as_dict() for c in again.candidates] == [c.as_dict() for c in choice.candidates]


def test_a_cached_choice_is_reused_without_timing(nets: dict[str, Any], tmp_path: Path) -> None:
    bundle = load_bundle(write_bundle(tmp_path / "b", {"onnxruntime": nets["files"]["onnx_int8"]},
                                      nets["golden"]))
    cache = tmp_path / "choice.json"
    first, choice = sel.choose_runner(bundle, OPTS, cache)
    first.close()
    runner, again = sel.choose_runner(bundle, OPTS, cache, timer=no_timing)
    runner.close()
    assert again.cached and again.runtime == choice.runtime
    assert again.guard.ok  # the guard still runs on a cached choice
    assert again.chosen_at == choice.chosen_at
    assert [c.runtime for c in again.candidates] == [c.runtime for c in choice.candidates]


def test_the_cache_is_per_model_key_and_thread_count(nets: dict[str, Any],
                                                     tmp_path: Path) -> None:
    cache = tmp_path / "choice.json"
    a = load_bundle(write_bundle(tmp_path / "a", {"onnxruntime": nets["files"]["onnx_int8"]},
                                 nets["golden"]))
    b = load_bundle(write_bundle(tmp_path / "b", {"onnxruntime": nets["files"]["onnx_fp32"]},
                                 nets["golden"]))
    c = onnx_pair(nets, tmp_path / "c")  # a's served file plus a reference: another key
    assert len({sel.model_key(a), sel.model_key(b), sel.model_key(c)}) == 3
    for bundle in (a, b):
        runner, choice = sel.choose_runner(bundle, OPTS, cache)
        runner.close()
        assert not choice.cached
    assert set(cache_entries(cache)) == {sel.model_key(a), sel.model_key(b)}
    runner, choice = sel.choose_runner(a, RunnerOptions(intra_op_threads=2), cache)
    runner.close()
    assert not choice.cached  # timed on another thread count: selected again
    runner, choice = sel.choose_runner(a, RunnerOptions(intra_op_threads=2), cache,
                                       timer=no_timing)
    runner.close()
    assert choice.cached


def test_a_choice_timed_on_another_cpu_is_timed_again(nets: dict[str, Any],
                                                      tmp_path: Path) -> None:
    """A state directory moved to another board (or an older cache without the CPU): the
    ranking timed there does not hold here, so the candidates are timed again."""
    bundle = onnx_pair(nets, tmp_path / "b")
    cache = tmp_path / "choice.json"
    first, _ = sel.choose_runner(bundle, OPTS, cache, timer=forced({ORT32: 1.0}), cpu=AVX2)
    first.close()
    assert cache_entries(cache)[sel.model_key(bundle)]["cpu"] == AVX2.label
    with capture_logs() as logs:
        runner, again = sel.choose_runner(bundle, OPTS, cache, timer=forced({ORT8: 1.0}),
                                          cpu=VNNI)
    runner.close()
    assert not again.cached and (again.runtime, again.precision) == ORT8
    moved = [e for e in logs if e["event"] == "backend_cache_other_cpu"]
    assert moved and moved[0]["cached_on"] == AVX2.label and moved[0]["cpu"] == VNNI.label
    assert cache_entries(cache)[sel.model_key(bundle)]["cpu"] == VNNI.label
    runner, cached = sel.choose_runner(bundle, OPTS, cache, timer=no_timing, cpu=VNNI)
    runner.close()
    assert cached.cached
    entries = json.loads(cache.read_text())
    del entries["choices"][sel.model_key(bundle)]["cpu"]  # written before the CPU was kept
    cache.write_text(json.dumps(entries))
    with capture_logs() as logs:
        runner, older = sel.choose_runner(bundle, OPTS, cache, timer=forced({ORT8: 1.0}),
                                          cpu=VNNI)
    runner.close()
    assert not older.cached
    assert [e["cpu"] for e in logs if e["event"] == "backend_cache_without_cpu"] == [VNNI.label]


def phased(*phases: dict[Key, float]) -> sel.Timer:
    """A timer that reports ``phases[n]`` on its n-th call (all cores, then a worker's share
    under a plan) and records what each call was given."""
    calls: list[set[Key]] = []

    def timer(runners: dict[Key, ModelRunner], x: np.ndarray, rounds: int) -> dict[Key, float]:
        calls.append(set(runners))
        return {k: phases[len(calls) - 1][k] for k in runners}

    timer.calls = calls  # type: ignore[attr-defined]
    return timer


@pytest.fixture
def opened(monkeypatch: pytest.MonkeyPatch) -> list[tuple[Key | str, int]]:
    """(runtime, threads) of every runner choose_runner opens, in order."""
    seen: list[tuple[Key | str, int]] = []
    real = sel.open_runner

    def recording(runtime: str, path: str, options: RunnerOptions) -> Any:
        seen.append((runtime, options.intra_op_threads))
        return real(runtime, path, options)

    monkeypatch.setattr(sel, "open_runner", recording)  # a cache hit's one candidate
    monkeypatch.setattr(candidates, "open_runner", recording)  # every candidate's sessions
    return seen


ALL_CORES = RunnerOptions(intra_op_threads=0)
TWO_WORKERS = sel.WorkerPlan(workers=2, threads=1, min_ms=10.0)
SHARING = sel.WorkerPlan(workers=2, threads=1, min_ms=10.0, share_below_ms=5.0)


def test_a_plan_ranks_the_candidates_on_a_worker_s_share_of_the_cores(
        nets: dict[str, Any], tmp_path: Path, opened: list[tuple[Key | str, int]]) -> None:
    """fp32 is faster on all cores, int8 on the one-thread sessions that two workers run:
    int8 serves, on such a session, and the cache remembers it for that plan only."""
    bundle = onnx_pair(nets, tmp_path / "b")
    cache = tmp_path / "choice.json"
    timer = phased({ORT8: 20.0, ORT32: 15.0}, {ORT8: 25.0, ORT32: 40.0})
    runner, choice = sel.choose_runner(bundle, ALL_CORES, cache, timer=timer, cpu=AVX2,
                                       plan=TWO_WORKERS)
    runner.close()
    assert timer.calls == [{ORT8, ORT32}, {ORT8, ORT32}]  # type: ignore[attr-defined]
    assert opened == [("onnxruntime", 0)] * 2 + [("onnxruntime", 1)] * 2
    assert (choice.runtime, choice.precision) == ORT8
    assert (choice.workers, choice.worker_threads) == (2, 1)
    by_key = {c.key: c for c in choice.candidates}
    assert (by_key[ORT8].median_ms, by_key[ORT8].worker_ms) == (20.0, 25.0)
    assert (by_key[ORT32].median_ms, by_key[ORT32].worker_ms) == (15.0, 40.0)
    assert choice.reason == (
        "int8 on onnxruntime (25.0 ms): the fastest; 1.60x faster than the best fp32 "
        "(onnxruntime fp32 40.0 ms) (timed on sessions of 1 thread, as each of the 2 model "
        "workers runs it)")
    summary = choice.summary()
    assert (summary["workers"], summary["worker_threads"]) == (2, 1)
    assert summary["candidates"][0]["worker_ms"] == 25.0
    entry = cache_entries(cache)[sel.model_key(bundle)]
    assert entry["plan"] == TWO_WORKERS.as_dict() and entry["workers"] == 2

    opened.clear()  # a restart: the cached candidate, on a worker's share, guarded only
    runner, again = sel.choose_runner(bundle, ALL_CORES, cache, timer=no_timing, cpu=AVX2,
                                      plan=TWO_WORKERS)
    runner.close()
    assert again.cached and (again.runtime, again.precision) == ORT8
    assert (again.workers, again.worker_threads) == (2, 1)
    assert opened == [("onnxruntime", 1)]

    # another share of the cores (or none) ranks again
    with capture_logs() as logs:
        runner, other = sel.choose_runner(bundle, ALL_CORES, cache, cpu=AVX2,
                                          timer=forced({ORT32: 1.0}))
    runner.close()
    assert not other.cached and (other.runtime, other.precision) == ORT32
    assert other.worker_threads is None and other.workers == 1
    assert next(e for e in logs if e["event"] == "backend_cache_other_plan")["cached_for"] \
        == TWO_WORKERS.as_dict()


def test_a_per_worker_choice_is_not_served_from_the_cache_on_an_accelerator(
        nets: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Ranked per worker on the CPU; then onnxruntime-gpu came (same runtimes, same CPU):
    the cached 1-thread pick is dropped and the candidates are ranked again, one worker."""
    bundle = onnx_pair(nets, tmp_path / "b")
    cache = tmp_path / "choice.json"
    runner, first = sel.choose_runner(bundle, ALL_CORES, cache, cpu=AVX2, plan=TWO_WORKERS,
                                      timer=phased({ORT8: 20.0, ORT32: 15.0},
                                                   {ORT8: 25.0, ORT32: 40.0}))
    runner.close()
    assert first.worker_threads == 1

    class OnAGpu:  # the real session, as onnxruntime-gpu would describe it
        def __init__(self, inner: ModelRunner) -> None:
            self.inner = inner

        def __getattr__(self, name: str) -> Any:
            return getattr(self.inner, name)

        def describe(self) -> dict[str, Any]:
            return {**self.inner.describe(), "providers": ["cuda", "cpu"]}

    for module in (sel, candidates):
        real = module.open_runner
        monkeypatch.setattr(module, "open_runner",
                            lambda rt, path, opts, real=real: OnAGpu(real(rt, path, opts)))
    with capture_logs() as logs:
        runner, again = sel.choose_runner(bundle, ALL_CORES, cache, cpu=AVX2,
                                          plan=TWO_WORKERS, timer=forced({ORT8: 20.0,
                                                                          ORT32: 15.0}))
    runner.close()
    assert not again.cached and (again.runtime, again.precision) == ORT32
    assert (again.workers, again.worker_threads) == (1, None)
    assert "accelerator" in next(e for e in logs
                                 if e["event"] == "backend_cache_other_plan")["plan"]
    assert cache_entries(cache)[sel.model_key(bundle)]["workers"] == 1
    runner, third = sel.choose_runner(bundle, ALL_CORES, cache, cpu=AVX2, plan=TWO_WORKERS,
                                      timer=no_timing)
    runner.close()
    assert third.cached and third.worker_threads is None  # the cache holds from now on


def test_no_plan_applies_where_any_candidate_runs_on_an_accelerator(
        nets: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The all-core pick is on the CPU but another candidate is on a GPU: ranked per worker,
    the GPU one could win and be served twice; one worker serves, ranked on all cores."""
    bundle = onnx_pair(nets, tmp_path / "b")
    real = candidates.open_runner

    def int8_on_a_gpu(rt: str, path: str, opts: RunnerOptions) -> Any:
        runner = real(rt, path, opts)
        if "int8" in Path(path).name:
            describe = runner.describe
            runner.describe = lambda: {**describe(), "providers": ["cuda", "cpu"]}
        return runner

    monkeypatch.setattr(candidates, "open_runner", int8_on_a_gpu)
    timer = phased({ORT8: 15.0, ORT32: 12.0}, {ORT8: 15.0, ORT32: 24.0})
    runner, choice = sel.choose_runner(bundle, ALL_CORES, cpu=AVX2, plan=TWO_WORKERS,
                                       timer=timer)
    runner.close()
    assert len(timer.calls) == 1  # type: ignore[attr-defined]
    assert (choice.runtime, choice.precision, choice.worker_threads) == (*ORT32, None)


def test_a_plan_does_not_apply_to_a_fast_model(
        nets: dict[str, Any], tmp_path: Path, opened: list[tuple[Key | str, int]]) -> None:
    """Below the plan's ``min_ms`` one worker serves: the all-core ranking stands."""
    bundle = onnx_pair(nets, tmp_path / "b")
    cache = tmp_path / "choice.json"
    timer = phased({ORT8: 5.0, ORT32: 8.0})
    runner, choice = sel.choose_runner(bundle, ALL_CORES, cache, timer=timer, cpu=AVX2,
                                       plan=TWO_WORKERS)
    runner.close()
    assert len(timer.calls) == 1  # type: ignore[attr-defined]
    assert opened == [("onnxruntime", 0)] * 2
    assert (choice.runtime, choice.precision, choice.workers, choice.worker_threads) == (
        *ORT8, 1, None)
    assert all(c.worker_ms is None for c in choice.candidates)
    assert "timed on sessions" not in choice.reason
    opened.clear()
    runner, again = sel.choose_runner(bundle, ALL_CORES, cache, timer=no_timing, cpu=AVX2,
                                      plan=TWO_WORKERS)
    runner.close()
    assert again.cached and again.worker_threads is None and opened == [("onnxruntime", 0)]


def test_under_share_below_ms_one_worker_serves_on_a_worker_s_share(
        nets: dict[str, Any], tmp_path: Path, opened: list[tuple[Key | str, int]]) -> None:
    """A model under the plan's ``share_below_ms`` on all cores: one worker, ranked and
    served on a session of a worker's share (the other cores are left to the agent's own
    work); fp32 wins there, not on all cores."""
    bundle = onnx_pair(nets, tmp_path / "b")
    cache = tmp_path / "choice.json"
    timer = phased({ORT8: 4.0, ORT32: 4.5}, {ORT8: 9.0, ORT32: 7.0})
    runner, choice = sel.choose_runner(bundle, ALL_CORES, cache, timer=timer, cpu=AVX2,
                                       plan=SHARING)
    runner.close()
    assert len(timer.calls) == 2  # type: ignore[attr-defined]
    assert opened == [("onnxruntime", 0)] * 2 + [("onnxruntime", 1)] * 2
    assert (choice.runtime, choice.precision, choice.workers, choice.worker_threads) == (
        *ORT32, 1, 1)
    assert choice.plan_ms == 4.0
    assert choice.reason.endswith("(timed on sessions of 1 thread, as the model worker runs it)")
    assert [c.worker_ms for c in choice.candidates] == [9.0, 7.0]
    opened.clear()
    runner, again = sel.choose_runner(bundle, ALL_CORES, cache, timer=no_timing, cpu=AVX2,
                                      plan=SHARING)
    runner.close()
    assert again.cached and opened == [("onnxruntime", 1)]
    assert (again.runtime, again.precision, again.workers, again.worker_threads) == (
        *ORT32, 1, 1)


def test_a_cache_entry_chosen_before_the_plan_had_share_below_ms_is_timed_again(
        nets: dict[str, Any], tmp_path: Path, opened: list[tuple[Key | str, int]]) -> None:
    """Such an entry ranked a fast model on all cores: its plan differs, so auto times again."""
    bundle = onnx_pair(nets, tmp_path / "b")
    cache = tmp_path / "choice.json"
    runner, _ = sel.choose_runner(bundle, ALL_CORES, cache, cpu=AVX2, plan=SHARING,
                                  timer=phased({ORT8: 4.0, ORT32: 4.5}, {ORT8: 9.0, ORT32: 7.0}))
    runner.close()
    data = json.loads(cache.read_text())
    for entry in data["choices"].values():
        del entry["plan"]["share_below_ms"]
    cache.write_text(json.dumps(data))
    with capture_logs() as logs:
        runner, again = sel.choose_runner(bundle, ALL_CORES, cache, cpu=AVX2, plan=SHARING,
                                          timer=phased({ORT8: 4.0, ORT32: 4.5},
                                                       {ORT8: 7.0, ORT32: 9.0}))
    runner.close()
    assert not again.cached
    assert (again.runtime, again.precision, again.worker_threads) == (*ORT8, 1)
    assert [e["event"] for e in logs].count("backend_cache_other_plan") == 1


def test_a_plan_times_again_only_the_candidates_near_the_fastest(
        nets: dict[str, Any], tmp_path: Path, opened: list[tuple[Key | str, int]]) -> None:
    bundle = onnx_pair(nets, tmp_path / "b")
    timer = phased({ORT8: 12.0, ORT32: 12.0 * sel.PLAN_WITHIN + 0.1}, {ORT8: 20.0})
    runner, choice = sel.choose_runner(bundle, ALL_CORES, timer=timer, cpu=AVX2,
                                       plan=TWO_WORKERS)
    runner.close()
    assert timer.calls == [{ORT8, ORT32}, {ORT8}]  # type: ignore[attr-defined]
    assert opened == [("onnxruntime", 0)] * 2 + [("onnxruntime", 1)]
    assert (choice.runtime, choice.precision, choice.worker_threads) == (*ORT8, 1)
    fp32 = next(c for c in choice.candidates if c.key == ORT32)
    assert fp32.ok and fp32.worker_ms is None and "not timed as a worker" in fp32.reason


def test_a_candidate_failing_on_a_worker_s_share_drops_out(
        nets: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bundle = onnx_pair(nets, tmp_path / "b")
    real = candidates.run_guard
    # The third and fourth guard runs are the one-thread sessions: int8's fails.
    runs: list[str] = []

    def third_fails(bundle: Any, runner: Any, **kw: Any) -> Any:
        runs.append(kw.get("precision", ""))
        report = real(bundle, runner, **kw)
        if len(runs) == 3:
            return replace(report, ok=False, reason="22.1 dB < 50 dB",
                           shortfall="misses its fidelity floor")
        return report

    monkeypatch.setattr(candidates, "run_guard", third_fails)
    runner, choice = sel.choose_runner(bundle, ALL_CORES, timer=phased(
        {ORT8: 20.0, ORT32: 15.0}, {ORT8: 25.0, ORT32: 40.0}), cpu=AVX2, plan=TWO_WORKERS)
    runner.close()
    assert runs == ["int8", "fp32", "int8", "fp32"]
    assert (choice.runtime, choice.precision, choice.worker_threads) == (*ORT32, 1)
    int8 = next(c for c in choice.candidates if c.key == ORT8)
    assert not int8.ok and int8.reason.startswith("on a 1-thread session: ")
    assert int8.median_ms == 20.0  # its all-core figure stays


def test_where_no_worker_s_share_passes_one_all_core_session_serves_from_the_cache_too(
        nets: dict[str, Any], tmp_path: Path, opened: list[tuple[Key | str, int]],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Every 1-thread session fails its guard: the all-core pick is opened again and serves,
    the choice says why (so serving opens no further sessions), and the cache keeps that:
    a restart opens the one all-core session only."""
    bundle = onnx_pair(nets, tmp_path / "b")
    cache = tmp_path / "choice.json"
    real = candidates.run_guard
    runs: list[str] = []

    def one_thread_fails(bundle: Any, runner: Any, **kw: Any) -> Any:
        runs.append(kw.get("precision", ""))
        report = real(bundle, runner, **kw)
        if opened[-1][1] == 1:  # the session just opened is a worker's share
            return replace(report, ok=False, reason="22.1 dB < 50 dB",
                           shortfall="misses its fidelity floor")
        return report

    monkeypatch.setattr(candidates, "run_guard", one_thread_fails)
    runner, choice = sel.choose_runner(bundle, ALL_CORES, cache, timer=phased(
        {ORT8: 20.0, ORT32: 25.0}), cpu=AVX2, plan=TWO_WORKERS)
    runner.close()
    assert [t for _, t in opened] == [0, 0, 1, 1, 0]
    assert (choice.runtime, choice.precision, choice.workers, choice.worker_threads) == (
        *ORT8, 1, None)
    assert choice.unsplit == ("no 1-thread session of onnxruntime int8, onnxruntime fp32 "
                              "passed the guard")
    assert cache_entries(cache)[sel.model_key(bundle)]["unsplit"] == choice.unsplit
    opened.clear()
    runner, again = sel.choose_runner(bundle, ALL_CORES, cache, cpu=AVX2, plan=TWO_WORKERS)
    runner.close()
    assert again.cached and again.unsplit == choice.unsplit and again.worker_threads is None
    assert opened == [("onnxruntime", 0)]


def test_an_unreadable_or_older_cache_is_rebuilt(nets: dict[str, Any], tmp_path: Path) -> None:
    bundle = load_bundle(write_bundle(tmp_path / "b", {"onnxruntime": nets["files"]["onnx_int8"]},
                                      nets["golden"]))
    cache = tmp_path / "choice.json"
    cache.write_text("{not json")
    runner, choice = sel.choose_runner(bundle, OPTS, cache)
    runner.close()
    assert not choice.cached and sel.model_key(bundle) in cache_entries(cache)
    # format 1 (before precision was chosen) is not trusted: selected again
    cache.write_text(json.dumps({"format": 1, "choices": {sel.model_key(bundle): {
        "runtime": "onnxruntime", "threads": 1, "installed": ["onnxruntime"],
        "chosen_at": "2026-01-01T00:00:00Z", "candidates": []}}}))
    runner, choice = sel.choose_runner(bundle, OPTS, cache)
    runner.close()
    assert not choice.cached and cache_entries(cache)[sel.model_key(bundle)]["precision"]


def test_a_candidate_failing_the_guard_is_never_chosen(nets: dict[str, Any],
                                                       tmp_path: Path) -> None:
    """The broken file would be the fastest; it is not even timed."""
    bundle = onnx_pair(nets, tmp_path / "b", fp32="onnx_broken")
    timer = forced({ORT32: 1.0, ORT8: 10.0})
    runner, choice = sel.choose_runner(bundle, OPTS, timer=timer)
    runner.close()
    assert (choice.runtime, choice.precision) == ORT8
    assert timer.seen == {ORT8}  # type: ignore[attr-defined]
    fp32 = next(c for c in choice.candidates if c.key == ORT32)
    assert not fp32.ok and fp32.median_ms is None
    assert "fp32 model" in fp32.reason and "misses its fidelity floor" in fp32.reason

    bundle = onnx_pair(nets, tmp_path / "c", int8="onnx_broken")
    runner, choice = sel.choose_runner(bundle, OPTS, timer=forced({ORT8: 1.0, ORT32: 10.0}))
    runner.close()
    assert (choice.runtime, choice.precision) == ORT32
    assert choice.reason.startswith("fp32 on onnxruntime") and "no int8 file" in choice.reason


def test_no_candidate_passing_the_guard_is_refused(nets: dict[str, Any], tmp_path: Path) -> None:
    bundle = onnx_pair(nets, tmp_path / "b", int8="onnx_broken", fp32="onnx_broken")
    cache = tmp_path / "choice.json"
    with pytest.raises(GuardFailed) as info:
        sel.choose_runner(bundle, OPTS, cache)
    assert "no runtime serves" in str(info.value)
    assert "onnxruntime int8:" in str(info.value) and "onnxruntime fp32:" in str(info.value)
    assert "misses its fidelity floor" in str(info.value)
    assert not info.value.report.ok
    assert not cache.exists()  # nothing chosen, nothing cached


def test_a_cached_candidate_that_now_fails_the_guard_is_dropped(
    nets: dict[str, Any], tmp_path: Path
) -> None:
    bundle = load_bundle(write_bundle(
        tmp_path / "b", {"onnxruntime": nets["files"]["onnx_broken"]}, nets["golden"]))
    cache = tmp_path / "choice.json"
    key = sel.model_key(bundle)
    cache.write_text(json.dumps({"format": 2, "choices": {key: {
        "runtime": "onnxruntime", "precision": "int8", "threads": 1,
        "installed": ["onnxruntime"], "cpu": AVX2.label, "plan": None,
        "chosen_at": "2026-01-01T00:00:00Z", "candidates": []}}}))
    with pytest.raises(GuardFailed):
        sel.choose_runner(bundle, OPTS, cache, cpu=AVX2)
    assert key not in cache_entries(cache)


def test_no_installed_runtime_is_a_backend_error(nets: dict[str, Any], tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    bundle = onnx_pair(nets, tmp_path / "b")
    monkeypatch.setattr(sel, "runtime_installed", lambda _rt: False)
    with pytest.raises(BackendError, match=r"no runtime can serve .*pip install onnxruntime"):
        sel.choose_runner(bundle, OPTS)


def test_a_bundle_for_unknown_runtimes_only_is_a_backend_error(
    nets: dict[str, Any], tmp_path: Path
) -> None:
    bundle = onnx_pair(nets, tmp_path / "b")
    with pytest.raises(BackendError, match="no file for any runtime"):
        sel.choose_runner(bundle, OPTS, runtimes=("litert",))  # it has no .tflite


def test_the_status_states_the_precision_and_file_served(nets: dict[str, Any],
                                                         tmp_path: Path) -> None:
    bundle = onnx_pair(nets, tmp_path / "b")
    settings = ModelSection(bundle=bundle.root, backend="auto")
    runner, choice = sel.choose_runner(bundle, OPTS, timer=forced({ORT32: 1.0}), cpu=AVX2)
    served = ServedModel(bundle, runner, choice.guard, settings, choice)
    try:
        summary = served.summary()
        assert summary["precision"] == "fp32" and summary["runtime"] == "onnxruntime"
        assert summary["digest"] == bundle.reference.sha256  # type: ignore[union-attr]
        assert summary["selection"]["precision"] == "fp32"
        assert "faster than the best int8" in summary["selection"]["reason"]
        json.dumps(summary, allow_nan=False)
    finally:
        served.close()


# --- both runtimes -----------------------------------------------------------------------


def _all_four(nets: dict[str, Any], root: Path, *, onnx: str = "onnx_int8",
              tfl: str = "tfl_int8") -> ModelBundle:
    write_bundle(root, {"onnxruntime": nets["files"][onnx], "litert": nets["files"][tfl]},
                 nets["golden"])
    return with_refs(root, {"onnxruntime": nets["files"]["onnx_fp32"],
                            "litert": nets["files"]["tfl_fp32"]})


@needs_litert
def test_times_all_four_and_serves_the_rule_s_pick(nets: dict[str, Any],
                                                   tmp_path: Path) -> None:
    """Real timings: whatever this CPU makes fastest, the choice is ``pick`` of them."""
    bundle = _all_four(nets, tmp_path / "b")
    runner, choice = sel.choose_runner(bundle, OPTS, tmp_path / "choice.json", rounds=3)
    try:
        by_key = {c.key: c for c in choice.candidates}
        assert set(by_key) == {ORT8, TFL8, ORT32, TFL32}
        assert all(c.ok and c.median_ms is not None and c.median_ms > 0
                   for c in by_key.values())
        expected = pick({k: c.median_ms for k, c in by_key.items()}, "int8")  # type: ignore[misc]
        assert (choice.runtime, choice.precision) == expected
        assert runner.runtime == choice.runtime
        x, ref = nets["golden"]
        assert psnr(runner.run(x), ref) >= FLOOR_DB
    finally:
        runner.close()


@needs_litert
@pytest.mark.parametrize("fast", [ORT8, TFL8, ORT32, TFL32])
def test_the_faster_candidate_wins(nets: dict[str, Any], tmp_path: Path, fast: Key) -> None:
    runner, choice = sel.choose_runner(_all_four(nets, tmp_path / "b"), OPTS,
                                       timer=forced({fast: 1.0}), cpu=AVX2)
    runner.close()
    assert (choice.runtime, choice.precision) == fast


@needs_litert
def test_a_litert_file_failing_the_guard_is_never_chosen(nets: dict[str, Any],
                                                         tmp_path: Path) -> None:
    cache = tmp_path / "choice.json"
    bundle = _all_four(nets, tmp_path / "b", tfl="tfl_broken")
    runner, choice = sel.choose_runner(bundle, OPTS, cache, timer=forced({TFL8: 1.0}))
    runner.close()
    assert (choice.runtime, choice.precision) == ORT8  # int8 preferred among the rest (50 ms)
    litert = next(c for c in choice.candidates if c.key == TFL8)
    assert not litert.ok and "misses its fidelity floor" in litert.reason
    assert litert.median_ms is None
    assert cache_entries(cache)[sel.model_key(bundle)]["runtime"] == "onnxruntime"

    runner, choice = sel.choose_runner(_all_four(nets, tmp_path / "c", onnx="onnx_broken"),
                                       OPTS, timer=forced({ORT8: 1.0}))
    runner.close()
    assert (choice.runtime, choice.precision) == TFL8


@needs_litert
def test_a_cache_naming_a_runtime_no_longer_installed_is_ignored(
    nets: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bundle = _all_four(nets, tmp_path / "b")
    cache = tmp_path / "choice.json"
    runner, choice = sel.choose_runner(bundle, OPTS, cache, timer=forced({TFL32: 1.0}),
                                       cpu=AVX2)
    runner.close()
    assert (choice.runtime, choice.precision) == TFL32
    monkeypatch.setattr(sel, "runtime_installed", lambda rt: rt == "onnxruntime")
    runner, choice = sel.choose_runner(bundle, OPTS, cache, timer=forced({ORT32: 1.0}),
                                       cpu=AVX2)
    runner.close()
    assert (choice.runtime, choice.precision) == ORT32 and not choice.cached
