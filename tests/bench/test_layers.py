"""agent.bench.layers: the per-layer profile (onnxruntime's profiler) of a model's files."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from agent.bench.layers import float_share, run_profile, table
from tests.bundles import quantize_qdq, smooth_inputs

ROOT = Path(__file__).resolve().parents[2]
GRID = 32
# conv 3x3 1 -> 8, ReLU, conv 3x3 8 -> 8, ReLU, conv 1x1 8 -> 1 on 32 x 32
EXPECTED_MACS = [GRID * GRID * 8 * 1 * 9, GRID * GRID * 8 * 8 * 9, GRID * GRID * 1 * 8]


def three_convs(path: Path) -> None:
    rng = np.random.default_rng(5)
    shapes = {"w1": (8, 1, 3, 3), "w2": (8, 8, 3, 3), "w3": (1, 8, 1, 1)}
    weights = [numpy_helper.from_array(rng.normal(0, 0.3, s).astype(np.float32), n)
               for n, s in shapes.items()]
    nodes = [helper.make_node("Conv", ["input", "w1"], ["c1"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("Conv", ["r1", "w2"], ["c2"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c2"], ["r2"]),
             helper.make_node("Conv", ["r2", "w3"], ["output"])]
    graph = helper.make_graph(
        nodes, "three",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 1, GRID, GRID])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", 1, GRID, GRID])],
        weights)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("layers")
    fp32, int8 = root / "fp32.onnx", root / "int8.onnx"
    three_convs(fp32)
    quantize_qdq(fp32, int8)
    return {"fp32": fp32, "int8": int8}


def test_int8_convolutions_are_counted_exactly_and_run_on_integers(
        models: dict[str, Path]) -> None:
    rows = run_profile(models["int8"], smooth_inputs(1, seed=2), threads=1, runs=3)
    convs = [r for r in rows if r["op"] == "QLinearConv"]
    assert sorted(r["macs"] for r in convs) == sorted(EXPECTED_MACS)
    assert all(r["in_types"] and "uint8" in r["in_types"] and r["out_types"] == ["uint8"]
               for r in convs)
    assert float_share(rows) < 1.0  # the integer kernels are not float
    assert sum(r["share"] for r in rows) == pytest.approx(1.0)
    # bytes moved: at least the output tensor of each conv, one byte per element
    assert all(r["bytes"] >= GRID * GRID for r in convs)


def test_the_fp32_file_runs_all_in_float(models: dict[str, Path]) -> None:
    rows = run_profile(models["fp32"], smooth_inputs(1, seed=2), threads=1, runs=3)
    assert float_share(rows) == pytest.approx(1.0)
    # NCHWc layouts pad output channels to the vector width: executed MACs >= the graph's
    assert sum(r["macs"] for r in rows) >= sum(EXPECTED_MACS)
    assert all(r["median_us"] >= 0 for r in rows)


def test_table_folds_small_nodes_into_one_row(models: dict[str, Path]) -> None:
    rows = run_profile(models["int8"], smooth_inputs(1, seed=2), threads=1, runs=3)
    full = table("int8", rows)
    folded = table("int8", rows, min_share=1.01)
    assert full.count("\n| ") == len(rows) + 1  # header + one row per node
    assert f"| {len(rows)} other nodes |" in folded
    assert "GMAC executed" in full and "all-float kernels" in full


def test_command_line_on_the_shipped_lite_bundle(tmp_path: Path) -> None:
    out = tmp_path / "layers.json"
    proc = subprocess.run(
        [sys.executable, "-m", "agent.bench.layers", str(ROOT / "models" / "t1w-to-t2w-lite"),
         "--runs", "2", "--min-share", "0.05", "--json", str(out)],
        capture_output=True, text=True, check=False, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(out.read_text(encoding="utf-8"))
    assert set(doc) >= {"fp32", "int8", "onnxruntime"}
    assert any(r["op"] == "QLinearConv" for r in doc["int8"])
    assert "t1w-to-t2w-lite int8" in proc.stdout


def test_not_a_bundle_is_refused(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "agent.bench.layers", str(tmp_path)],
                          capture_output=True, text=True, check=False, cwd=ROOT, timeout=60)
    assert proc.returncode == 1
    assert str(tmp_path) in proc.stderr and "Traceback" not in proc.stderr
