"""Export a trained U-Net to ONNX (opset 17, dynamic batch) -> models/<name>/model.fp32.onnx."""

from __future__ import annotations

import argparse
import time
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import torch

from recipes import config
from recipes.timing import record_timing
from recipes.unet import UNetLite

OPSET = 17


def load_model(spec: config.ModelSpec) -> UNetLite:
    ckpt = torch.load(spec.build("model.pt"), map_location="cpu", weights_only=True)
    model = UNetLite(tuple(ckpt["widths"]), int(ckpt.get("in_channels", 1)),
                     int(ckpt.get("stem", 1)), int(ckpt.get("refine", 0)),
                     int(ckpt.get("head", 1)), bool(ckpt.get("edge", False)))
    model.load_state_dict(ckpt["state_dict"])
    return model.eval()


def export(spec: config.ModelSpec, model: UNetLite) -> None:
    spec.bundle_dir.mkdir(parents=True, exist_ok=True)
    path = spec.bundle("model.fp32.onnx")
    dummy = torch.zeros(1, spec.in_channels, config.GRID, config.GRID)
    # The TorchScript exporter: no onnxscript dependency, and plain Resize/Conv graphs.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            model,
            (dummy,),
            str(path),
            dynamo=False,
            opset_version=OPSET,
            input_names=["input"],
            output_names=["output"],
            dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}},
            do_constant_folding=True,
        )
    # Name the file in its doc string and check it against the ONNX spec.
    proto = onnx.load(str(path))
    proto.doc_string = f"{spec.name} {spec.version} fp32 reference"
    onnx.checker.check_model(proto, full_check=True)
    onnx.save(proto, str(path))


def check_against_torch(spec: config.ModelSpec, model: UNetLite) -> float:
    """Max abs difference between torch and onnxruntime on a random batch of 2."""
    x = torch.rand(2, spec.in_channels, config.GRID, config.GRID,
                   generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(x).numpy()
    sess = ort.InferenceSession(str(spec.bundle("model.fp32.onnx")),
                                providers=["CPUExecutionProvider"])
    got = sess.run(["output"], {"input": x.numpy()})[0]
    return float(np.abs(got - expected).max())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    config.add_model_argument(parser)
    spec = config.spec(parser.parse_args().model)
    start = time.perf_counter()
    torch.set_num_threads(2)
    model = load_model(spec)
    export(spec, model)
    diff = check_against_torch(spec, model)
    if diff > 1e-4:
        raise SystemExit(f"onnx export mismatch: max abs diff {diff:.2e}")
    ops = sorted({n.op_type for n in onnx.load(str(spec.bundle("model.fp32.onnx"))).graph.node})
    print(f"exported {spec.name}/model.fp32.onnx: ops {ops}, torch vs ort max diff {diff:.1e}")
    record_timing("export", time.perf_counter() - start, spec.name)


if __name__ == "__main__":
    main()
