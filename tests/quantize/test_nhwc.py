"""agent/quantize/nhwc.py: the rewrite that int8 files are quantized from (``model
quantize`` and the reference models' recipe) computes the float model's function to the bit,
and the shipped int8 graphs carry it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper, shape_inference

from agent.model.guard import verify_bundle
from agent.quantize import nhwc
from tests.bundles import MODELS_DIR, SHIPPED_BUNDLES
from tests.quantize.nets import contract, conv_net, quantize

# What each shipped fp32 graph has to rewrite (the full model has no stem).
EXPECTED = {
    "t1w-to-t2w-lite": {"resize": 3, "stem": 1, "head": 1},
    "t1w-to-t2w-full": {"resize": 4, "stem": 0, "head": 0},
}


def golden_inputs(bundle: Path) -> np.ndarray:
    with np.load(bundle / "golden.npz") as g:
        return np.asarray(g["input"][:2], dtype=np.float32)


@pytest.mark.parametrize("bundle", SHIPPED_BUNDLES, ids=lambda b: b.name)
def test_the_rewrite_of_a_shipped_fp32_graph_computes_the_same_output(
        bundle: Path, tmp_path: Path) -> None:
    out = tmp_path / "rewritten.onnx"
    counts = nhwc.rewrite_file(bundle / "model.fp32.onnx", out, golden_inputs(bundle))
    assert counts == EXPECTED[bundle.name]
    ops = {n.op_type for n in onnx.load(str(out)).graph.node}
    assert "Resize" not in ops and "DepthToSpace" not in ops
    # check_same allows float rounding only; pure data movement gives none.
    assert nhwc.check_same(bundle / "model.fp32.onnx", out, golden_inputs(bundle)) == 0.0


def test_float_outer_leaves_the_shipped_full_models_last_resize(tmp_path: Path) -> None:
    bundle = MODELS_DIR / "t1w-to-t2w-full"
    counts = nhwc.rewrite_file(bundle / "model.fp32.onnx", tmp_path / "r.onnx",
                                       golden_inputs(bundle), float_outer=True)
    assert counts == {"resize": 3, "stem": 0, "head": 0}


def test_a_changed_rewrite_of_the_shipped_lite_graph_is_refused(tmp_path: Path) -> None:
    bundle = MODELS_DIR / "t1w-to-t2w-lite"
    model, _ = nhwc.rewrite(onnx.load(str(bundle / "model.fp32.onnx")))
    stem = next(n for n in model.graph.node if n.name == "nhwc_rewrite/stem/to_nhwc")
    assert list(stem.attribute[0].ints) == [0, 2, 1, 3]  # one image channel: 4-D
    stem.attribute[0].ints[:] = [0, 2, 3, 1]  # the same shape, each 2 x 2 block transposed
    bad = tmp_path / "bad.onnx"
    onnx.save(model, str(bad))
    with pytest.raises(nhwc.RewriteChangedOutput, match="NHWC rewrite changed the model's output"):
        nhwc.check_same(bundle / "model.fp32.onnx", bad, golden_inputs(bundle))


def stem_head_net(path: Path, channels: int, grid: int = 16, s: int = 2) -> None:
    """A PixelUnshuffle stem as PyTorch exports it (Reshape, 6-D Transpose, Reshape) on
    ``channels`` image channels, a 3 x 3 conv, and a depth-to-space head (CRD) + Relu back
    to ``channels`` channels."""
    c, h = channels, grid // s
    rng = np.random.default_rng(5)
    w = rng.normal(0, 0.5, (c * s * s, c * s * s, 3, 3)).astype(np.float32)
    inits = [numpy_helper.from_array(w, "w"),
             numpy_helper.from_array(np.array([-1, c, h, s, h, s], np.int64), "split"),
             numpy_helper.from_array(np.array([-1, c * s * s, h, h], np.int64), "merge")]
    nodes = [
        helper.make_node("Reshape", ["input", "split"], ["a"], name="split"),
        helper.make_node("Transpose", ["a"], ["b"], name="unshuffle", perm=nhwc.STEM_PERM),
        helper.make_node("Reshape", ["b", "merge"], ["stem"], name="merge"),
        helper.make_node("Conv", ["stem", "w"], ["conv"], name="conv", pads=[1] * 4),
        helper.make_node("DepthToSpace", ["conv"], ["d2s"], name="d2s", blocksize=s,
                         mode="CRD"),
        helper.make_node("Relu", ["d2s"], ["output"], name="relu"),
    ]
    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", c, grid, grid])
    y = helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", c, grid, grid])
    model = helper.make_model(helper.make_graph(nodes, "stem_head", [x], [y], inits),
                              opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))


@pytest.mark.parametrize("channels", [1, 3])
def test_the_stem_and_head_rewrites_are_exact_for_one_or_more_channels(
        tmp_path: Path, channels: int) -> None:
    """One image channel takes the 4-D spelling (one axis moves), several the 6-D one;
    both give the original output for a batch of two."""
    stem_head_net(tmp_path / "net.onnx", channels)
    sample = np.random.default_rng(2).random((2, channels, 16, 16), dtype=np.float32)
    counts = nhwc.rewrite_file(tmp_path / "net.onnx", tmp_path / "r.onnx", sample)
    assert counts == {"resize": 0, "stem": 1, "head": 1}
    assert nhwc.check_same(tmp_path / "net.onnx", tmp_path / "r.onnx", sample) == 0.0
    perms = [len(n.attribute[0].ints) for n in onnx.load(str(tmp_path / "r.onnx")).graph.node
             if n.op_type == "Transpose"]
    assert max(perms) == (4 if channels == 1 else 6)


@pytest.mark.parametrize("bundle", SHIPPED_BUNDLES, ids=lambda b: b.name)
def test_the_shipped_int8_onnx_file_has_no_resize_inside_its_int8_graph(bundle: Path) -> None:
    """Built from the rewrite: a Resize is left only where the variant keeps the outer
    level in float (to the input's height and width)."""
    model = shape_inference.infer_shapes(onnx.load(str(bundle / "model.int8.onnx")))
    g = model.graph
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim]
              for v in (*g.value_info, *g.input, *g.output)}
    size = shapes[g.input[0].name][-2:]
    resizes = [n for n in g.node if n.op_type == "Resize"]
    assert all(shapes[n.output[0]][-2:] == size for n in resizes), [n.name for n in resizes]
    assert not any(n.op_type == "DepthToSpace" for n in g.node)


def resize_net(path: Path, grid: int = 64) -> None:
    """Conv 3x3 (1 -> 4) + Relu, MaxPool 2, Conv 3x3 (4 -> 4) + Relu, nearest Resize x2,
    Concat with the first conv's output, Conv 3x3 (8 -> 1): a one-level U-Net."""
    rng = np.random.default_rng(11)
    inits = []
    for name, shape in (("c1", (4, 1, 3, 3)), ("c2", (4, 4, 3, 3)), ("c3", (1, 8, 3, 3))):
        inits += [numpy_helper.from_array(rng.normal(0, 0.4, shape).astype(np.float32), name),
                  numpy_helper.from_array(np.full(shape[0], 0.05, np.float32), name + "_b")]
    inits.append(numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scales"))
    nodes = [
        helper.make_node("Conv", ["input", "c1", "c1_b"], ["a"], name="conv1", pads=[1] * 4),
        helper.make_node("Relu", ["a"], ["ra"], name="relu1"),
        helper.make_node("MaxPool", ["ra"], ["p"], name="pool", kernel_shape=[2, 2],
                         strides=[2, 2]),
        helper.make_node("Conv", ["p", "c2", "c2_b"], ["b"], name="conv2", pads=[1] * 4),
        helper.make_node("Relu", ["b"], ["rb"], name="relu2"),
        helper.make_node("Resize", ["rb", "", "scales"], ["up"], name="up", mode="nearest"),
        helper.make_node("Concat", ["up", "ra"], ["cat"], name="cat", axis=1),
        helper.make_node("Conv", ["cat", "c3", "c3_b"], ["output"], name="conv3", pads=[1] * 4),
    ]
    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 1, grid, grid])
    y = helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", 1, grid, grid])
    model = helper.make_model(helper.make_graph(nodes, "unet", [x], [y], inits),
                              opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))


def test_model_quantize_quantizes_an_operators_resize_from_the_rewrite(
        tmp_path: Path, dicoms: Path) -> None:
    resize_net(tmp_path / "unet.onnx")
    code, out = quantize(tmp_path, dicoms, tmp_path / "unet.onnx",
                         contract(tmp_path / "c.toml"))
    assert code == 0
    report = json.loads((out / "quantize-report.json").read_text())
    assert report["quantization"]["pre_process"].startswith(
        "NHWC rewrite (1 resize; the same output, checked); quant_pre_process")
    ops = [n.op_type for n in onnx.load(str(out / "model.int8.onnx")).graph.node]
    assert "Resize" not in ops and "Expand" in ops
    assert (out / "model.fp32.onnx").read_bytes() == (tmp_path / "unet.onnx").read_bytes()
    assert verify_bundle(out, intra_op_threads=1).ok


def test_model_quantize_notes_a_graph_with_nothing_to_rewrite(tmp_path: Path,
                                                              dicoms: Path) -> None:
    conv_net(tmp_path / "net.onnx")
    code, out = quantize(tmp_path, dicoms, tmp_path / "net.onnx", contract(tmp_path / "c.toml"))
    assert code == 0
    report = json.loads((out / "quantize-report.json").read_text())
    assert report["quantization"]["pre_process"].startswith("NHWC rewrite: nothing to rewrite")
