"""Inference runtimes behind one small interface (see ``base.ModelRunner``).

Each runtime lives in its own module and imports its library lazily, so an agent that never
uses a runtime never pays for importing it.
"""

from __future__ import annotations

from agent.backends.base import BackendError, ModelRunner, RunnerOptions


def open_runner(runtime: str, model_path: str, options: RunnerOptions) -> ModelRunner:
    """Build the runner for ``runtime`` (session built once, here)."""
    if runtime == "onnxruntime":
        from agent.backends.onnx import OnnxRunner

        return OnnxRunner(model_path, options)
    raise BackendError(f"unknown runtime {runtime!r}; available: onnxruntime")


__all__ = ["BackendError", "ModelRunner", "RunnerOptions", "open_runner"]
