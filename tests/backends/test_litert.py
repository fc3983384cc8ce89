"""The LiteRT runtime on real TFLite flatbuffers: a small conv net written here with LiteRT's
own schema (fp32, and full-integer int8 with int8 input/output tensors), its ONNX twin
from the same weights, and the shipped bundle's model.int8.tflite when it is built.

Checked: LiteRT and onnxruntime give matching outputs on the golden set; int8 I/O is
quantized/dequantized inside the runner; channels-last and channels-first files; batch
sizes other than the file's (resized, or item by item when the graph has fixed reshapes);
the guard passes the int8 file and refuses it with a weight scale corrupted; without
LiteRT the error names the packages to install."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent.backends import BackendError, RunnerOptions, open_runner, runtime_installed
from agent.model.bundle import load_bundle
from agent.model.guard import run_guard
from tests.bundles import SHIPPED_BUNDLES, quantize_qdq, smooth_inputs

GRID = 32
WIDTH = 4  # channels of the hidden layer
FILE_NAMES = {"onnxruntime": "model.int8.onnx", "litert": "model.int8.tflite"}
FLOOR_DB = 30.0

HAVE_LITERT = runtime_installed("litert")
# Writing .tflite files needs the schema that the ai-edge-litert wheel ships.
HAVE_SCHEMA = importlib.util.find_spec("ai_edge_litert") is not None
needs_litert = pytest.mark.skipif(
    not (HAVE_LITERT and HAVE_SCHEMA),
    reason="LiteRT is not installed (pip install ai-edge-litert)",
)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --- the test network: conv 3x3 (1 -> 4) + ReLU, conv 3x3 (4 -> 1) ---------------------


def weights() -> list[tuple[np.ndarray, np.ndarray]]:
    """[(w [O, I, 3, 3], b [O])] of the two convs (ONNX layout)."""
    rng = np.random.default_rng(0)
    out = []
    for cout, cin in ((WIDTH, 1), (1, WIDTH)):
        w = rng.normal(0, 1.0 / math.sqrt(9 * cin), (cout, cin, 3, 3)).astype(np.float32)
        out.append((w, rng.normal(0, 0.05, cout).astype(np.float32)))
    return out


def conv_nhwc(x: np.ndarray, w: np.ndarray, b: np.ndarray) -> np.ndarray:
    """3x3 SAME conv in numpy: x [N, H, W, I], w [O, I, 3, 3] -> [N, H, W, O]."""
    xp = np.pad(x.astype(np.float64), ((0, 0), (1, 1), (1, 1), (0, 0)))
    h, wd = x.shape[1:3]
    out = np.zeros((*x.shape[:3], w.shape[0]))
    for dy in range(3):
        for dx in range(3):
            out += np.einsum("nhwi,oi->nhwo", xp[:, dy : dy + h, dx : dx + wd], w[:, :, dy, dx])
    return out + b


def forward_nhwc(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(hidden activation, output) of the float net, NHWC."""
    (w1, b1), (w2, b2) = weights()
    hidden = np.maximum(conv_nhwc(x, w1, b1), 0)
    return hidden, conv_nhwc(hidden, w2, b2)


def onnx_net(path: Path, w2_factor: float = 1.0) -> None:
    """The test net as ONNX; ``w2_factor`` != 1 breaks it (for guard failures)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    (w1, b1), (w2, b2) = weights()
    w2 = w2 * np.float32(w2_factor)
    inits = [numpy_helper.from_array(a, n) for a, n in ((w1, "w1"), (b1, "b1"), (w2, "w2"),
                                                        (b2, "b2"))]
    nodes = [
        helper.make_node("Conv", ["input", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["output"], pads=[1, 1, 1, 1]),
    ]
    graph = helper.make_graph(
        nodes, "litert-test",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 1, GRID, GRID])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", 1, GRID, GRID])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))


class _Builder:
    """A TFLite flatbuffer through LiteRT's generated schema (object API)."""

    def __init__(self) -> None:
        from ai_edge_litert import schema_py_generated as fb

        self.fb = fb
        self.buffers: list[Any] = [fb.BufferT()]  # buffer 0: the empty sentinel
        self.tensors: list[Any] = []
        self.ops: list[Any] = []
        self.opcodes: dict[int, int] = {}

    def tensor(self, name: str, shape: list[int], ttype: int, data: np.ndarray | None = None,
               scale: list[float] | None = None, zero: list[int] | None = None) -> int:
        fb = self.fb
        t = fb.TensorT()
        t.name, t.shape, t.type = name, shape, ttype
        t.buffer = 0
        if data is not None:
            buf = fb.BufferT()
            buf.data = np.frombuffer(np.ascontiguousarray(data).tobytes(), dtype=np.uint8)
            self.buffers.append(buf)
            t.buffer = len(self.buffers) - 1
        if scale is not None:
            q = fb.QuantizationParametersT()
            q.scale, q.zeroPoint, q.quantizedDimension = scale, zero or [0] * len(scale), 0
            t.quantization = q
        self.tensors.append(t)
        return len(self.tensors) - 1

    def op(self, code: int, inputs: list[int], outputs: list[int], options_type: int,
           options: Any) -> None:
        fb = self.fb
        self.opcodes.setdefault(code, len(self.opcodes))
        o = fb.OperatorT()
        o.opcodeIndex, o.inputs, o.outputs = self.opcodes[code], inputs, outputs
        o.builtinOptionsType, o.builtinOptions = options_type, options
        self.ops.append(o)

    def conv(self, x: int, w: int, b: int, y: int, relu: bool) -> None:
        fb = self.fb
        opts = fb.Conv2DOptionsT()
        opts.padding, opts.strideW, opts.strideH = fb.Padding.SAME, 1, 1
        opts.dilationWFactor = opts.dilationHFactor = 1
        opts.fusedActivationFunction = (fb.ActivationFunctionType.RELU if relu
                                        else fb.ActivationFunctionType.NONE)
        self.op(fb.BuiltinOperator.CONV_2D, [x, w, b], [y], fb.BuiltinOptions.Conv2DOptions,
                opts)

    def reshape(self, x: int, y: int, shape: list[int]) -> None:
        fb = self.fb
        s = self.tensor(f"shape{len(self.tensors)}", [len(shape)], fb.TensorType.INT32,
                        np.array(shape, dtype=np.int32))
        opts = fb.ReshapeOptionsT()
        opts.newShape = shape
        self.op(fb.BuiltinOperator.RESHAPE, [x, s], [y], fb.BuiltinOptions.ReshapeOptions,
                opts)

    def save(self, path: Path, inp: int, out: int) -> None:
        from ai_edge_litert.tools import flatbuffer_utils

        fb = self.fb
        sg = fb.SubGraphT()
        sg.tensors, sg.inputs, sg.outputs, sg.operators = self.tensors, [inp], [out], self.ops
        sg.name = "main"
        sig = fb.SignatureDefT()
        sig.signatureKey, sig.subgraphIndex = "serving_default", 0
        sig.inputs = [fb.TensorMapT(name="input", tensorIndex=inp)]
        sig.outputs = [fb.TensorMapT(name="output", tensorIndex=out)]
        model = fb.ModelT()
        model.version, model.description = 3, "iomt-edge-agent test net"
        model.subgraphs, model.buffers, model.signatureDefs = [sg], self.buffers, [sig]
        codes = sorted(self.opcodes.items(), key=lambda kv: kv[1])
        model.operatorCodes = []
        for code, _ in codes:
            oc = fb.OperatorCodeT()
            oc.builtinCode, oc.deprecatedBuiltinCode, oc.version = code, min(code, 127), 1
            model.operatorCodes.append(oc)
        flatbuffer_utils.write_model(model, str(path))


def tflite_net(path: Path, *, int8: bool = False, layout: str = "NHWC",
               corrupt_weight_scale: float = 1.0) -> None:
    """The test net as TFLite: float32, or int8 throughout (int8 I/O) with ranges from
    ``smooth_inputs``. ``layout="NCHW"``: [1, 1, 32, 32] I/O around fixed reshapes, like
    a converter's channels-first export (its batch cannot be resized)."""
    b = _Builder()
    fb = b.fb
    (w1, b1), (w2, b2) = weights()
    io_shape = [1, GRID, GRID, 1] if layout == "NHWC" else [1, 1, GRID, GRID]
    if not int8:
        f32 = fb.TensorType.FLOAT32
        x = b.tensor("input", io_shape, f32)
        x_in = x
        if layout == "NCHW":
            x_in = b.tensor("input_nhwc", [1, GRID, GRID, 1], f32)
            b.reshape(x, x_in, [1, GRID, GRID, 1])
        k1 = b.tensor("w1", [WIDTH, 3, 3, 1], f32, w1.transpose(0, 2, 3, 1))
        c1 = b.tensor("b1", [WIDTH], f32, b1)
        h = b.tensor("hidden", [1, GRID, GRID, WIDTH], f32)
        b.conv(x_in, k1, c1, h, relu=True)
        k2 = b.tensor("w2", [1, 3, 3, WIDTH], f32, w2.transpose(0, 2, 3, 1))
        c2 = b.tensor("b2", [1], f32, b2)
        y = b.tensor("output" if layout == "NHWC" else "output_nhwc", [1, GRID, GRID, 1], f32)
        b.conv(h, k2, c2, y, relu=False)
        out = y
        if layout == "NCHW":
            out = b.tensor("output", io_shape, f32)
            b.reshape(y, out, io_shape)
        b.save(path, x, out)
        return
    i8, i32 = fb.TensorType.INT8, fb.TensorType.INT32
    calib = smooth_inputs(16, seed=1).transpose(0, 2, 3, 1)
    hidden, output = forward_nhwc(calib)
    s_in, z_in = 1.0 / 255, -128  # inputs in [0, 1]
    s_h, z_h = float(hidden.max()) / 255, -128
    lo, hi = min(0.0, float(output.min())), max(0.0, float(output.max()))
    s_out = (hi - lo) / 255
    z_out = round(-128 - lo / s_out)

    def weight(w: np.ndarray, s_x: float) -> tuple[np.ndarray, list[float], np.ndarray,
                                                  list[float]]:
        scales = np.abs(w).reshape(len(w), -1).max(axis=1) / 127
        q = np.clip(np.round(w / scales[:, None, None, None]), -127, 127).astype(np.int8)
        return q, [float(s) for s in scales], scales * s_x, [float(s) for s in scales * s_x]

    x = b.tensor("input", io_shape, i8, scale=[s_in], zero=[z_in])
    x_in = x
    if layout == "NCHW":
        x_in = b.tensor("input_nhwc", [1, GRID, GRID, 1], i8, scale=[s_in], zero=[z_in])
        b.reshape(x, x_in, [1, GRID, GRID, 1])
    q1, sw1, sb1, sb1l = weight(w1, s_in)
    k1 = b.tensor("w1", [WIDTH, 3, 3, 1], i8, q1.transpose(0, 2, 3, 1), sw1)
    c1 = b.tensor("b1", [WIDTH], i32, np.round(b1 / sb1).astype(np.int32), sb1l)
    h = b.tensor("hidden", [1, GRID, GRID, WIDTH], i8, scale=[s_h], zero=[z_h])
    b.conv(x_in, k1, c1, h, relu=True)
    q2, sw2, sb2, sb2l = weight(w2, s_h)
    sw2 = [s * corrupt_weight_scale for s in sw2]
    k2 = b.tensor("w2", [1, 3, 3, WIDTH], i8, q2.transpose(0, 2, 3, 1), sw2)
    c2 = b.tensor("b2", [1], i32, np.round(b2 / sb2).astype(np.int32),
                  [s * corrupt_weight_scale for s in sb2l])
    y = b.tensor("output" if layout == "NHWC" else "output_nhwc", [1, GRID, GRID, 1], i8,
                 scale=[s_out], zero=[z_out])
    b.conv(h, k2, c2, y, relu=False)
    out = y
    if layout == "NCHW":
        out = b.tensor("output", io_shape, i8, scale=[s_out], zero=[z_out])
        b.reshape(y, out, io_shape)
    b.save(path, x, out)


def write_bundle(root: Path, files: dict[str, Path], golden: tuple[np.ndarray, np.ndarray],
                 *, floor: float = FLOOR_DB, precision: str = "int8",
                 name: str = "litert-test") -> Path:
    """A bundle serving ``files`` ({runtime: model file}) with the golden set."""
    root.mkdir(parents=True, exist_ok=True)
    backends = {}
    for runtime, src in files.items():
        dst = root / FILE_NAMES[runtime]
        shutil.copy(src, dst)
        backends[runtime] = {"path": dst.name, "sha256": _sha(dst)}
    np.savez_compressed(root / "golden.npz", input=golden[0], reference_output=golden[1])
    meta = {
        "format": 1, "name": name, "version": "0.0.1", "task": "test", "precision": precision,
        "input": {"modality": "MR", "shape": [GRID, GRID], "pixel_spacing_mm": [1.0, 1.0]},
        "output": {"modality": "MR", "scale": 1000.0},
        "backends": backends,
        "golden": {"path": "golden.npz", "sha256": _sha(root / "golden.npz"),
                   "min_psnr_db": floor},
    }
    (root / "bundle.json").write_text(json.dumps(meta))
    return root


def run_file(runtime: str, path: Path, x: np.ndarray, threads: int = 1) -> np.ndarray:
    runner = open_runner(runtime, str(path), RunnerOptions(intra_op_threads=threads))
    try:
        return runner.run(x)
    finally:
        runner.close()


def psnr(got: np.ndarray, ref: np.ndarray) -> float:
    mse = float(np.mean((got.astype(np.float64) - ref) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(float(ref.max()) ** 2 / mse)


def build_nets(d: Path) -> dict[str, Any]:
    """Model files of the test net on both runtimes (TFLite ones where LiteRT's schema is
    installed), and its golden set."""
    files = {"onnx_fp32": d / "net.fp32.onnx", "onnx_int8": d / "net.int8.onnx"}
    onnx_net(files["onnx_fp32"])
    quantize_qdq(files["onnx_fp32"], files["onnx_int8"])
    files["onnx_broken"] = d / "net.broken.onnx"
    onnx_net(files["onnx_broken"], w2_factor=8.0)
    if HAVE_SCHEMA:
        for name, kwargs in {
            "tfl_fp32": {}, "tfl_int8": {"int8": True},
            "tfl_fp32_nchw": {"layout": "NCHW"}, "tfl_int8_nchw": {"int8": True,
                                                                  "layout": "NCHW"},
            "tfl_broken": {"int8": True, "corrupt_weight_scale": 8.0},
        }.items():
            files[name] = d / f"{name}.tflite"
            tflite_net(files[name], **kwargs)
    x = smooth_inputs(4, seed=2)  # held out from the calibration inputs
    ref = run_file("onnxruntime", files["onnx_fp32"], x)
    return {"files": files, "golden": (x, ref), "dir": d}


@pytest.fixture(scope="module")
def nets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return build_nets(tmp_path_factory.mktemp("litert-nets"))


# --- without LiteRT ------------------------------------------------------------------


def test_missing_litert_names_the_packages(monkeypatch: pytest.MonkeyPatch,
                                           tmp_path: Path) -> None:
    for name in ("ai_edge_litert", "ai_edge_litert.interpreter", "tflite_runtime",
                 "tflite_runtime.interpreter"):
        monkeypatch.setitem(sys.modules, name, None)  # None: "import X" raises ImportError
    (tmp_path / "m.tflite").write_bytes(b"not used")
    with pytest.raises(BackendError, match=r"pip install ai-edge-litert") as info:
        open_runner("litert", str(tmp_path / "m.tflite"), RunnerOptions())
    assert "pip install tflite-runtime" in str(info.value)  # the fallback where no wheel


def test_unknown_runtime_lists_both() -> None:
    with pytest.raises(BackendError, match="onnxruntime, litert"):
        open_runner("tensorrt", "x", RunnerOptions())


# --- the runner ----------------------------------------------------------------------


@needs_litert
def test_a_file_litert_cannot_load_is_a_backend_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.tflite"
    bad.write_bytes(b"\x00" * 64)
    with pytest.raises(BackendError, match="LiteRT cannot load"):
        open_runner("litert", str(bad), RunnerOptions())


@needs_litert
def test_fp32_matches_onnxruntime(nets: dict[str, Any]) -> None:
    x, ref = nets["golden"]
    for name in ("tfl_fp32", "tfl_fp32_nchw"):
        got = run_file("litert", nets["files"][name], x)
        assert got.shape == ref.shape and got.dtype == np.float32
        np.testing.assert_allclose(got, ref, atol=1e-5, err_msg=name)
    # ...and the numpy reference agrees with both (the nets are what they claim to be)
    _h, out = forward_nhwc(x.transpose(0, 2, 3, 1))
    np.testing.assert_allclose(out.transpose(0, 3, 1, 2), ref, atol=1e-5)


@needs_litert
def test_int8_io_is_quantized_inside_the_runner(nets: dict[str, Any]) -> None:
    from agent.backends.litert import LiteRTRunner

    x, ref = nets["golden"]
    runner = LiteRTRunner(str(nets["files"]["tfl_int8"]), RunnerOptions(intra_op_threads=1))
    assert runner.input_quantized and runner.layout((1, GRID, GRID)) == "NHWC"
    got = runner.run(x)  # float32 NCHW in and out, int8 NHWC inside
    assert got.dtype == np.float32 and got.shape == ref.shape
    assert psnr(got, ref) >= FLOOR_DB
    # out-of-range inputs saturate instead of wrapping around
    wild = runner.run(np.full((1, 1, GRID, GRID), 50.0, dtype=np.float32))
    assert np.all(np.isfinite(wild))
    runner.close()


@needs_litert
def test_both_runtimes_match_on_the_golden_set(nets: dict[str, Any]) -> None:
    """int8 on LiteRT and int8 on onnxruntime each pass the floor against the fp32
    reference and agree with each other."""
    x, ref = nets["golden"]
    onnx_out = run_file("onnxruntime", nets["files"]["onnx_int8"], x)
    for name in ("tfl_int8", "tfl_int8_nchw"):
        tfl_out = run_file("litert", nets["files"][name], x)
        assert psnr(tfl_out, ref) >= FLOOR_DB, name
        assert psnr(onnx_out, ref) >= FLOOR_DB
        assert psnr(tfl_out, onnx_out) >= FLOOR_DB, name


@needs_litert
@pytest.mark.parametrize("name", ["tfl_fp32", "tfl_fp32_nchw", "tfl_int8", "tfl_int8_nchw"])
def test_any_batch_size(nets: dict[str, Any], name: str) -> None:
    """Batch-1 files take batches of 3 and 4 (resized when the graph allows, else item by
    item) and give what one-by-one runs give."""
    x, _ref = nets["golden"]
    runner = open_runner("litert", str(nets["files"][name]), RunnerOptions(intra_op_threads=1))
    singles = np.concatenate([runner.run(x[i : i + 1]) for i in range(4)])
    np.testing.assert_allclose(runner.run(x[:3]), singles[:3], atol=1e-6)
    np.testing.assert_allclose(runner.run(x), singles, atol=1e-6)
    np.testing.assert_allclose(runner.run(x[1:2]), singles[1:2], atol=1e-6)
    runner.close()


@needs_litert
def test_wrong_input_shape_is_a_backend_error(nets: dict[str, Any]) -> None:
    runner = open_runner("litert", str(nets["files"]["tfl_fp32"]), RunnerOptions())
    with pytest.raises(BackendError, match="fits neither"):
        runner.run(np.zeros((1, 1, 16, 16), dtype=np.float32))


@needs_litert
def test_thread_count_zero_means_one_per_core(nets: dict[str, Any]) -> None:
    import os

    from agent.backends.litert import LiteRTRunner

    runner = LiteRTRunner(str(nets["files"]["tfl_fp32"]), RunnerOptions(intra_op_threads=0))
    assert runner.threads == (os.cpu_count() or 1)
    runner = LiteRTRunner(str(nets["files"]["tfl_fp32"]), RunnerOptions(intra_op_threads=2))
    assert runner.threads == 2


# --- the guard on LiteRT -------------------------------------------------------------


@needs_litert
def test_guard_passes_int8_tflite_and_refuses_a_corrupted_one(
    nets: dict[str, Any], tmp_path: Path
) -> None:
    good = load_bundle(write_bundle(tmp_path / "good", {"litert": nets["files"]["tfl_int8"]},
                                    nets["golden"]))
    runner = open_runner("litert", str(good.backend_file("litert").path), RunnerOptions())
    report = run_guard(good, runner)
    assert report.ok and report.runtime == "litert", report.reason
    assert report.worst_psnr_db is not None and FLOOR_DB <= report.worst_psnr_db < math.inf

    bad = load_bundle(write_bundle(tmp_path / "bad", {"litert": nets["files"]["tfl_broken"]},
                                   nets["golden"]))
    runner = open_runner("litert", str(bad.backend_file("litert").path), RunnerOptions())
    report = run_guard(bad, runner)
    assert not report.ok and "misses its fidelity floor" in report.reason
    assert report.worst_psnr_db is not None and report.worst_psnr_db < FLOOR_DB - 5


# --- the shipped bundle --------------------------------------------------------------


def _shipped(path: Path) -> Any:
    bundle = load_bundle(path)
    assert "litert" in bundle.backends, f"{path.name} ships without a LiteRT file"
    assert bundle.golden is not None, f"{path.name} ships without a golden set"
    return bundle


@needs_litert
@pytest.mark.parametrize("shipped", SHIPPED_BUNDLES, ids=lambda p: p.name)
def test_shipped_bundle_matches_on_both_runtimes(shipped: Path) -> None:
    bundle = _shipped(shipped)
    x = np.load(bundle.golden.path)["input"]
    outputs = {}
    for runtime in ("onnxruntime", "litert"):
        runner = open_runner(runtime, str(bundle.backend_file(runtime).path),
                             RunnerOptions(input_name=bundle.input.input_name,
                                           output_name=bundle.output.output_name))
        report = run_guard(bundle, runner)
        assert report.ok, report.reason
        outputs[runtime] = runner.run(x)
        runner.close()
    # Each runtime is within the floor of the fp32 reference (the guard above); two errors
    # that each meet it are at most twice as large apart: 20*log10(2) = 6.02 dB less.
    floor = bundle.golden.min_psnr_db - 6.02
    assert psnr(outputs["litert"], outputs["onnxruntime"]) >= floor


@needs_litert
@pytest.mark.parametrize("shipped", SHIPPED_BUNDLES, ids=lambda p: p.name)
def test_shipped_tflite_with_a_corrupted_weight_scale_is_refused(
    tmp_path: Path, shipped: Path
) -> None:
    from ai_edge_litert import schema_py_generated as fb
    from ai_edge_litert.tools import flatbuffer_utils

    bundle = _shipped(shipped)
    model = flatbuffer_utils.read_model(str(bundle.backend_file("litert").path))
    sg = model.subgraphs[0]
    codes = [flatbuffer_utils.get_builtin_code_from_operator_code(c)
             for c in model.operatorCodes]
    # The first int8 conv (lite keeps its first and last conv in float on LiteRT).
    conv = next(op for op in sg.operators
                if codes[op.opcodeIndex] == fb.BuiltinOperator.CONV_2D
                and sg.tensors[op.inputs[1]].quantization is not None
                and sg.tensors[op.inputs[1]].quantization.scale is not None)
    weight = sg.tensors[conv.inputs[1]]
    weight.quantization.scale = [s * 10 for s in weight.quantization.scale]
    root = tmp_path / "b"
    shutil.copytree(shipped, root)
    flatbuffer_utils.write_model(model, str(root / bundle.backend_file("litert").path.name))
    meta = json.loads((root / "bundle.json").read_text())
    meta["backends"]["litert"]["sha256"] = _sha(root / meta["backends"]["litert"]["path"])
    (root / "bundle.json").write_text(json.dumps(meta))
    broken = load_bundle(root)
    runner = open_runner("litert", str(broken.backend_file("litert").path), RunnerOptions())
    report = run_guard(broken, runner)
    assert not report.ok and "misses its fidelity floor" in report.reason
