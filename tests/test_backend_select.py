"""``backend = "auto"`` (agent.backends.select): the fastest installed runtime that passes
the guard is chosen, a runtime that fails the guard never is, and the choice is cached per
model digest. Real models on real runtimes (the test net of test_litert); where LiteRT is
not installed the onnxruntime-only cases still run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent.backends import BackendError, ModelRunner, RunnerOptions
from agent.backends import select as sel
from agent.bundle import load_bundle
from agent.guard import GuardFailed
from tests.test_litert import FLOOR_DB, HAVE_LITERT, build_nets, needs_litert, psnr, write_bundle

OPTS = RunnerOptions(intra_op_threads=1)


@pytest.fixture(scope="module")
def nets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return build_nets(tmp_path_factory.mktemp("select-nets"))


def medians(fast: str) -> Any:
    """A stand-in for ``select._time`` that reports ``fast`` as the fastest runtime."""

    def fake(runners: dict[str, ModelRunner], x: np.ndarray, rounds: int) -> dict[str, float]:
        return {rt: (1.0 if rt == fast else 10.0) for rt in runners}

    return fake


def no_timing(*_args: Any) -> dict[str, float]:
    raise AssertionError("a cached choice must not time the runtimes again")


def cache_entries(path: Path) -> dict[str, Any]:
    data = json.loads(path.read_text())
    assert data["format"] == 1
    entries: dict[str, Any] = data["choices"]
    return entries


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
        assert choice.guard.ok and choice.guard.runtime == "onnxruntime"
        by_rt = {c.runtime: c for c in choice.candidates}
        assert by_rt["onnxruntime"].ok and by_rt["onnxruntime"].median_ms is not None
        assert not by_rt["litert"].ok
        assert ("cannot load" in by_rt["litert"].reason if HAVE_LITERT
                else "iomt-edge-agent[tflite]" in by_rt["litert"].reason)
        x, ref = nets["golden"]
        assert psnr(runner.run(x), ref) >= FLOOR_DB
    finally:
        runner.close()
    entry = cache_entries(cache)[sel.model_key(bundle)]
    assert entry["runtime"] == "onnxruntime" and entry["threads"] == 1
    summary = choice.summary()
    assert summary["mode"] == "auto" and summary["runtime"] == "onnxruntime"
    json.dumps(summary, allow_nan=False)  # status-safe


def test_a_cached_choice_is_reused_without_timing(nets: dict[str, Any], tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    bundle = load_bundle(write_bundle(tmp_path / "b", {"onnxruntime": nets["files"]["onnx_int8"]},
                                      nets["golden"]))
    cache = tmp_path / "choice.json"
    first, choice = sel.choose_runner(bundle, OPTS, cache)
    first.close()
    monkeypatch.setattr(sel, "_time", no_timing)
    runner, again = sel.choose_runner(bundle, OPTS, cache)
    runner.close()
    assert again.cached and again.runtime == choice.runtime
    assert again.guard.ok  # the guard still runs on a cached choice
    assert again.chosen_at == choice.chosen_at
    assert [c.runtime for c in again.candidates] == [c.runtime for c in choice.candidates]


def test_the_cache_is_per_model_digest_and_thread_count(
    nets: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / "choice.json"
    a = load_bundle(write_bundle(tmp_path / "a", {"onnxruntime": nets["files"]["onnx_int8"]},
                                 nets["golden"]))
    b = load_bundle(write_bundle(tmp_path / "b", {"onnxruntime": nets["files"]["onnx_fp32"]},
                                 nets["golden"]))
    assert sel.model_key(a) != sel.model_key(b)
    for bundle in (a, b):
        runner, choice = sel.choose_runner(bundle, OPTS, cache)
        runner.close()
        assert not choice.cached
    assert set(cache_entries(cache)) == {sel.model_key(a), sel.model_key(b)}
    runner, choice = sel.choose_runner(a, RunnerOptions(intra_op_threads=2), cache)
    runner.close()
    assert not choice.cached  # timed on another thread count: selected again
    monkeypatch.setattr(sel, "_time", no_timing)
    runner, choice = sel.choose_runner(a, RunnerOptions(intra_op_threads=2), cache)
    runner.close()
    assert choice.cached


def test_an_unreadable_cache_is_rebuilt(nets: dict[str, Any], tmp_path: Path) -> None:
    bundle = load_bundle(write_bundle(tmp_path / "b", {"onnxruntime": nets["files"]["onnx_int8"]},
                                      nets["golden"]))
    cache = tmp_path / "choice.json"
    cache.write_text("{not json")
    runner, choice = sel.choose_runner(bundle, OPTS, cache)
    runner.close()
    assert not choice.cached and sel.model_key(bundle) in cache_entries(cache)


def test_no_runtime_passing_the_guard_is_refused(nets: dict[str, Any], tmp_path: Path) -> None:
    bundle = load_bundle(write_bundle(
        tmp_path / "b", {"onnxruntime": nets["files"]["onnx_broken"]}, nets["golden"]))
    cache = tmp_path / "choice.json"
    with pytest.raises(GuardFailed) as info:
        sel.choose_runner(bundle, OPTS, cache)
    assert "no runtime serves" in str(info.value)
    assert "onnxruntime:" in str(info.value) and "misses its fidelity floor" in str(info.value)
    assert not info.value.report.ok
    assert not cache.exists()  # nothing chosen, nothing cached


def test_a_cached_runtime_that_now_fails_the_guard_is_dropped(
    nets: dict[str, Any], tmp_path: Path
) -> None:
    bundle = load_bundle(write_bundle(
        tmp_path / "b", {"onnxruntime": nets["files"]["onnx_broken"]}, nets["golden"]))
    cache = tmp_path / "choice.json"
    key = sel.model_key(bundle)
    cache.write_text(json.dumps({"format": 1, "choices": {key: {
        "runtime": "onnxruntime", "threads": 1, "installed": ["onnxruntime"],
        "chosen_at": "2026-01-01T00:00:00Z", "candidates": []}}}))
    with pytest.raises(GuardFailed):
        sel.choose_runner(bundle, OPTS, cache)
    assert key not in cache_entries(cache)


def test_no_installed_runtime_is_a_backend_error(nets: dict[str, Any], tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    bundle = load_bundle(write_bundle(tmp_path / "b", {"onnxruntime": nets["files"]["onnx_int8"]},
                                      nets["golden"]))
    monkeypatch.setattr(sel, "runtime_installed", lambda _rt: False)
    with pytest.raises(BackendError, match=r"no runtime can serve .*pip install onnxruntime"):
        sel.choose_runner(bundle, OPTS)


def test_a_bundle_for_unknown_runtimes_only_is_a_backend_error(
    nets: dict[str, Any], tmp_path: Path
) -> None:
    bundle = load_bundle(write_bundle(tmp_path / "b", {"onnxruntime": nets["files"]["onnx_int8"]},
                                      nets["golden"]))
    with pytest.raises(BackendError, match="no file for any runtime"):
        sel.choose_runner(bundle, OPTS, runtimes=("litert",))  # it has no .tflite


def test_the_tie_rule_prefers_the_earlier_runtime() -> None:
    assert sel._pick({"onnxruntime": 10.3, "litert": 10.0}) == "onnxruntime"  # within 5 %
    assert sel._pick({"onnxruntime": 12.0, "litert": 10.0}) == "litert"
    assert sel._pick({"litert": 3.0}) == "litert"


# --- both runtimes -----------------------------------------------------------------------


def _both(nets: dict[str, Any], root: Path, *, onnx: str = "onnx_int8",
          tfl: str = "tfl_int8") -> Any:
    return load_bundle(write_bundle(
        root, {"onnxruntime": nets["files"][onnx], "litert": nets["files"][tfl]},
        nets["golden"]))


@needs_litert
def test_times_both_and_picks_the_fastest_passing_one(nets: dict[str, Any],
                                                      tmp_path: Path) -> None:
    bundle = _both(nets, tmp_path / "b")
    runner, choice = sel.choose_runner(bundle, OPTS, tmp_path / "choice.json", rounds=3)
    try:
        by_rt = {c.runtime: c for c in choice.candidates}
        assert set(by_rt) == {"onnxruntime", "litert"}
        assert all(c.ok and c.median_ms is not None and c.median_ms > 0
                   for c in by_rt.values())
        expected = sel._pick({rt: c.median_ms for rt, c in by_rt.items()})  # type: ignore[misc]
        assert choice.runtime == runner.runtime == expected
        x, ref = nets["golden"]
        assert psnr(runner.run(x), ref) >= FLOOR_DB
    finally:
        runner.close()


@needs_litert
@pytest.mark.parametrize("fast", ["onnxruntime", "litert"])
def test_the_faster_runtime_wins(nets: dict[str, Any], tmp_path: Path,
                                 monkeypatch: pytest.MonkeyPatch, fast: str) -> None:
    monkeypatch.setattr(sel, "_time", medians(fast))
    runner, choice = sel.choose_runner(_both(nets, tmp_path / "b"), OPTS)
    runner.close()
    assert choice.runtime == fast


@needs_litert
def test_a_runtime_failing_the_guard_is_never_chosen(
    nets: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The corrupted int8 TFLite file would be the fastest; it is not even timed."""
    monkeypatch.setattr(sel, "_time", medians("litert"))
    cache = tmp_path / "choice.json"
    bundle = _both(nets, tmp_path / "b", tfl="tfl_broken")
    runner, choice = sel.choose_runner(bundle, OPTS, cache)
    runner.close()
    assert choice.runtime == "onnxruntime"
    litert = next(c for c in choice.candidates if c.runtime == "litert")
    assert not litert.ok and "misses its fidelity floor" in litert.reason
    assert litert.median_ms is None
    assert cache_entries(cache)[sel.model_key(bundle)]["runtime"] == "onnxruntime"

    monkeypatch.setattr(sel, "_time", medians("onnxruntime"))
    runner, choice = sel.choose_runner(_both(nets, tmp_path / "c", onnx="onnx_broken"), OPTS)
    runner.close()
    assert choice.runtime == "litert"

    with pytest.raises(GuardFailed) as info:
        sel.choose_runner(_both(nets, tmp_path / "d", onnx="onnx_broken", tfl="tfl_broken"),
                          OPTS)
    assert "onnxruntime:" in str(info.value) and "litert:" in str(info.value)


@needs_litert
def test_a_cache_naming_a_runtime_no_longer_installed_is_ignored(
    nets: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sel, "_time", medians("litert"))
    bundle = _both(nets, tmp_path / "b")
    cache = tmp_path / "choice.json"
    runner, choice = sel.choose_runner(bundle, OPTS, cache)
    runner.close()
    assert choice.runtime == "litert"
    monkeypatch.setattr(sel, "runtime_installed", lambda rt: rt == "onnxruntime")
    runner, choice = sel.choose_runner(bundle, OPTS, cache)
    runner.close()
    assert choice.runtime == "onnxruntime" and not choice.cached
