"""Multiply-accumulates per item, counted from an ONNX graph.

Used when ``bundle.json`` has no ``compute.gmac``. The graph's input is pinned to one item
of the contract's shape ([1, C, H, W]), ``onnx`` shape inference gives every tensor's
shape, and the MAC-bearing operators are counted the way the model recipes count
(``models/recipes/unet.py``: Conv MACs; ReLU, pooling, resize and concat are not MACs):

* Conv / ConvInteger / QLinearConv: output elements x (C_in / groups) x kH x kW;
* ConvTranspose: input elements x (C_out / groups) x kH x kW;
* MatMul / MatMulInteger / QLinearMatMul / Gemm: output elements x K.

A QDQ int8 graph counts like its fp32 twin (its Conv weights come out of
DequantizeLinear, whose output shape inference knows). Needs the ``onnx`` package, which is
not a dependency of the agent: without it the caller reports the count as unknown.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from agent.errors import AgentError

# operator -> index of its weight input (Conv kinds) or of its A input (MatMul kinds)
_WEIGHTED = {
    "Conv": 1,
    "ConvInteger": 1,
    "QLinearConv": 3,
    "ConvTranspose": 1,
}
_MATMUL = {"MatMul": 0, "MatMulInteger": 0, "QLinearMatMul": 0, "Gemm": 0}


class MacCountError(AgentError):
    """The graph's MACs cannot be counted (a shape that inference cannot fix)."""


def _shapes(model: Any) -> dict[str, list[int]]:
    graph = model.graph
    shapes: dict[str, list[int]] = {}
    for info in (*graph.input, *graph.value_info, *graph.output):
        dims = info.type.tensor_type.shape.dim
        if all(d.HasField("dim_value") for d in dims):
            shapes[info.name] = [int(d.dim_value) for d in dims]
    for init in graph.initializer:
        shapes[init.name] = [int(d) for d in init.dims]
    return shapes


def _need(shapes: dict[str, list[int]], name: str, op: str) -> list[int]:
    try:
        return shapes[name]
    except KeyError:
        raise MacCountError(f"shape inference left the shape of {name!r} ({op}) "
                            "unknown") from None


def count_macs(path: Path, input_name: str, item_shape: tuple[int, ...]) -> int:
    """MACs for one item shaped ``item_shape`` ([C, H, W]) through the ONNX model at
    ``path``. Raises ``ImportError`` without ``onnx``, ``MacCountError`` when a shape
    stays unknown."""
    import onnx
    from onnx import shape_inference

    model = onnx.load(str(path))
    graph_inputs = [i for i in model.graph.input if i.name == input_name]
    if not graph_inputs:
        raise MacCountError(f"{path.name} has no input {input_name!r}")
    dims = graph_inputs[0].type.tensor_type.shape.dim
    want = (1, *item_shape)
    if len(dims) != len(want):
        raise MacCountError(f"{path.name}: input {input_name!r} has {len(dims)} dimensions, "
                            f"expected {len(want)}")
    for dim, value in zip(dims, want, strict=True):
        dim.ClearField("dim_param")
        dim.dim_value = value
    try:
        inferred = shape_inference.infer_shapes(model, data_prop=True)
    except Exception as exc:  # onnx raises its own InferenceError (and others)
        raise MacCountError(f"{path.name}: shape inference failed ({exc})") from None
    shapes = _shapes(inferred)
    total = 0
    for node in inferred.graph.node:
        op = node.op_type
        if op in _WEIGHTED:
            w = _need(shapes, node.input[_WEIGHTED[op]], op)
            if op == "ConvTranspose":
                # weights [C_in, C_out / groups, kH, kW]: each input element feeds them all
                total += math.prod(_need(shapes, node.input[0], op)) * math.prod(w[1:])
            else:
                total += math.prod(_need(shapes, node.output[0], op)) * math.prod(w[1:])
        elif op in _MATMUL:
            a = _need(shapes, node.input[_MATMUL[op]], op)
            trans_a = any(at.name == "transA" and at.i for at in node.attribute)
            k = a[-2] if (op == "Gemm" and trans_a) else a[-1]
            total += math.prod(_need(shapes, node.output[0], op)) * k
    return total
