"""What the ONNX graph says: does the float model fit the contract, how much does it compute,
which nodes did the quantizer quantize."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.model.contract import Contract
from agent.quantize.errors import BadInput

QDQ_OPS = frozenset({"QuantizeLinear", "DequantizeLinear"})
MAC_OPS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})
Dim = int | str  # a static size, or the name of a symbolic one ("?" when unnamed)


@dataclass(frozen=True)
class ModelFacts:
    """The float model's interface, as the report gives it."""

    input_name: str
    input_shape: tuple[Dim, ...]
    output_name: str
    output_shape: tuple[Dim, ...]
    opset: int


def _dims(value_info: Any) -> tuple[Dim, ...]:
    dims: list[Dim] = []
    for d in value_info.type.tensor_type.shape.dim:
        dims.append(int(d.dim_value) if d.HasField("dim_value") else (d.dim_param or "?"))
    return tuple(dims)


def _show(dims: tuple[Dim, ...]) -> str:
    return "[" + ", ".join(str(d) for d in dims) + "]"


def load_onnx(path: Path) -> Any:
    """The model, checked by onnx; ``BadInput`` when it is not a usable ONNX file."""
    import onnx

    try:
        model = onnx.load(str(path))
        onnx.checker.check_model(model)
    except FileNotFoundError:
        raise BadInput(f"--fp32 {path}: file not found") from None
    except Exception as exc:  # onnx raises DecodeError, ValidationError, ...
        raise BadInput(f"--fp32 {path} is not a valid ONNX model ({type(exc).__name__}: "
                       f"{str(exc).splitlines()[0] if str(exc) else ''})") from None
    return model


def check_against_contract(model: Any, contract: Contract, where: str) -> ModelFacts:
    """The model's input/output names, element type, rank, channels and (where static) grid
    against the contract. Raises ``BadInput`` saying what the model has and what the
    contract says."""
    import onnx

    graph = model.graph
    weights = {t.name for t in graph.initializer}
    inputs = [i for i in graph.input if i.name not in weights]
    outputs = list(graph.output)
    want_in, want_out = contract.input.tensor_name, contract.output.tensor_name
    in_names, out_names = [i.name for i in inputs], [o.name for o in outputs]
    if want_in not in in_names or len(inputs) != 1:
        raise BadInput(f"{where} has input(s) {in_names}; the contract says one input "
                       f"{want_in!r} (input.tensor_name)")
    if want_out not in out_names:
        raise BadInput(f"{where} has output(s) {out_names}; the contract says output "
                       f"{want_out!r} (output.tensor_name)")
    x, y = inputs[0], next(o for o in outputs if o.name == want_out)
    rows, cols = contract.input.shape
    channels = contract.input_channels
    expect_in: tuple[Dim, ...] = ("N", channels, rows, cols)
    expect_out: tuple[Dim, ...] = ("N", 1, rows, cols)
    for kind, info, expect, note in (
        ("input", x, expect_in, f"channels x (2 * context_slices + 1) = {channels}"),
        ("output", y, expect_out, "the agent stores one output channel on the input grid"),
    ):
        elem = info.type.tensor_type.elem_type
        if elem != onnx.TensorProto.FLOAT:
            raise BadInput(f"{where} {kind} {info.name!r} is "
                           f"{onnx.TensorProto.DataType.Name(elem).lower()}; the agent feeds "
                           "and reads float32")
        dims = _dims(info)
        mismatch = len(dims) != 4 or any(isinstance(d, int) and isinstance(e, int) and d != e
                                         for d, e in zip(dims, expect, strict=True))
        if len(dims) == 4 and isinstance(dims[0], int) and dims[0] != 1:
            mismatch = True  # the agent runs one item at a time
        if mismatch:
            raise BadInput(f"{where} {kind} {info.name!r} is {_show(dims)}; the contract says "
                           f"{_show(expect)} ({note}; N = batch)")
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    return ModelFacts(x.name, _dims(x), y.name, _dims(y), int(opset))


def count_gmac(model: Any, contract: Contract) -> float | None:
    """Multiply-accumulates of Conv/ConvTranspose/Gemm/MatMul for one item, in 1e9, from
    ONNX shape inference with the input fixed to [1, C, H, W]. None when a shape involved
    cannot be inferred."""
    import onnx

    fixed = onnx.ModelProto()
    fixed.CopyFrom(model)
    for inp in fixed.graph.input:
        if inp.name == contract.input.tensor_name:
            shape = (1, contract.input_channels, *contract.input.shape)
            for dim, size in zip(inp.type.tensor_type.shape.dim, shape, strict=True):
                dim.Clear()
                dim.dim_value = size
    try:
        inferred = onnx.shape_inference.infer_shapes(fixed, strict_mode=False)
    except Exception:
        return None
    shapes: dict[str, tuple[Dim, ...]] = {}
    for info in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]:
        shapes[info.name] = _dims(info)
    for t in inferred.graph.initializer:
        shapes[t.name] = tuple(int(d) for d in t.dims)

    def static(name: str) -> tuple[int, ...] | None:
        dims = shapes.get(name)
        if dims is None or not all(isinstance(d, int) for d in dims):
            return None
        return tuple(int(d) for d in dims)

    macs = 0
    for node in inferred.graph.node:
        if node.op_type not in MAC_OPS:
            continue
        a, b, out = static(node.input[0]), static(node.input[1]), static(node.output[0])
        if a is None or b is None or out is None:
            return None
        if node.op_type == "Conv":
            macs += math.prod(out) * math.prod(b[1:])
        elif node.op_type == "ConvTranspose":
            macs += math.prod(a) * math.prod(b[1:])
        elif node.op_type == "Gemm":
            trans_a = any(at.name == "transA" and at.i for at in node.attribute)
            macs += math.prod(out) * (a[0] if trans_a else a[-1])
        else:  # MatMul
            macs += math.prod(out) * a[-1]
    return macs / 1e9


def quantized_nodes(qdq_model_path: Path) -> list[tuple[str, str]]:
    """(name, op type) of every node of a QDQ model that reads a DequantizeLinear output:
    the nodes the quantizer quantized, in graph order."""
    import onnx

    graph = onnx.load(str(qdq_model_path)).graph
    dq_outputs = {o for n in graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    return [(n.name, n.op_type) for n in graph.node
            if n.op_type not in QDQ_OPS and n.name and any(i in dq_outputs for i in n.input)]
