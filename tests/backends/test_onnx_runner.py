"""onnxruntime runner options: execution providers and graph optimisation from config."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from agent.backends import BackendError, RunnerOptions, open_runner, runner_options
from agent.backends.onnx import provider_list
from agent.config import ModelSection
from agent.model.bundle import load_bundle
from tests.bundles import make_scale_bundle

ALL = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]


def test_wanted_providers_in_order_where_the_build_has_them(tmp_path: Path) -> None:
    opts = RunnerOptions(cache_dir=tmp_path)
    # A Jetson build with everything: TensorRT (engine cache in the state dir), CUDA, CPU.
    got = provider_list(("tensorrt", "cuda", "cpu"), ALL, opts)
    assert got[0][0] == "TensorrtExecutionProvider"  # type: ignore[index]
    assert got[0][1]["trt_engine_cache_path"] == str(tmp_path / "tensorrt")  # type: ignore[index]
    assert got[1:] == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    # The CPU-only wheel: whatever was asked, the CPU provider serves.
    assert provider_list(("tensorrt", "cuda", "cpu"), ALL[2:], opts) == ["CPUExecutionProvider"]
    # Order is the config's; the CPU provider is always the last fallback.
    assert provider_list(("cuda",), ALL, opts) == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    with pytest.raises(BackendError, match="unknown onnxruntime provider"):
        provider_list(("rocm",), ALL, opts)


def test_runner_takes_providers_and_optimisation_from_config(tmp_path: Path) -> None:
    root = make_scale_bundle(tmp_path / "b", factor=0.5)
    bundle = load_bundle(root)
    section = ModelSection(bundle=root, graph_optimization="basic", intra_op_threads=1)
    options = runner_options(section, bundle, tmp_path / "state")
    assert options.onnx_providers == ("tensorrt", "cuda", "cpu")
    runner = open_runner("onnxruntime", str(bundle.backend_file("onnxruntime").path), options)
    described = runner.describe()
    # This machine's onnxruntime is the CPU build: the status names what actually serves.
    assert described["providers"][-1] == "cpu"
    assert described["graph_optimization"] == "basic"
    x = np.ones((1, 1, 256, 256), dtype=np.float32)
    assert float(runner.run(x)[0, 0, 0, 0]) == pytest.approx(0.5)
    with pytest.raises(BackendError, match="graph optimisation level"):
        open_runner("onnxruntime", str(bundle.backend_file("onnxruntime").path),
                    RunnerOptions(graph_optimization="max"))


def test_a_closed_runner_frees_its_session_and_says_so(tmp_path: Path) -> None:
    root = make_scale_bundle(tmp_path / "scale")
    bundle = load_bundle(root)
    runner = open_runner("onnxruntime", str(bundle.backend_file("onnxruntime").path),
                         RunnerOptions(intra_op_threads=1))
    x = np.ones((1, 1, 256, 256), np.float32)
    assert np.allclose(runner.run(x), 0.5)
    runner.close()
    assert runner.describe()["providers"] == ["cpu"]  # still describes what served
    with pytest.raises(BackendError, match="closed"):
        runner.run(x)
    runner.close()  # twice is fine
