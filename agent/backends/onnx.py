"""onnxruntime on the CPU."""

from __future__ import annotations

import numpy as np

from agent.backends.base import Array, BackendError, ModelRunner, RunnerOptions


class OnnxRunner(ModelRunner):
    runtime = "onnxruntime"

    def __init__(self, model_path: str, options: RunnerOptions) -> None:
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads = options.intra_op_threads
        so.inter_op_num_threads = options.inter_op_threads
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Idle worker threads otherwise spin on the cores the rest of the pipeline needs.
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            self._session = ort.InferenceSession(
                model_path, sess_options=so, providers=["CPUExecutionProvider"]
            )
        except Exception as exc:  # onnxruntime raises its own untyped exceptions
            raise BackendError(f"onnxruntime cannot load {model_path}: {exc}") from exc
        inputs = {i.name for i in self._session.get_inputs()}
        outputs = {o.name for o in self._session.get_outputs()}
        if options.input_name not in inputs or options.output_name not in outputs:
            raise BackendError(
                f"{model_path}: expected tensors {options.input_name!r} -> {options.output_name!r},"
                f" model has {sorted(inputs)} -> {sorted(outputs)}"
            )
        self._input = options.input_name
        self._output = options.output_name

    def run(self, batch: Array) -> Array:
        out = self._session.run([self._output], {self._input: np.ascontiguousarray(batch)})
        return np.asarray(out[0], dtype=np.float32)
