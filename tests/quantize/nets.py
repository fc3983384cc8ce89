"""The small float ONNX nets, contracts and the ``model quantize`` call that the quantize
tests share (``test_quantize.py``, ``test_nhwc.py``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from agent.cli import main  # noqa: E402

GRID = 64  # the MNI slab is 256 x 256 at 1 mm: 4 mm on a 64 x 64 model grid


def conv_net(path: Path, *, channels: int = 1, grid: int | str = GRID,
             fragile: bool = False) -> None:
    """Conv 3x3 (channels -> 4) + Relu, Conv 1x1 (4 -> 4) + Relu, Conv 3x3 (4 -> 1).

    Channels 0/1 and 2/3 of the first conv are identical filters, so with ``fragile`` the
    middle conv (named "fragile") can add +-1000 x one twin to -+1000 x the other: exact in
    float, but per-channel int8 weights of step ~8 leave errors far above its output."""
    rng = np.random.default_rng(7)
    w1 = rng.normal(0, 0.4, (4, channels, 3, 3))
    w1[1], w1[3] = w1[0], w1[2]
    w2 = rng.normal(0, 0.4, (4, 4, 1, 1))
    if fragile:
        w2[:, 0] += 1000.0
        w2[:, 1] -= 1000.0
    w3 = rng.normal(0, 0.4, (1, 4, 3, 3))
    inits, nodes = [], []
    for name, w, pad, x, y in (("conv1", w1, 1, "input", "c1"), ("fragile", w2, 0, "r1", "c2"),
                               ("conv3", w3, 1, "r2", "output")):
        inits += [numpy_helper.from_array(w.astype(np.float32), f"{name}_w"),
                  numpy_helper.from_array(np.full(len(w), 0.05, np.float32), f"{name}_b")]
        nodes.append(helper.make_node("Conv", [x, f"{name}_w", f"{name}_b"], [y], name=name,
                                      pads=[pad] * 4))
    nodes.insert(1, helper.make_node("Relu", ["c1"], ["r1"], name="relu1"))
    nodes.insert(3, helper.make_node("Relu", ["c2"], ["r2"], name="relu2"))
    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", channels, grid, grid])
    y = helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", 1, grid, grid])
    model = helper.make_model(helper.make_graph(nodes, "net", [x], [y], inits),
                              opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))


def contract(path: Path, *, floor: float = 30.0, context: int = 0) -> Path:
    extra = f"context_slices = {context}\nslice_spacing_mm = 1.0\n" if context else ""
    path.write_text(f"""
name = "test-net"
version = "0.1.0"
task = "test: tiny conv net"

[input]
modality = "MR"
shape = [{GRID}, {GRID}]
pixel_spacing_mm = [4.0, 4.0]
series_description_pattern = "t1"
{extra}
[output]
modality = "MR"
scale = 1000.0
series_description = "SYNTHETIC TEST - NOT FOR DIAGNOSTIC USE"

[fidelity]
min_psnr_db = {floor}
""")
    return path


def quantize(tmp_path: Path, dicoms: Path, model: Path, contract_path: Path,
             *extra: str) -> tuple[int, Path]:
    out = tmp_path / "bundle"
    code = main(["model", "quantize", "--fp32", str(model), "--calibration", str(dicoms),
                 "--contract", str(contract_path), "--out", str(out), "--threads", "1", *extra])
    return code, out
