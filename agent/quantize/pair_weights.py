"""8-bit conv weights that cannot saturate x86's u8 x s8 kernels: limited pair sums.

On x86 without VNNI (AVX2, AVX-512F), onnxruntime's u8s8 kernels multiply with
``vpmaddubsw``: it adds two neighbouring u8 x s8 products into a signed 16-bit lane and
saturates there. The neighbours are consecutive along the GEMM's K axis, which for a
conv is (kernel row, kernel column, input channel), and input-channel pairs inside one
kernel position for the direct (symmetric) conv kernels; the two orders differ only where
the input channel count is odd. With activation codes of up to 255, a pair cannot
saturate when ``|w_a| + |w_b| <= 128``: 255 x 128 = 32640 <= 32767.

``reduce_range`` reaches that bound by giving every weight 7 bits (``|w| <= 64``).
``limit_pairs`` instead bounds each pair's sum and keeps 8-bit codes. Per output channel it
tries scales between ``max|w| / 127`` and ``max pair / 128``; at each, every offending pair
is brought back onto the bound (the code that rounding pushed outwards most loses a step,
until none offends), the scale is refitted to those codes by least squares, and the
scale with the least squared weight error wins. The scales come out at 0.54-0.86 of
``reduce_range``'s (1.2-1.8x finer) on the reference models. Since the limits shrink
codes, each bias can absorb the mean shift they cause, from the mean of each input channel
over calibration inputs (``conv_input_means``). On every CPU the integer kernels then
give the same output as exact (VNNI) kernels: the same to the bit on the reference full
model, where plain 8-bit codes saturate.

It rewrites a QDQ file from ``quantize_static`` with symmetric int8 weights per output
channel: the weight codes and scales of every Conv, and its int32 bias, requantized on
the new scales from the float model the file was quantized from.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

PAIR_LIMIT = 128  # 255 x 128 = 32640, under the int16 maximum 32767
CODE_LIMIT = 127
SCALE_STEPS = 24


@dataclass(frozen=True)
class LimitedConv:
    """What ``limit_pairs`` did to one Conv."""

    node: str
    scale_vs_reduce_range: float  # median over output channels; < 1 is finer
    max_pair_sum: int


def neighbour_pairs(kh: int, kw: int, ic: int) -> np.ndarray:
    """Index pairs [P, 2] into a filter flattened as (kh, kw, ic) that a kernel may add in
    one 16-bit lane: consecutive along K, and input-channel pairs per kernel position."""
    k = kh * kw * ic
    along_k = np.arange(k - k % 2).reshape(-1, 2)
    per_position = np.arange(k).reshape(kh * kw, ic)[:, : ic - ic % 2].reshape(-1, 2)
    pairs: np.ndarray = np.unique(np.concatenate([along_k, per_position]), axis=0)
    return pairs


def max_pair_sum(codes: np.ndarray, pairs: np.ndarray) -> int:
    """The largest ``|w_a| + |w_b|`` over ``pairs`` of int codes [OC, K]."""
    a = np.abs(codes.astype(np.int32))
    return int((a[:, pairs[:, 0]] + a[:, pairs[:, 1]]).max(initial=0))


def filter_max_pair_sum(codes: np.ndarray) -> int:
    """``max_pair_sum`` of a conv's codes as stored, [OC, IC, KH, KW]."""
    oc, ic, kh, kw = codes.shape
    return max_pair_sum(codes.transpose(0, 2, 3, 1).reshape(oc, -1), neighbour_pairs(kh, kw, ic))


def project(target: np.ndarray, pairs: np.ndarray) -> np.ndarray:
    """Integer codes [OC, K] near ``target`` (real, in code units) with every code within
    ``CODE_LIMIT`` and every pair sum within ``PAIR_LIMIT``: of two codes over the limit,
    the one that rounding pushed outwards most loses a step, until none is over."""
    q = np.clip(np.round(target), -CODE_LIMIT, CODE_LIMIT)
    while True:
        a = np.abs(q)
        bad = a[:, pairs[:, 0]] + a[:, pairs[:, 1]] > PAIR_LIMIT
        if not bad.any():
            return q
        over = a - np.abs(target)
        first = over[:, pairs[:, 0]] >= over[:, pairs[:, 1]]
        pick = np.where(first, pairs[None, :, 0], pairs[None, :, 1])
        row, col = np.nonzero(bad)
        step = np.zeros(q.shape, dtype=bool)
        step[row, pick[row, col]] = True
        q -= np.sign(q) * step


def limited_codes(weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Codes [OC, IC, KH, KW] (int8) and scales [OC] (float32) for a float conv weight."""
    oc, ic, kh, kw = weight.shape
    v = weight.astype(np.float64).transpose(0, 2, 3, 1).reshape(oc, -1)
    pairs = neighbour_pairs(kh, kw, ic)
    a = np.abs(v)
    low = np.maximum(a.max(axis=1), 1e-30) / CODE_LIMIT
    high = np.maximum((a[:, pairs[:, 0]] + a[:, pairs[:, 1]]).max(axis=1, initial=0)
                      / PAIR_LIMIT, low)
    best_err = np.full(oc, np.inf)
    best_scale = low.copy()
    best_q = np.zeros_like(v)
    for f in np.linspace(0.0, 1.0, SCALE_STEPS):
        scale = low + f * (high - low)
        q = project(v / scale[:, None], pairs)
        # The codes fixed, the least-squares scale: the projection only ever shrinks codes,
        # and a scale left at the grid point would carry that shrinkage into the output.
        qq, qv = (q * q).sum(axis=1), (q * v).sum(axis=1)
        scale = np.where(qq > 0, qv / np.maximum(qq, 1e-30), scale)
        err = ((q * scale[:, None] - v) ** 2).sum(axis=1)
        better = err < best_err
        best_err[better], best_scale[better], best_q[better] = err[better], scale[better], q[better]
    best_scale[a.max(axis=1) == 0] = 1.0  # an all-zero channel: codes 0, any scale
    codes = best_q.reshape(oc, kh, kw, ic).transpose(0, 3, 1, 2).astype(np.int8)
    return codes, best_scale.astype(np.float32)


def conv_input_means(float_model: onnx.ModelProto,
                     inputs: np.ndarray) -> dict[str, np.ndarray]:
    """Per Conv (by ``conv_key``): the mean of each of its input channels
    over ``inputs`` [N, C, H, W], run one at a time through ``float_model`` on onnxruntime."""
    import onnxruntime as ort

    convs = [n for n in float_model.graph.node if n.op_type == "Conv"]
    probe = onnx.ModelProto()
    probe.CopyFrom(float_model)
    known = {o.name for o in probe.graph.output}
    wanted = sorted({n.input[0] for n in convs} - known)
    probe.graph.output.extend(onnx.ValueInfoProto(name=t) for t in wanted)
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(probe.SerializeToString(), sess_options=opts,
                                   providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    feed = session.get_inputs()[0].name
    sums: dict[str, np.ndarray] = {}
    for x in inputs:
        values = session.run(None, {feed: x[None].astype(np.float32)})
        for name, value in zip(names, values, strict=True):
            sums[name] = sums.get(name, 0) + np.asarray(value, np.float64).mean(axis=(0, 2, 3))
    return {conv_key(c): sums[c.input[0]] / len(inputs) for c in convs}


def conv_key(conv: onnx.NodeProto) -> str:
    """How a float Conv is matched to its quantized self: its name (``quantize_static``
    keeps names), else its weight's."""
    return conv.name or conv.input[1]


def symmetric(dequantize: onnx.NodeProto, inits: dict[str, onnx.TensorProto]) -> bool:
    """True when a DequantizeLinear's zero point is absent or all zero."""
    if len(dequantize.input) < 3 or not dequantize.input[2]:
        return True
    return not numpy_helper.to_array(inits[dequantize.input[2]]).any()


def limit_pairs(model: onnx.ModelProto, float_model: onnx.ModelProto,
                input_means: dict[str, np.ndarray] | None = None) -> list[LimitedConv]:
    """Rewrite, in place, every Conv's weights and bias in a QDQ ``model`` quantized from
    ``float_model`` (its initializers hold the float weights under the same names).

    With ``input_means`` (``conv_input_means`` over the calibration inputs), each bias
    absorbs the mean shift its weights' rounding and pair limits cause (bias correction):
    ``sum((w - w_q) * mean(input channel))``, the border's zero padding aside; grouped convs
    are left uncorrected. Raises ``ValueError`` for a graph it does not cover (a conv that is
    not 2-D, weights not per channel or not symmetric, a bias that is not a quantized
    initializer or does not fit int32); a Conv may then be half rewritten, so the caller
    drops the model."""
    floats = {t.name: t for t in float_model.graph.initializer}
    float_convs = [n for n in float_model.graph.node if n.op_type == "Conv"]
    by_name = {n.name: n for n in float_convs if n.name}
    by_weight = {n.input[1]: n for n in float_convs}
    inits = {t.name: t for t in model.graph.initializer}
    producer = {out: n for n in model.graph.node for out in n.output}
    done: list[LimitedConv] = []
    for node in (n for n in model.graph.node if n.op_type == "Conv"):
        w_dq = producer.get(node.input[1])
        if w_dq is None or w_dq.op_type != "DequantizeLinear":
            continue  # left in float
        where = node.name or node.input[1]
        source = by_name.get(node.name) or by_weight.get(w_dq.input[0].removesuffix("_quantized"))
        if source is None or source.input[1] not in floats:
            raise ValueError(f"{where}: no Conv of the float model with an initializer weight "
                             "matches it")
        weight = numpy_helper.to_array(floats[source.input[1]])
        old_codes = inits.get(w_dq.input[0])
        if (weight.ndim != 4 or old_codes is None or old_codes.data_type != onnx.TensorProto.INT8
                or w_dq.input[1] not in inits
                or numpy_helper.to_array(inits[w_dq.input[1]]).shape != (len(weight),)):
            raise ValueError(f"{where}: limit_pairs needs a 2-D conv with int8 weights "
                             "quantized per output channel")
        if not symmetric(w_dq, inits):
            raise ValueError(f"{where}: weights with a zero point other than 0; "
                             "limit_pairs needs symmetric int8 weights")
        rr_scale = np.maximum(np.abs(weight).reshape(len(weight), -1).max(axis=1), 1e-30) / 64
        grouped = any(a.name == "group" and a.i != 1 for a in node.attribute)
        means = None if input_means is None or grouped else input_means.get(conv_key(source))
        codes, scales = limited_codes(weight)
        if len(node.input) > 2 and node.input[2]:
            x_dq, b_dq = producer.get(node.input[0]), producer.get(node.input[2])
            if (x_dq is None or b_dq is None or b_dq.op_type != "DequantizeLinear"
                    or x_dq.input[1] not in inits or b_dq.input[0] not in inits
                    or len(source.input) < 3 or source.input[2] not in floats):
                raise ValueError(f"{where}: its bias is not a quantized initializer")
            x_scale = numpy_helper.to_array(inits[x_dq.input[1]]).astype(np.float64)
            b_scale = (x_scale * scales.astype(np.float64)).astype(np.float32)
            bias = numpy_helper.to_array(floats[source.input[2]]).astype(np.float64)
            if means is not None:
                lost = weight.astype(np.float64) - codes * scales[:, None, None, None]
                bias = bias + (lost.sum(axis=(2, 3)) * means).sum(axis=1)
            b_real = np.round(bias / b_scale)
            if np.abs(b_real).max(initial=0) > np.iinfo(np.int32).max:
                raise ValueError(f"{where}: its bias does not fit int32 codes on the limited "
                                 "weight scales")
            b_codes = b_real.astype(np.int32)
            inits[b_dq.input[0]].CopyFrom(numpy_helper.from_array(b_codes, b_dq.input[0]))
            inits[b_dq.input[1]].CopyFrom(numpy_helper.from_array(b_scale, b_dq.input[1]))
        inits[w_dq.input[0]].CopyFrom(numpy_helper.from_array(codes, w_dq.input[0]))
        inits[w_dq.input[1]].CopyFrom(numpy_helper.from_array(scales, w_dq.input[1]))
        done.append(LimitedConv(node.name, round(float(np.median(scales / rr_scale)), 3),
                                filter_max_pair_sum(codes)))
    return done


def weights_outside_conv(model: onnx.ModelProto) -> list[str]:
    """Nodes other than Conv that read int8 weights (a DequantizeLinear of an initializer):
    ``limit_pairs`` does not rewrite them, so a model with any is not safe through it."""
    int8 = {t.name for t in model.graph.initializer if t.data_type == onnx.TensorProto.INT8}
    weights = {n.output[0] for n in model.graph.node
               if n.op_type == "DequantizeLinear" and n.input[0] in int8}
    return [n.name or n.op_type for n in model.graph.node
            if n.op_type not in ("Conv", "QuantizeLinear", "DequantizeLinear")
            and any(i in weights for i in n.input)]


def pair_sums_within_limit(model: onnx.ModelProto) -> bool:
    """True when every int8 Conv weight in ``model`` keeps its pair sums within the limit
    (the property that makes the file safe on x86 without VNNI)."""
    inits = {t.name: t for t in model.graph.initializer}
    producer = {out: n for n in model.graph.node for out in n.output}
    for node in (n for n in model.graph.node if n.op_type == "Conv"):
        w_dq = producer.get(node.input[1])
        if w_dq is None or w_dq.op_type != "DequantizeLinear":
            continue
        codes = numpy_helper.to_array(inits[w_dq.input[0]])
        if codes.dtype != np.int8 or not symmetric(w_dq, inits):
            return False
        if filter_max_pair_sum(codes) > PAIR_LIMIT:
            return False
    return True
