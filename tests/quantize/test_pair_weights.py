"""agent.quantize.pair_weights: 8-bit conv weights whose neighbour pairs cannot saturate
x86's u8 x s8 kernels. Run on every CPU of ``make test-cpus``: under ``-cpu Haswell`` the
kernel test below runs the saturating AVX2 kernel on a net built to overflow it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402
from onnxruntime.quantization import (  # noqa: E402
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_static,
)

from agent.quantize import pair_weights  # noqa: E402

GRID = 32
CHANNELS = 5


@pytest.mark.parametrize("shape", [(8, 4, 3, 3), (16, 5, 3, 3), (3, 1, 3, 3), (4, 7, 1, 1),
                                   (2, 1, 1, 1)])
def test_codes_stay_within_the_pair_limit(shape: tuple[int, int, int, int]) -> None:
    rng = np.random.default_rng(3)
    weight = rng.standard_t(3, shape)  # heavy tails: some pairs far over any fixed bound
    codes, scales = pair_weights.limited_codes(weight)
    oc, ic, kh, kw = shape
    flat = codes.transpose(0, 2, 3, 1).reshape(oc, -1).astype(np.int32)
    pairs = pair_weights.neighbour_pairs(kh, kw, ic)
    assert codes.dtype == np.int8 and np.abs(flat).max() <= 127
    assert pair_weights.max_pair_sum(flat, pairs) <= pair_weights.PAIR_LIMIT
    # Both orders a kernel may pair in: along K = (kh, kw, ic), and channel pairs per position.
    k = flat.shape[1] - flat.shape[1] % 2
    assert (np.abs(flat[:, 0:k:2]) + np.abs(flat[:, 1:k:2])).max(initial=0) <= 128
    per_position = np.abs(codes.transpose(0, 2, 3, 1).astype(np.int32))[..., : ic - ic % 2]
    assert (per_position[..., 0::2] + per_position[..., 1::2]).max(initial=0) <= 128
    assert scales.shape == (oc,) and (scales > 0).all()


def test_finer_than_reduce_range() -> None:
    """The point of it: for ordinary weights the error is well under 7-bit weights'."""
    weight = np.random.default_rng(5).normal(0, 0.1, (32, 32, 3, 3))
    codes, scales = pair_weights.limited_codes(weight)
    err = ((codes * scales[:, None, None, None] - weight) ** 2).mean()
    rr_scale = np.abs(weight).reshape(32, -1).max(axis=1)[:, None, None, None] / 64
    rr_err = ((np.clip(np.round(weight / rr_scale), -64, 64) * rr_scale - weight) ** 2).mean()
    assert err < 0.6 * rr_err


def adversarial_net(path: Path) -> None:
    """One 3x3 conv, 5 -> 2 channels (odd, as full's first conv), every weight positive:
    near the channel maximum on even input channels, small on odd ones. On an all-ones input
    (activation code 255) neighbouring products overflow the 16-bit lane in plain 8-bit
    codes; the big-small pattern also makes any other pairing order than the one assumed
    (e.g. along kernel positions) pair two big codes, so the kernel test below would see it."""
    rng = np.random.default_rng(11)
    w = rng.uniform(0.0, 0.05, (2, CHANNELS, 3, 3)).astype(np.float32)
    w[:, 0::2] = rng.uniform(0.8, 1.0, (2, (CHANNELS + 1) // 2, 3, 3))
    b = np.array([0.1, -0.1], np.float32)
    graph = helper.make_graph(
        [helper.make_node("Conv", ["input", "w", "b"], ["output"], name="conv", pads=[1] * 4)],
        "adversarial",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT,
                                       ["N", CHANNELS, GRID, GRID])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", 2, GRID, GRID])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))


def inputs() -> np.ndarray:
    rng = np.random.default_rng(13)
    x = rng.uniform(0, 1, (4, CHANNELS, GRID, GRID)).astype(np.float32)
    x[0] = 1.0  # every code 255
    x[1, :, : GRID // 2] = 1.0
    return x


class Reader(CalibrationDataReader):  # type: ignore[misc]
    def __init__(self, x: np.ndarray) -> None:
        self._it = iter(x)

    def get_next(self) -> dict[str, np.ndarray] | None:
        s = next(self._it, None)
        return None if s is None else {"input": s[None]}


def session(path: Path, optimised: bool) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    if not optimised:  # each QDQ group as dequantize -> float conv -> quantize
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


def run(path: Path, x: np.ndarray, optimised: bool = True) -> np.ndarray:
    out: np.ndarray = session(path, optimised).run(None, {"input": x})[0]
    return out


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    root = tmp_path_factory.mktemp("pairs")
    fp32, plain, limited = root / "fp32.onnx", root / "u8s8.onnx", root / "u8s8_pl.onnx"
    adversarial_net(fp32)
    quantize_static(fp32, plain, Reader(inputs()), quant_format=QuantFormat.QDQ,
                    per_channel=True, reduce_range=False, activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax)
    model = onnx.load(str(plain))
    done = pair_weights.limit_pairs(model, onnx.load(str(fp32)))
    assert [c.node for c in done] == ["conv"] and done[0].max_pair_sum <= 128
    onnx.save(model, str(limited))
    return fp32, plain, limited


def weight_codes(path: Path) -> np.ndarray:
    inits = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}
    codes: np.ndarray = inits["w_quantized"]
    return codes


def test_the_net_overflows_plain_8_bit_codes(files: tuple[Path, Path, Path]) -> None:
    """The control: without the rewrite, a kernel pairing products in 16 bits overflows."""
    _, plain, limited = files
    codes = weight_codes(plain).astype(np.int32).transpose(0, 2, 3, 1).reshape(2, -1)
    pairs = pair_weights.neighbour_pairs(3, 3, CHANNELS)
    assert 255 * pair_weights.max_pair_sum(codes, pairs) > 32767
    assert not pair_weights.pair_sums_within_limit(onnx.load(str(plain)))
    assert pair_weights.pair_sums_within_limit(onnx.load(str(limited)))


def test_integer_kernels_compute_the_qdq_graph_on_this_cpu(
        files: tuple[Path, Path, Path]) -> None:
    """On this CPU's int8 kernels (AVX2's saturating pairs included) the rewritten file
    gives what its QDQ graph means, to within the kernels' requantization rounding."""
    _, plain, limited = files
    x = inputs()
    kernels, reference = run(limited, x), run(limited, x, optimised=False)
    step = float(np.abs(reference).max()) / 255
    assert np.abs(kernels - reference).max() <= 1.01 * step
    if saturating_x86_kernels():  # the control: here the plain codes do overflow
        off = np.abs(run(plain, x) - run(plain, x, optimised=False)).max()
        assert off > 10 * step


def saturating_x86_kernels() -> bool:
    """An x86 CPU (or the AVX2 kernels forced) without VNNI, as this process reads it;
    under qemu the host's flags show through, so emulated Haswell is not recognised."""
    import platform

    from agent.quantize.cpu import host_dot_product

    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False
    has_dot, _ = host_dot_product(text, platform.machine())
    return platform.machine().lower() in ("x86_64", "amd64") and has_dot is False


def test_rewritten_file_stays_close_to_float(files: tuple[Path, Path, Path]) -> None:
    """Scales and the int32 bias were requantized consistently: the output tracks fp32."""
    fp32, _, limited = files
    x = inputs()
    want, got = run(fp32, x), run(limited, x, optimised=False)
    rel = np.abs(got - want).max() / np.abs(want).max()
    assert rel < 0.02


def conv_matmul_net(path: Path) -> None:
    """A 3x3 conv, then a MatMul with a weight over the last axis: int8 weights outside Conv,
    which ``limit_pairs`` does not rewrite."""
    rng = np.random.default_rng(17)
    graph = helper.make_graph(
        [helper.make_node("Conv", ["input", "w", "b"], ["c"], name="conv", pads=[1] * 4),
         helper.make_node("MatMul", ["c", "m"], ["output"], name="mix")],
        "conv_matmul",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 1, GRID, GRID])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", 1, GRID, GRID])],
        [numpy_helper.from_array(rng.normal(0, 0.3, (1, 1, 3, 3)).astype(np.float32), "w"),
         numpy_helper.from_array(np.zeros(1, np.float32), "b"),
         numpy_helper.from_array(rng.normal(0, 0.2, (GRID, GRID)).astype(np.float32), "m")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))


def test_operator_quantizer_limits_pairs_or_falls_back_to_reduce_range(tmp_path: Path) -> None:
    """``model quantize`` for a fleet without dot product: pair-limited 8-bit weights where
    every int8 weight is a Conv's, 7-bit weights (reduce_range) where one is not."""
    from agent.quantize.qdq import Quantizer

    calib = list(inputs()[:, :1])
    adversarial = tmp_path / "conv.onnx"
    adversarial_net(adversarial)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    q = Quantizer(adversarial, tmp_path / "a", "input", list(inputs()), saturation_safe=True)
    q.pre_process()
    out = onnx.load(str(q.quantize(tmp_path / "conv.int8.onnx")))
    assert q.pair_limited is True and q.reduce_range is False
    assert pair_weights.pair_sums_within_limit(out) and "pair" in q.weights_note()

    mixed = tmp_path / "mixed.onnx"
    conv_matmul_net(mixed)
    q = Quantizer(mixed, tmp_path / "b", "input", calib, saturation_safe=True)
    q.pre_process()
    out = onnx.load(str(q.quantize(tmp_path / "mixed.int8.onnx")))
    assert q.pair_limited is False and q.reduce_range is True
    assert "reduce_range" in q.weights_note()
    assert pair_weights.weights_outside_conv(out) == ["mix"]
    q = Quantizer(mixed, tmp_path / "b", "input", calib, saturation_safe=False)
    assert q.reduce_range is False and q.weights_note() == "8-bit"


def test_bias_is_requantized_on_the_new_scales(files: tuple[Path, Path, Path]) -> None:
    """Without bias correction the int32 bias dequantizes to the float bias within half a
    step of its new scale (input scale x the limited weight scale)."""
    fp32, _, limited = files
    inits = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(limited)).graph.initializer}
    floats = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(fp32)).graph.initializer}
    codes, scale = inits["b_quantized"], inits["b_quantized_scale"]
    assert codes.dtype == np.int32
    np.testing.assert_allclose(scale, inits["input_scale"] * inits["w_scale"], rtol=1e-6)
    assert (np.abs(codes * scale.astype(np.float64) - floats["b"]) <= scale / 2 + 1e-12).all()


def test_an_all_zero_channel_keeps_a_usable_scale() -> None:
    weight = np.random.default_rng(2).normal(0, 0.3, (3, 4, 3, 3))
    weight[1] = 0.0
    codes, scales = pair_weights.limited_codes(weight)
    assert not codes[1].any() and scales[1] == 1.0  # a bias on it still fits int32 codes
    assert np.isfinite(scales).all() and (scales[[0, 2]] < 1.0).all()


def depthwise_net(path: Path) -> None:
    rng = np.random.default_rng(19)
    graph = helper.make_graph(
        [helper.make_node("Conv", ["input", "w", "b"], ["output"], name="dw", pads=[1] * 4,
                          group=CHANNELS)],
        "depthwise",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT,
                                       ["N", CHANNELS, GRID, GRID])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT,
                                       ["N", CHANNELS, GRID, GRID])],
        [numpy_helper.from_array(rng.uniform(0.5, 1.0, (CHANNELS, 1, 3, 3)).astype(np.float32),
                                 "w"),
         numpy_helper.from_array(np.full(CHANNELS, 0.2, np.float32), "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))


def test_grouped_convs_are_limited_and_left_uncorrected(tmp_path: Path) -> None:
    fp32, q8 = tmp_path / "dw.onnx", tmp_path / "dw.int8.onnx"
    depthwise_net(fp32)
    quantize_static(fp32, q8, Reader(inputs()), quant_format=QuantFormat.QDQ,
                    per_channel=True, reduce_range=False, activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax)
    model, source = onnx.load(str(q8)), onnx.load(str(fp32))
    pair_weights.limit_pairs(model, source, pair_weights.conv_input_means(source, inputs()))
    assert pair_weights.pair_sums_within_limit(model)
    onnx.save(model, str(q8))
    x = inputs()
    want, got = run(fp32, x), run(q8, x, optimised=False)
    assert np.abs(got - want).max() / np.abs(want).max() < 0.02
