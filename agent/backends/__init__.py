"""Inference runtimes behind one small interface (see ``base.ModelRunner``).

| module | job |
|---|---|
| ``base`` | the interface: float32 NCHW in and out, session built once; ``BackendError`` |
| ``onnx`` | onnxruntime (CPU provider; TensorRT/CUDA where installed) |
| ``litert`` | LiteRT through XNNPACK (``ai_edge_litert``, ``tflite_runtime`` as fallback) |

Each runtime lives in its own module and imports its library lazily, so an agent that never
uses a runtime never pays for importing it. This package imports nothing above it;
``agent.model.select`` picks a runtime for ``backend = "auto"``.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import TYPE_CHECKING

from agent.backends.base import BackendError, ModelRunner, RunnerOptions

if TYPE_CHECKING:
    from agent.config import ModelSection
    from agent.model.bundle import ModelBundle

# In order of preference when two are equally fast (see agent.model.select).
RUNTIMES = ("onnxruntime", "litert")
_PACKAGES = {"onnxruntime": ("onnxruntime",), "litert": ("ai_edge_litert", "tflite_runtime")}
INSTALL_HINTS = {
    "onnxruntime": "pip install onnxruntime",
    # A core dependency of the agent, so this only happens in a broken or a 32-bit ARM
    # install (no ai-edge-litert wheel there; tflite-runtime is used where installed).
    "litert": "pip install ai-edge-litert",
}


def runtime_installed(runtime: str) -> bool:
    """Whether the runtime's library can be imported (found without importing it)."""
    return any(importlib.util.find_spec(p) is not None for p in _PACKAGES.get(runtime, ()))


def runner_options(model: ModelSection, bundle: ModelBundle,
                   cache_dir: Path | None = None) -> RunnerOptions:
    """The runner options the config's [model] section asks for, for this bundle."""
    return RunnerOptions(
        intra_op_threads=model.intra_op_threads,
        inter_op_threads=model.inter_op_threads,
        input_name=bundle.input.input_name,
        output_name=bundle.output.output_name,
        onnx_providers=tuple(model.onnx_providers),
        graph_optimization=model.graph_optimization,
        cache_dir=cache_dir,
    )


def open_runner(runtime: str, model_path: str, options: RunnerOptions) -> ModelRunner:
    """Build the runner for ``runtime`` (session built once, here). What the runtime prints
    natively while it loads becomes log events (``agent.backends.native_stderr``)."""
    from agent.backends.native_stderr import native_stderr_as_events

    if runtime == "onnxruntime":
        from agent.backends.onnx import OnnxRunner

        with native_stderr_as_events(runtime):
            return OnnxRunner(model_path, options)
    if runtime == "litert":
        from agent.backends.litert import LiteRTRunner

        with native_stderr_as_events(runtime):
            return LiteRTRunner(model_path, options)
    raise BackendError(f"unknown runtime {runtime!r}; available: {', '.join(RUNTIMES)}")


__all__ = [
    "INSTALL_HINTS",
    "RUNTIMES",
    "BackendError",
    "ModelRunner",
    "RunnerOptions",
    "open_runner",
    "runner_options",
    "runtime_installed",
]
