"""Build small, real model bundles for tests (a genuine ONNX graph, not a mock)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

MODELS_DIR = Path(__file__).resolve().parents[1] / "models"
# The reference bundles the repository ships: every shipped-bundle test runs on each.
SHIPPED_BUNDLES = (MODELS_DIR / "t1w-to-t2w-lite", MODELS_DIR / "t1w-to-t2w-full")


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def scale_model(path: Path, factor: float = 0.5) -> None:
    """An ONNX graph computing output = input * factor on [N, 1, 256, 256]."""
    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 1, 256, 256])
    y = helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", 1, 256, 256])
    k = numpy_helper.from_array(np.array(factor, dtype=np.float32), "k")
    graph = helper.make_graph([helper.make_node("Mul", ["input", "k"], ["output"])],
                              "scale", [x], [y], [k])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))


def write_fp32_bundle(root: Path, model_file: str, name: str, task: str,
                      input_contract: dict[str, object]) -> Path:
    """bundle.json for an fp32 test model already at ``root / model_file`` (no golden set:
    an fp32 model is its own reference)."""
    meta = {
        "format": 1,
        "name": name,
        "version": "0.0.1",
        "task": task,
        "precision": "fp32",
        "input": {"modality": "MR", "pixel_spacing_mm": [1.0, 1.0],
                  "series_description_pattern": None, **input_contract},
        "output": {"modality": "MR", "scale": 1000.0,
                   "series_description": "SYNTHETIC TEST - NOT FOR DIAGNOSTIC USE"},
        "backends": {"onnxruntime": {"path": model_file, "sha256": _sha(root / model_file)}},
    }
    (root / "bundle.json").write_text(json.dumps(meta, indent=2))
    return root


def make_scale_bundle(root: Path, factor: float = 0.5, name: str = "test-scale") -> Path:
    root.mkdir(parents=True, exist_ok=True)
    scale_model(root / "model.int8.onnx", factor)
    return write_fp32_bundle(root, "model.int8.onnx", name, "test: output = input * factor",
                             {"shape": [256, 256]})


def smooth_inputs(n: int, seed: int, grid: int = 32) -> np.ndarray:
    """float32 [n, 1, grid, grid] in [0, 1], smooth like normalised MR slices."""
    rng = np.random.default_rng(seed)
    x = rng.random((n, 1, grid, grid))
    for axis in (2, 3):  # a few box blurs
        for _ in range(3):
            x = (x + np.roll(x, 1, axis) + np.roll(x, -1, axis)) / 3
    return ((x - x.min()) / (x.max() - x.min())).astype(np.float32)


def quantize_qdq(fp32: Path, int8: Path) -> None:
    """Static int8 QDQ (u8 activations, per-channel u8 weights) calibrated on 16 smooth
    inputs. Unsigned weights: onnxruntime's u8u8 kernels widen to 16 bits before they
    multiply, so the file gives the same figures on every CPU (u8s8 weights saturate on
    x86 without VNNI: this model's golden PSNR fell to 25.5 dB under ``-cpu Haswell``)."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    class Reader(CalibrationDataReader):  # type: ignore[misc]
        def __init__(self) -> None:
            self._batches = iter(smooth_inputs(16, seed=1)[:, None])

        def get_next(self) -> dict[str, np.ndarray] | None:
            batch = next(self._batches, None)
            return None if batch is None else {"input": batch}

    quantize_static(str(fp32), str(int8), Reader(), quant_format=QuantFormat.QDQ,
                    per_channel=True, activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QUInt8)


def context_model(path: Path, weights: list[float], grid: int = 32) -> None:
    """A 2.5D ONNX graph: a 1x1 conv weighting the 2k + 1 input slices (channels) into one
    output slice, on [N, 2k + 1, grid, grid]."""
    c = len(weights)
    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", c, grid, grid])
    y = helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", 1, grid, grid])
    w = numpy_helper.from_array(np.array(weights, dtype=np.float32).reshape(1, c, 1, 1), "w")
    graph = helper.make_graph([helper.make_node("Conv", ["input", "w"], ["output"])],
                              "context", [x], [y], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))


def make_context_bundle(root: Path, weights: list[float], grid: int = 32,
                        name: str = "test-context") -> Path:
    """An fp32 2.5D bundle (context_slices = len(weights) // 2) on a grid x grid, 1 mm
    model grid. Normalisation leaves constant slices exact: any percentile of a constant
    slice is its value, and the clip is far above the ratios the tests use."""
    root.mkdir(parents=True, exist_ok=True)
    context_model(root / "model.onnx", weights, grid)
    return write_fp32_bundle(
        root, "model.onnx", name, "test: weighted sum of a slice and its neighbours",
        {"shape": [grid, grid], "context_slices": len(weights) // 2, "slice_spacing_mm": 1.0,
         "normalisation": {"method": "robust_max", "percentile": 50.0, "clip_max": 1000.0}})


def expected_context_output(values: list[float], weights: list[float],
                            slots: list[int]) -> float:
    """What the context model gives for slot indices ``slots`` (centre in the middle) of
    constant slices with ``values``: the normalised weighted sum."""
    centre = values[slots[len(slots) // 2]]
    return sum(w * values[s] / centre for w, s in zip(weights, slots, strict=True))


def corrupt_weight_scale(src: Path, dst: Path, factor: float = 10.0) -> str:
    """Multiply the scale of the first weight DequantizeLinear by ``factor``; returns its name."""
    model = onnx.load(str(src))
    inits = {i.name: i for i in model.graph.initializer}
    node = next(n for n in model.graph.node
                if n.op_type == "DequantizeLinear" and n.input[0] in inits
                and onnx.numpy_helper.to_array(inits[n.input[0]]).ndim == 4)
    scale = inits[node.input[1]]
    scale.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(scale) * np.float32(factor),
                                           scale.name))
    onnx.save(model, str(dst))
    return scale.name
