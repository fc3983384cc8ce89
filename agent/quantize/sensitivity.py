"""Per-layer quantization error, and the ranking the sensitivity pass keeps nodes float by.

Both models run with graph optimisations off and every intermediate tensor exposed
(``onnxruntime.quantization.qdq_loss_debug``: the QDQ model then computes each quantized
node as dequantize -> float op -> quantize, the reference semantics). Tensors are matched by
name (``create_activation_matching``); the error figures are SQNR, 10 log10(signal energy /
error energy), accumulated over the inputs one at a time so that memory holds one input's
activations only:

* ``sqnr_db``: a node's output after its output quantization, against the float model's
  same tensor: everything lost up to and including this node;
* ``input_sqnr_db``: the worst of the quantized activations it reads;
* ``drop_db`` = input - output: what this node itself loses (its weights, its arithmetic,
  its output's range). The sensitivity pass keeps the nodes with the largest drop in float
  first: a node downstream of a bad one inherits its error but does not add to it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from agent.quantize.graph import QDQ_OPS

Floats = npt.NDArray[np.float32]
NO_ERROR_DB = 100.0  # SQNR reported for an exact tensor (no error energy)


@dataclass(frozen=True)
class LayerError:
    """One quantized node's error figures (dB)."""

    node: str
    op_type: str
    tensor: str
    sqnr_db: float
    input_sqnr_db: float
    drop_db: float

    def as_dict(self) -> dict[str, Any]:
        return {"node": self.node, "op_type": self.op_type, "tensor": self.tensor,
                "sqnr_db": round(self.sqnr_db, 2), "input_sqnr_db": round(self.input_sqnr_db, 2),
                "drop_db": round(self.drop_db, 2)}


def _sqnr(signal: float, noise: float) -> float:
    if noise <= 0:
        return NO_ERROR_DB
    if signal <= 0:
        return -NO_ERROR_DB
    return min(NO_ERROR_DB, 10 * math.log10(signal / noise))


def _session(path: Path, threads: int) -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.intra_op_num_threads = threads
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


def _activations(session: Any, feed: dict[str, Floats]) -> dict[str, list[np.ndarray]]:
    from onnxruntime.quantization import qdq_loss_debug

    # The suffix modify_model_output_intermediate_tensors gives the tensors it exposes.
    suffix = str(getattr(qdq_loss_debug, "_TENSOR_SAVE_POSTFIX", "_ReshapedSavedOutput"))
    names = [o.name for o in session.get_outputs()]
    values = session.run(None, feed)
    return {n[: -len(suffix)]: [v] for n, v in zip(names, values, strict=True)
            if n.endswith(suffix)}


def _energies(float_model: Path, qdq_model: Path, workdir: Path, input_name: str,
              inputs: Sequence[Floats], threads: int) -> dict[str, list[float]]:
    """tensor -> [float energy, error energy after QDQ], summed over ``inputs``."""
    from onnxruntime.quantization.qdq_loss_debug import (
        create_activation_matching,
        modify_model_output_intermediate_tensors,
    )

    float_aug, qdq_aug = workdir / "debug.float.onnx", workdir / "debug.qdq.onnx"
    modify_model_output_intermediate_tensors(str(float_model), str(float_aug))
    modify_model_output_intermediate_tensors(str(qdq_model), str(qdq_aug))
    fs, qs = _session(float_aug, threads), _session(qdq_aug, threads)
    sums: dict[str, list[float]] = {}
    for x in inputs:
        feed = {input_name: np.ascontiguousarray(x[None], dtype=np.float32)}
        matching = create_activation_matching(_activations(qs, feed), _activations(fs, feed))
        for name, match in matching.items():
            if "float" not in match:
                continue
            ref = np.asarray(match["float"][0], dtype=np.float64)
            post = np.asarray(match["post_qdq"][0], dtype=np.float64)
            if ref.shape != post.shape:
                continue
            acc = sums.setdefault(name, [0.0, 0.0])
            acc[0] += float(np.sum(ref * ref))
            acc[1] += float(np.sum((ref - post) ** 2))
    return sums


def layer_errors(float_model: Path, qdq_model: Path, workdir: Path, input_name: str,
                 inputs: Sequence[Floats], threads: int = 0) -> list[LayerError]:
    """Error figures of every quantized node of ``qdq_model`` (made from ``float_model``,
    same tensor names) over ``inputs`` ([C, H, W] each), in graph order."""
    import onnx
    from onnxruntime.quantization.quant_utils import DEQUANT_OUTPUT_SUFFIX, QUANT_INPUT_SUFFIX

    sums = _energies(float_model, qdq_model, workdir, input_name, inputs, threads)
    sqnr = {name: _sqnr(s, n) for name, (s, n) in sums.items()}
    graph = onnx.load(str(qdq_model)).graph
    out: list[LayerError] = []
    for node in graph.node:
        if node.op_type in QDQ_OPS or not node.name:
            continue
        ins = [i.removesuffix(DEQUANT_OUTPUT_SUFFIX) for i in node.input
               if i.endswith(DEQUANT_OUTPUT_SUFFIX) or i in sqnr]
        in_db = [sqnr[i] for i in ins if i in sqnr]
        if not in_db:
            continue  # reads no quantized activation: not a quantized node
        tensor = node.output[0].removesuffix(QUANT_INPUT_SUFFIX)
        if tensor not in sqnr:
            continue  # output not compared (not a float tensor of the float model)
        worst_in = min(in_db)
        out.append(LayerError(node.name, node.op_type, tensor, sqnr[tensor], worst_in,
                              max(0.0, worst_in - sqnr[tensor])))
    return out


def ranking(errors: Sequence[LayerError], candidates: Sequence[str]) -> list[LayerError]:
    """The candidate nodes by how much they lose, worst first (ties: graph order)."""
    allowed = set(candidates)
    ranked = [e for e in errors if e.node in allowed]
    return sorted(ranked, key=lambda e: -e.drop_db)
