"""Exact rewrites of a float ONNX graph before int8 quantization, so that onnxruntime's int8
graph moves no data through its slow generic kernels. Used by ``qdq`` (``iomt-agent model
quantize``) and by the reference models' recipe (``models/recipes/quantize.py``).

onnxruntime runs the int8 convolutions (QLinearConv) in NHWC and wraps every op that has no
NHWC int8 kernel in Transposes. On the AVX2 kernels (2 threads, the shipped models) three
data movements around the convs then cost more than they should:

- a nearest x2 ``Resize`` runs NHWC uint8 through the generic per-element loop, on one
  thread: the full model's last one took about 0.96 ms, its four 1.8 ms (of 15.6 ms);
- the space-to-depth stem (Reshape, a 6-D Transpose, Reshape) and the depth-to-space head
  each add a Transpose to NHWC or back, and the head's ``DepthToSpace`` and ``Relu`` run
  in float after the last DequantizeLinear.

Each rewrite spells the op in NHWC between an explicit Transpose to NHWC and one back to
NCHW. onnxruntime's layout pass puts its own Transposes next to those, the pairs cancel,
and what is left is cheap uint8 data movement:

- ``Resize`` (nearest, x2 in H and W) becomes Reshape [N, H, 1, W, 1, C], ``Expand`` to
  [N, H, 2, W, 2, C] and Reshape [N, 2H, 2W, C]: each pixel's C bytes copied four times;
- the stem's Transpose becomes one straight to NHWC, [N, H/s, W/s, C, s, s];
- ``DepthToSpace`` (CRD) + ``Relu`` become ``Relu`` on the head conv's output (which the
  quantizer folds into the conv: its output is then quantized on [0, max]) and a Transpose
  from NHWC, [N, H/s, W/s, C, s, s] -> [N, C, H/s, s, W/s, s].

With one image channel (C = 1) the stem's and the head's Transposes are spelt in 4-D, rows
of the image as the first axis, so that only one axis moves ([N H/s, s, W/s, s] <-> [N H/s,
W/s, s, s]): in lite 1.2's int8 graph onnxruntime's generic N-D Transpose took 0.16-0.21 ms
for either 6-D one on a 256 x 256 slice, its single-axis path 0.02-0.03 ms (profiler, 2
threads, AVX2 kernels).

Data movement commutes with ReLU and the rest is pure indexing, so the rewritten graph
computes the same function to the bit (``check_same``). Only the int8 file is built from
it: the fp32 file stays as exported (the rewrite makes onnxruntime's fp32 graph, which has
its own NCHWc layout, about 8 % slower). A graph with none of the three patterns comes back
unchanged.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper, shape_inference

from agent.quantize.errors import QuantizeError

STEM_PERM = [0, 1, 3, 5, 2, 4]  # PixelUnshuffle: [N, C, H/s, s, W/s, s] -> [N, C, s, s, H/s, W/s]
Node = Any  # onnx.NodeProto (onnx ships no type hints)
Shapes = dict[str, list[int]]


class RewriteChangedOutput(QuantizeError):
    """The rewritten graph's output differs from the original's (a bug here, never the
    model's fault): ``qdq`` then quantizes the original graph, the recipe stops."""


class _Builder:
    """New nodes and shape constants, with names that cannot clash with the graph's."""

    def __init__(self) -> None:
        self.nodes: list[Node] = []
        self.constants: list[Any] = []

    def shape(self, values: list[int]) -> str:
        name = f"nhwc_rewrite/shape_{len(self.constants)}"
        self.constants.append(numpy_helper.from_array(np.array(values, np.int64), name))
        return name

    def add(self, op: str, inputs: list[str], output: str, name: str, **attrs: Any) -> str:
        self.nodes.append(helper.make_node(op, inputs, [output], name=name, **attrs))
        return output


def _shapes(model: Any) -> Shapes:
    graph = shape_inference.infer_shapes(model).graph
    return {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim]
            for v in (*graph.value_info, *graph.input, *graph.output)}


def _is_nearest_x2(node: Node, shape: Shapes) -> bool:
    if node.op_type != "Resize":
        return False
    mode = next((helper.get_attribute_value(a) for a in node.attribute if a.name == "mode"),
                b"nearest")
    src, dst = shape.get(node.input[0], []), shape.get(node.output[0], [])
    return (mode == b"nearest" and len(src) == 4 and len(dst) == 4 and src[1] == dst[1]
            and dst[2] == 2 * src[2] and dst[3] == 2 * src[3])


def _resize(b: _Builder, node: Node, shape: Shapes) -> None:
    _, c, h, w = shape[node.input[0]]
    p = f"nhwc_rewrite/{node.name}"
    x = b.add("Transpose", [node.input[0]], p + "/nhwc", p + "/to_nhwc", perm=[0, 2, 3, 1])
    x = b.add("Reshape", [x, b.shape([-1, h, 1, w, 1, c])], p + "/split", p + "/split")
    x = b.add("Expand", [x, b.shape([1, h, 2, w, 2, c])], p + "/expand", p + "/expand")
    x = b.add("Reshape", [x, b.shape([-1, 2 * h, 2 * w, c])], p + "/merge", p + "/merge")
    b.add("Transpose", [x], node.output[0], p + "/to_nchw", perm=[0, 3, 1, 2])


def _stem(b: _Builder, transpose: Node, reshape: Node, shape: Shapes) -> None:
    _, c, h, s, w, _ = shape[transpose.input[0]]
    p = "nhwc_rewrite/stem"
    x = transpose.input[0]
    if c == 1:  # [N * H/s, s, W/s, s] -> [N * H/s, W/s, s, s]: one axis moves
        x = b.add("Reshape", [x, b.shape([-1, s, w, s])], p + "/rows", p + "/rows")
        x = b.add("Transpose", [x], p + "/nhwc", p + "/to_nhwc", perm=[0, 2, 1, 3])
    else:
        x = b.add("Transpose", [x], p + "/nhwc", p + "/to_nhwc", perm=[0, 2, 4, 1, 3, 5])
    x = b.add("Reshape", [x, b.shape([-1, h, w, c * s * s])], p + "/merge", p + "/merge")
    b.add("Transpose", [x], reshape.output[0], p + "/to_nchw", perm=[0, 3, 1, 2])


def _head(b: _Builder, d2s: Node, relu: Node, shape: Shapes) -> None:
    _, cs2, h, w = shape[d2s.input[0]]
    s = next(helper.get_attribute_value(a) for a in d2s.attribute if a.name == "blocksize")
    c = cs2 // (s * s)
    p = "nhwc_rewrite/head"
    x = b.add("Relu", [d2s.input[0]], p + "/relu", p + "/relu")
    x = b.add("Transpose", [x], p + "/nhwc", p + "/to_nhwc", perm=[0, 2, 3, 1])
    if c == 1:  # [N * H/s, W/s, s, s] -> [N * H/s, s, W/s, s]: one axis moves
        x = b.add("Reshape", [x, b.shape([-1, w, s, s])], p + "/split", p + "/split")
        x = b.add("Transpose", [x], p + "/shuffled", p + "/shuffle", perm=[0, 2, 1, 3])
    else:
        x = b.add("Reshape", [x, b.shape([-1, h, w, c, s, s])], p + "/split", p + "/split")
        x = b.add("Transpose", [x], p + "/shuffled", p + "/shuffle", perm=[0, 3, 1, 4, 2, 5])
    b.add("Reshape", [x, b.shape([-1, c, h * s, w * s])], relu.output[0], p + "/merge")


def rewrite(model: Any, float_outer: bool = False) -> tuple[Any, dict[str, int]]:
    """The model with every rewrite that applies, and how many of each were made.
    ``float_outer``: leave a Resize to the input's height and width as it is (the int8
    variant that keeps the outer level in float runs it in fp32's NCHWc kernel)."""
    shape = _shapes(model)
    graph = model.graph
    size = shape[graph.input[0].name][-2:]
    consumers: dict[str, list[Node]] = {}
    for n in graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)

    def only_consumer(node: Node, op: str) -> Node | None:
        after = consumers.get(node.output[0], [])
        return after[0] if len(after) == 1 and after[0].op_type == op else None

    b, done = _Builder(), set()
    counts = {"resize": 0, "stem": 0, "head": 0}
    for n in graph.node:
        if n.name in done:
            continue
        perm = next((list(a.ints) for a in n.attribute if a.name == "perm"), None)
        mode = next((helper.get_attribute_value(a) for a in n.attribute if a.name == "mode"),
                    b"DCR")
        if _is_nearest_x2(n, shape) and not (float_outer and shape[n.output[0]][-2:] == size):
            _resize(b, n, shape)
            counts["resize"] += 1
        elif (n.op_type == "Transpose" and perm == STEM_PERM
              and (merge := only_consumer(n, "Reshape")) is not None):
            _stem(b, n, merge, shape)
            done.add(merge.name)
            counts["stem"] += 1
        elif (n.op_type == "DepthToSpace" and mode == b"CRD"
              and (relu := only_consumer(n, "Relu")) is not None):
            _head(b, n, relu, shape)
            done.add(relu.name)
            counts["head"] += 1
        else:
            b.nodes.append(n)
    out = onnx.ModelProto()
    out.CopyFrom(model)
    used = {i for node in b.nodes for i in node.input} | {o.name for o in out.graph.output}
    nodes = [node for node in b.nodes if node.op_type != "Constant" or node.output[0] in used]
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    kept = [t for t in out.graph.initializer if t.name in used]
    del out.graph.initializer[:]
    out.graph.initializer.extend([*kept, *b.constants])
    onnx.checker.check_model(out)
    return out, counts


def check_same(original: Path, rewritten: Path, sample: npt.NDArray[np.float32]) -> float:
    """Largest absolute difference of the two files' float outputs on ``sample`` (a batch;
    onnxruntime, all optimisations); RewriteChangedOutput unless they agree to float
    rounding."""
    outs = []
    for path in (original, rewritten):
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        feed = {session.get_inputs()[0].name: np.ascontiguousarray(sample, dtype=np.float32)}
        outs.append(np.asarray(session.run(None, feed)[0], dtype=np.float64))
    diff = float(np.max(np.abs(outs[0] - outs[1])))
    if diff > 1e-6 * max(float(np.max(np.abs(outs[0]))), 1.0):
        raise RewriteChangedOutput(
            f"NHWC rewrite changed the model's output: max abs diff {diff:.3e}")
    return diff


def rewrite_file(src: Path, dst: Path, sample: npt.NDArray[np.float32],
                 float_outer: bool = False) -> dict[str, int]:
    """Rewrite ``src`` into ``dst``, checked on ``sample``; how many rewrites of each kind
    (all 0: ``dst`` is a copy of ``src``'s graph)."""
    model, counts = rewrite(onnx.load(str(src)), float_outer)
    onnx.save(model, str(dst))
    check_same(src, dst, sample)
    return counts
