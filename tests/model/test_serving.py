"""agent.model.serving.load_model: the served model's sessions, one per model worker
(``model.workers``), on a real bundle and a real runtime."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from agent.config import ModelSection
from agent.model import serving
from agent.model.serving import load_model, usable_cpus, worker_count
from tests.bundles import make_scale_bundle


@pytest.fixture(scope="module")
def bundle_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_scale_bundle(tmp_path_factory.mktemp("serving") / "scale", factor=0.5)


def test_each_worker_gets_its_own_session_of_the_served_file(bundle_root: Path,
                                                            tmp_path: Path) -> None:
    served = load_model(ModelSection(bundle=bundle_root, workers=2), tmp_path)
    try:
        assert len(served.runners) == 2 and served.runners[0] is served.runner
        assert served.runners[0] is not served.runners[1]
        assert served.summary()["workers"] == 2
        x = np.linspace(0, 1, 256 * 256, dtype=np.float32).reshape(1, 1, 256, 256)
        a, b = (r.run(x) for r in served.runners)
        assert np.array_equal(a, b) and np.allclose(a, 0.5 * x, atol=1e-6)
    finally:
        served.close()


def test_one_worker_keeps_one_session(bundle_root: Path, tmp_path: Path) -> None:
    served = load_model(ModelSection(bundle=bundle_root, workers=1), tmp_path)
    try:
        assert served.runners == (served.runner,) and served.summary()["workers"] == 1
    finally:
        served.close()


def test_auto_runs_two_workers_where_there_are_two_cores(monkeypatch: pytest.MonkeyPatch,
                                                         bundle_root: Path) -> None:
    auto = ModelSection(bundle=bundle_root)
    assert auto.workers == 0
    assert worker_count(auto) == (2 if usable_cpus() >= 2 else 1)
    monkeypatch.setattr(serving, "usable_cpus", lambda: 1)
    assert worker_count(auto) == 1
    assert worker_count(ModelSection(bundle=bundle_root, workers=3)) == 3


def test_the_cores_are_shared_out_between_workers(monkeypatch: pytest.MonkeyPatch,
                                                 bundle_root: Path, tmp_path: Path) -> None:
    seen: list[int] = []
    real = serving.open_runner

    def recording(runtime, path, options):  # type: ignore[no-untyped-def]
        seen.append(options.intra_op_threads)
        return real(runtime, path, options)

    monkeypatch.setattr(serving, "open_runner", recording)
    monkeypatch.setattr(serving, "usable_cpus", lambda: 4)
    load_model(ModelSection(bundle=bundle_root, workers=2), tmp_path).close()
    assert seen == [2, 2]  # intra_op_threads = 0: 4 cores, 2 each
    seen.clear()
    load_model(ModelSection(bundle=bundle_root, workers=2, intra_op_threads=3), tmp_path).close()
    assert seen == [3, 3]  # set by the site: kept
