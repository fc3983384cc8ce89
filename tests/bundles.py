"""Build small, real model bundles for tests (a genuine ONNX graph, not a mock)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


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


def make_scale_bundle(root: Path, factor: float = 0.5, name: str = "test-scale") -> Path:
    root.mkdir(parents=True, exist_ok=True)
    scale_model(root / "model.int8.onnx", factor)
    meta = {
        "format": 1,
        "name": name,
        "version": "0.0.1",
        "task": "test: output = input * factor",
        "precision": "fp32",
        "input": {"modality": "MR", "shape": [256, 256], "pixel_spacing_mm": [1.0, 1.0],
                  "series_description_pattern": None},
        "output": {"modality": "MR", "scale": 1000.0,
                   "series_description": "SYNTHETIC TEST - NOT FOR DIAGNOSTIC USE"},
        "backends": {"onnxruntime": {"path": "model.int8.onnx",
                                     "sha256": _sha(root / "model.int8.onnx")}},
    }
    (root / "bundle.json").write_text(json.dumps(meta, indent=2))
    return root
