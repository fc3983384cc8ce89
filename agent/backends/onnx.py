"""onnxruntime: the CPU provider everywhere; TensorRT and CUDA where the installed
onnxruntime build has them (``onnxruntime-gpu``, JetPack's wheel on a Jetson)."""

from __future__ import annotations

from typing import Any

import numpy as np

from agent.backends.base import (
    GRAPH_OPTIMIZATION_LEVELS,
    ONNX_PROVIDERS,
    Array,
    BackendError,
    ModelRunner,
    RunnerOptions,
)


def provider_list(wanted: tuple[str, ...], available: list[str],
                  options: RunnerOptions) -> list[str | tuple[str, dict[str, str]]]:
    """The providers to ask onnxruntime for: the wanted ones this build has, in the wanted
    order, then the CPU provider. Unknown names raise ``BackendError``."""
    unknown = [w for w in wanted if w not in ONNX_PROVIDERS]
    if unknown:
        raise BackendError(f"unknown onnxruntime provider(s) {unknown}; known: "
                           f"{', '.join(ONNX_PROVIDERS)}")
    chosen: list[str | tuple[str, dict[str, str]]] = []
    for name in wanted:
        provider = ONNX_PROVIDERS[name]
        if provider not in available or name == "cpu":
            continue
        if name == "tensorrt" and options.cache_dir is not None:
            # Building a TensorRT engine takes minutes on a Jetson: keep it across restarts.
            chosen.append((provider, {
                "trt_engine_cache_enable": "True",
                "trt_engine_cache_path": str(options.cache_dir / "tensorrt"),
                "trt_int8_enable": "True",
            }))
        else:
            chosen.append(provider)
    chosen.append(ONNX_PROVIDERS["cpu"])
    return chosen


class OnnxRunner(ModelRunner):
    runtime = "onnxruntime"

    def __init__(self, model_path: str, options: RunnerOptions) -> None:
        import onnxruntime as ort

        if options.graph_optimization not in GRAPH_OPTIMIZATION_LEVELS:
            raise BackendError(f"unknown graph optimisation level {options.graph_optimization!r}"
                               f"; known: {', '.join(GRAPH_OPTIMIZATION_LEVELS)}")
        levels = {
            "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
            "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        }
        so = ort.SessionOptions()
        so.intra_op_num_threads = options.intra_op_threads
        so.inter_op_num_threads = options.inter_op_threads
        so.graph_optimization_level = levels[options.graph_optimization]
        # Idle worker threads otherwise spin on the cores the rest of the pipeline needs.
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        providers = provider_list(options.onnx_providers, ort.get_available_providers(), options)
        if providers == [ONNX_PROVIDERS["cpu"]]:
            # The memory pattern keeps a second, preplanned block of every activation beside
            # the arena: 25 MB more per session for the lite model at 256 x 256, no faster on
            # the CPU (medians within 4 % either way, AVX2 kernels, 2 threads). Not measured
            # with an accelerator's provider, so left on there.
            so.enable_mem_pattern = False
        if options.cache_dir is not None and len(providers) > 1:
            (options.cache_dir / "tensorrt").mkdir(parents=True, exist_ok=True)
        try:
            session = ort.InferenceSession(model_path, sess_options=so, providers=providers)
        except Exception as exc:  # onnxruntime raises its own untyped exceptions
            raise BackendError(f"onnxruntime cannot load {model_path}: {exc}") from exc
        self._session: ort.InferenceSession | None = session
        self._providers = tuple(session.get_providers())
        inputs = {i.name for i in session.get_inputs()}
        outputs = {o.name for o in session.get_outputs()}
        if options.input_name not in inputs or options.output_name not in outputs:
            raise BackendError(
                f"{model_path}: expected tensors {options.input_name!r} -> {options.output_name!r},"
                f" model has {sorted(inputs)} -> {sorted(outputs)}"
            )
        self._input = options.input_name
        self._output = options.output_name
        self.wanted_providers = options.onnx_providers
        self.graph_optimization = options.graph_optimization

    @property
    def providers(self) -> list[str]:
        """The providers the session actually uses, in priority order."""
        return list(self._providers)

    def describe(self) -> dict[str, Any]:
        short = {v: k for k, v in ONNX_PROVIDERS.items()}
        return {
            "runtime": self.runtime,
            "providers": [short.get(p, p) for p in self.providers],
            "graph_optimization": self.graph_optimization,
        }

    def run(self, batch: Array) -> Array:
        if self._session is None:
            raise BackendError("this onnxruntime session is closed")
        out = self._session.run([self._output], {self._input: np.ascontiguousarray(batch)})
        return np.asarray(out[0], dtype=np.float32)

    def close(self) -> None:
        """Drop the session: onnxruntime frees its memory (weights, arena) with it, not at
        the runner's own end, which a caller holding the runner may delay."""
        self._session = None
