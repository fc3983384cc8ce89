"""agent.model.serving.load_model: the served model's sessions, one per model worker
(``model.workers``), on a real bundle and a real runtime."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from structlog.testing import capture_logs

from agent.backends import BackendError, RunnerOptions
from agent.config import ModelSection
from agent.model import serving
from agent.model.choice import WorkerPlan
from agent.model.serving import (
    SHARE_BELOW_MS,
    WORKERS_MIN_MS,
    load_model,
    worker_count,
    worker_plan,
)
from tests.bundles import make_scale_bundle


@pytest.fixture(scope="module")
def bundle_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_scale_bundle(tmp_path_factory.mktemp("serving") / "scale", factor=0.5)


@pytest.fixture
def opened(monkeypatch: pytest.MonkeyPatch) -> list[RunnerOptions]:
    """The options of every runner load_model opens, in order."""
    seen: list[RunnerOptions] = []
    real = serving.open_runner

    def recording(runtime: str, path: str, options: RunnerOptions) -> Any:
        seen.append(options)
        return real(runtime, path, options)

    monkeypatch.setattr(serving, "open_runner", recording)
    return seen


@pytest.fixture
def guarded(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The id of every runner serving runs the guard on, in order."""
    seen: list[int] = []
    real = serving.run_guard

    def counting(bundle: Any, runner: Any, **kw: Any) -> Any:
        seen.append(id(runner))
        return real(bundle, runner, **kw)

    monkeypatch.setattr(serving, "run_guard", counting)
    return seen


def test_each_worker_gets_its_own_session_of_the_served_file(
        bundle_root: Path, tmp_path: Path, opened: list[RunnerOptions],
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(serving, "usable_cpus", lambda: 4)
    served = load_model(ModelSection(bundle=bundle_root, workers=2), tmp_path)
    try:
        assert len(served.runners) == 2 and served.runners[0] is served.runner
        assert served.runners[0] is not served.runners[1]
        summary = served.summary()
        assert summary["workers"] == 2
        assert summary["workers_reason"] == "model.workers in the config"
        # The guarded session (all cores) is replaced by two with the cores shared out.
        assert [o.intra_op_threads for o in opened] == [0, 2, 2]
        x = np.linspace(0, 1, 256 * 256, dtype=np.float32).reshape(1, 1, 256, 256)
        a, b = (r.run(x) for r in served.runners)
        assert np.array_equal(a, b) and np.allclose(a, 0.5 * x, atol=1e-6)
    finally:
        served.close()


def test_a_thread_count_set_by_the_site_keeps_the_guarded_session(
        bundle_root: Path, tmp_path: Path, opened: list[RunnerOptions]) -> None:
    served = load_model(ModelSection(bundle=bundle_root, workers=3, intra_op_threads=1),
                        tmp_path)
    try:
        assert len(served.runners) == 3
        assert [o.intra_op_threads for o in opened] == [1, 1, 1]
    finally:
        served.close()


@pytest.mark.parametrize("cpus", [1, 2, 4])
def test_a_fast_model_keeps_one_session_on_a_share_of_the_cores(
        bundle_root: Path, tmp_path: Path, opened: list[RunnerOptions], guarded: list[int],
        monkeypatch: pytest.MonkeyPatch, cpus: int) -> None:
    """The scale model takes well under 5 ms: one worker, its session (guarded like the
    first) on half the cores, the rest for the agent's own work; on one core, all of it."""
    monkeypatch.setattr(serving, "usable_cpus", lambda: cpus)
    served = load_model(ModelSection(bundle=bundle_root), tmp_path)
    try:
        assert served.runners == (served.runner,) and served.summary()["workers"] == 1
        reason = served.summary()["workers_reason"]
        if cpus == 1:
            assert reason == "one core" and [o.intra_op_threads for o in opened] == [0]
            return
        assert reason.startswith("the model takes ") and reason.endswith(
            f"ms): one worker, as beside a model this fast a second one does not pay; its "
            f"session on {cpus // 2} of the {cpus} cores, the others left to the agent's own "
            "work (decode, derive, seal, delivery)")
        assert [o.intra_op_threads for o in opened] == [0, cpus // 2]
        assert guarded == [id(served.runner)]  # the all-core one's guard ran in check_guard
        x = np.ones((1, 1, 256, 256), np.float32)
        assert np.allclose(served.runner.run(x), 0.5)
    finally:
        served.close()


def test_a_fast_model_s_share_failing_its_guard_leaves_the_all_core_session(
        bundle_root: Path, tmp_path: Path, opened: list[RunnerOptions],
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(serving, "usable_cpus", lambda: 2)
    real = serving.run_guard

    def fails(bundle: Any, runner: Any, **kw: Any) -> Any:
        return replace(real(bundle, runner, **kw), ok=False, reason="22.1 dB < 50 dB")

    monkeypatch.setattr(serving, "run_guard", fails)
    served = load_model(ModelSection(bundle=bundle_root), tmp_path)
    try:
        assert [o.intra_op_threads for o in opened] == [0, 1]
        assert served.runners == (served.runner,) and served.guard.ok
        assert served.summary()["workers_reason"].endswith(
            "a further session failed the guard: 22.1 dB < 50 dB: its all-core session serves")
        assert np.allclose(served.runner.run(np.ones((1, 1, 256, 256), np.float32)), 0.5)
    finally:
        served.close()


def test_auto_runs_two_workers_for_a_slow_model_on_two_cores(
        monkeypatch: pytest.MonkeyPatch, bundle_root: Path) -> None:
    auto = ModelSection(bundle=bundle_root)
    assert auto.workers == 0
    monkeypatch.setattr(serving, "usable_cpus", lambda: 2)
    assert worker_count(auto, 13.2) == (2, "the model takes 13.2 ms per slice (>= 10 ms): "
                                           "two slices at once keep the 2 cores busier")
    assert worker_count(auto, WORKERS_MIN_MS - 0.1)[0] == 1
    assert worker_count(auto, 13.2, accelerated=True) == (1, "an accelerator serves the model")
    monkeypatch.setattr(serving, "usable_cpus", lambda: 1)
    assert worker_count(auto, 50.0) == (1, "one core")
    assert worker_count(ModelSection(bundle=bundle_root, workers=3), 1.0)[0] == 3


def test_every_further_session_is_guarded(bundle_root: Path, tmp_path: Path,
                                          guarded: list[int]) -> None:
    served = load_model(ModelSection(bundle=bundle_root, workers=2), tmp_path)
    try:
        assert sorted(guarded) == sorted(id(r) for r in served.runners)
    finally:
        served.close()


@pytest.mark.parametrize("threads", [0, 1])
def test_a_further_session_failing_its_guard_leaves_one_guarded_session(
        bundle_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        opened: list[RunnerOptions], threads: int) -> None:
    """threads 0: the all-core session was closed for the shared-out ones, so it is opened
    and guarded again; threads 1: the session load_model guarded stays."""
    calls: list[int] = []

    def first_fails(bundle: Any, runner: Any, **kw: Any) -> Any:
        calls.append(1)
        report = real(bundle, runner, **kw)
        return replace(report, ok=False, reason="22.1 dB < 50 dB") if len(calls) == 1 else report

    real = serving.run_guard
    monkeypatch.setattr(serving, "run_guard", first_fails)
    monkeypatch.setattr(serving, "usable_cpus", lambda: 2)
    with capture_logs() as logs:
        served = load_model(ModelSection(bundle=bundle_root, workers=2,
                                         intra_op_threads=threads), tmp_path)
    try:
        assert len(served.runners) == 1 and served.guard.ok
        assert served.runner.describe()["runtime"] == "onnxruntime"
        # threads 0: load_model's, the failed shared-out one, the all-core one again
        assert [o.intra_op_threads for o in opened] == ([0, 1, 0] if threads == 0 else [1, 1])
        assert len(calls) == (2 if threads == 0 else 1)
        assert served.summary()["workers_reason"] == (
            "a further session failed the guard: 22.1 dB < 50 dB; one guarded session serves")
        assert [e["wanted"] for e in logs if e["event"] == "model_workers"] == [2]
        x = np.ones((1, 1, 256, 256), np.float32)
        assert np.allclose(served.runner.run(x), 0.5)  # open and serving
    finally:
        served.close()


def test_a_further_session_that_cannot_open_leaves_the_guarded_one_alone(
        bundle_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real, calls = serving.open_runner, []

    def second_fails(runtime: str, path: str, options: RunnerOptions) -> Any:
        calls.append(path)
        if len(calls) >= 2:
            raise BackendError("onnxruntime cannot load it: out of memory")
        return real(runtime, path, options)

    monkeypatch.setattr(serving, "open_runner", second_fails)
    served = load_model(ModelSection(bundle=bundle_root, workers=2, intra_op_threads=1),
                        tmp_path)
    try:
        assert len(served.runners) == 1
        assert "could not be opened: onnxruntime cannot load it" in (
            served.summary()["workers_reason"])
    finally:
        served.close()


def test_auto_chooses_on_a_worker_s_share_of_the_cores_and_serves_that_session(
        bundle_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With two workers on two cores, ``auto`` guards and times its candidates on 1-thread
    sessions and hands the chosen one over as the first worker: no session is opened twice,
    and a restart opens the two 1-thread sessions only."""
    seen = _record_opened(monkeypatch)
    monkeypatch.setattr(serving, "usable_cpus", lambda: 2)
    settings = ModelSection(bundle=bundle_root, backend="auto", workers=2)
    for restart in (False, True):
        seen.clear()
        served = load_model(settings, tmp_path)
        try:
            assert served.selection is not None
            assert served.selection.cached is restart
            assert (served.selection.workers, served.selection.worker_threads) == (2, 1)
            assert len(served.runners) == 2
            # first start: the candidate on all cores, then on one thread (chosen), one more
            assert seen == ([1, 1] if restart else [0, 1, 1])
            summary = served.summary()
            assert summary["workers"] == 2 and summary["selection"]["worker_threads"] == 1
        finally:
            served.close()


def test_the_worker_plan_auto_ranks_on_follows_the_config_and_the_cores(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(serving, "usable_cpus", lambda: 4)
    assert worker_plan() == WorkerPlan(workers=2, threads=2, min_ms=WORKERS_MIN_MS,
                                       share_below_ms=SHARE_BELOW_MS)
    assert worker_plan(workers=4) == WorkerPlan(workers=4, threads=1, min_ms=0.0)
    assert worker_plan(workers=1) is None
    assert worker_plan(intra_op_threads=2) is None  # the site's thread count holds
    monkeypatch.setattr(serving, "usable_cpus", lambda: 1)
    assert worker_plan(workers=2) is None  # a worker's share would be all of the one core


def _record_opened(monkeypatch: pytest.MonkeyPatch,
                   runners: list[Any] | None = None) -> list[int]:
    """The threads of every session opened, in order (and the sessions, into ``runners``)."""
    from agent.model import candidates, select

    seen: list[int] = []
    real = select.open_runner

    def recording(runtime: str, path: str, options: RunnerOptions) -> Any:
        seen.append(options.intra_op_threads)
        runner = real(runtime, path, options)
        if runners is not None:
            runners.append(runner)
        return runner

    for module in (select, candidates, serving):
        monkeypatch.setattr(module, "open_runner", recording)
    return seen


def test_auto_s_per_worker_choice_says_why_it_serves_two_workers(
        bundle_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """model.workers = 0: the plan applied to auto's fastest all-core median (the scale
    model is fast, so the threshold is lowered here to make it apply)."""
    monkeypatch.setattr(serving, "usable_cpus", lambda: 2)
    monkeypatch.setattr(serving, "WORKERS_MIN_MS", 0.0)
    served = load_model(ModelSection(bundle=bundle_root, backend="auto"), tmp_path)
    try:
        assert served.selection is not None and served.selection.worker_threads == 1
        reason = served.summary()["workers_reason"]
        assert served.selection.plan_ms is not None
        assert reason == (
            f"auto's pick on all cores took {served.selection.plan_ms:.1f} ms per slice (>= 0 "
            "ms): two slices at once keep the 2 cores busier; auto ranked its candidates on "
            "1-thread sessions, as each of the 2 workers runs them")
        assert "the agent's own work" not in reason
    finally:
        served.close()


def test_auto_s_per_worker_choice_falls_back_to_one_session_on_all_cores(
        bundle_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The second 1-thread session fails its guard: the chosen one is closed, one session
    on all cores serves, and the status no longer claims auto's two workers."""
    sessions: list[Any] = []
    seen = _record_opened(monkeypatch, sessions)
    monkeypatch.setattr(serving, "usable_cpus", lambda: 2)
    real, calls = serving.run_guard, []

    def first_fails(bundle: Any, runner: Any, **kw: Any) -> Any:
        calls.append(1)
        report = real(bundle, runner, **kw)
        return replace(report, ok=False, reason="22.1 dB < 50 dB") if len(calls) == 1 else report

    monkeypatch.setattr(serving, "run_guard", first_fails)
    served = load_model(ModelSection(bundle=bundle_root, backend="auto", workers=2), tmp_path)
    try:
        assert served.runners == (served.runner,) and served.guard.ok
        assert seen == [0, 1, 1, 0]  # all cores, the chosen 1-thread one, the failed, all again
        assert sessions[-1] is served.runner
        for closed in sessions[:-1]:  # auto's 1-thread pick too: nothing else is left open
            with pytest.raises(BackendError):
                closed.run(np.ones((1, 1, 256, 256), np.float32))
        assert served.selection.guard is served.guard and served.selection.plan_ms is None
        assert served.selection is not None
        assert (served.selection.workers, served.selection.worker_threads) == (1, None)
        summary = served.summary()
        assert summary["workers"] == 1 and "worker_threads" not in summary["selection"]
        assert summary["workers_reason"] == (
            "a further session failed the guard: 22.1 dB < 50 dB; one guarded session serves "
            "on all cores (auto had ranked the candidates per worker)")
        x = np.ones((1, 1, 256, 256), np.float32)
        assert np.allclose(served.runner.run(x), 0.5)
    finally:
        served.close()


def test_where_auto_found_no_worker_s_share_passing_serving_opens_no_further_session(
        bundle_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """auto's 1-thread sessions fail their guard: one session on all cores serves, on the
    first start and from the cache, and no 1-thread session is tried again after auto's."""
    from agent.model import candidates

    seen = _record_opened(monkeypatch)
    monkeypatch.setattr(serving, "usable_cpus", lambda: 2)
    real = candidates.run_guard

    def one_thread_fails(bundle: Any, runner: Any, **kw: Any) -> Any:
        report = real(bundle, runner, **kw)
        return replace(report, ok=False, reason="22.1 dB < 50 dB") if seen[-1] == 1 \
            else report

    monkeypatch.setattr(candidates, "run_guard", one_thread_fails)
    monkeypatch.setattr(serving, "run_guard", one_thread_fails)
    settings = ModelSection(bundle=bundle_root, backend="auto", workers=2)
    for restart in (False, True):
        seen.clear()
        served = load_model(settings, tmp_path)
        try:
            assert served.selection is not None and served.selection.cached is restart
            assert seen == ([0] if restart else [0, 1, 0])
            assert served.runners == (served.runner,)
            summary = served.summary()
            assert summary["workers"] == 1 and "worker_threads" not in summary["selection"]
            assert summary["workers_reason"] == (
                "no 1-thread session of onnxruntime fp32 passed the guard; one guarded "
                "session serves on all cores")
        finally:
            served.close()


def test_auto_serves_a_fast_model_on_one_worker_s_share_of_the_cores(
        bundle_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The default config (``model.workers = 0``) on two cores, a model far under 5 ms:
    auto ranks on 1-thread sessions and serves its pick there as the one worker; a restart
    opens that session only."""
    seen = _record_opened(monkeypatch)
    monkeypatch.setattr(serving, "usable_cpus", lambda: 2)
    settings = ModelSection(bundle=bundle_root, backend="auto")
    for restart in (False, True):
        seen.clear()
        served = load_model(settings, tmp_path)
        try:
            assert served.selection is not None and served.selection.cached is restart
            assert (served.selection.workers, served.selection.worker_threads) == (1, 1)
            assert served.runners == (served.runner,)
            assert seen == ([1] if restart else [0, 1])  # all cores, then a 1-thread session
            reason = served.summary()["workers_reason"]
            assert served.selection.plan_ms is not None
            assert reason == (
                f"auto's pick on all cores took {served.selection.plan_ms:.1f} ms per slice "
                "(< 5 ms): one model worker, its session on 1 of the 2 cores, the others "
                "left to the agent's own work (decode, derive, seal, delivery); auto ranked "
                "its candidates on 1-thread sessions, as that worker runs them")
        finally:
            served.close()


def test_between_the_thresholds_one_session_serves_on_all_cores(
        bundle_root: Path, tmp_path: Path, opened: list[RunnerOptions],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """5-10 ms on all cores: one 1-thread session would make the model the slowest stage
    (onnxruntime's AVX2 kernels, lite 1.1.0), so the guarded all-core one serves alone."""
    monkeypatch.setattr(serving, "usable_cpus", lambda: 2)
    monkeypatch.setattr(serving, "served_ms", lambda _model: 7.0)
    served = load_model(ModelSection(bundle=bundle_root), tmp_path)
    try:
        assert [o.intra_op_threads for o in opened] == [0]
        assert served.summary()["workers_reason"] == (
            "the model takes 7.0 ms per slice (< 10 ms): one worker, as beside a model this "
            "fast a second one does not pay")
    finally:
        served.close()
