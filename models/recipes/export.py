"""Export the trained U-Net to ONNX (opset 17, dynamic batch) -> model.fp32.onnx."""

from __future__ import annotations

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


def load_model() -> UNetLite:
    ckpt = torch.load(config.CHECKPOINT, map_location="cpu", weights_only=True)
    model = UNetLite(tuple(ckpt["widths"]))
    model.load_state_dict(ckpt["state_dict"])
    return model.eval()


def export(model: UNetLite) -> None:
    config.BUNDLE_DIR.mkdir(parents=True, exist_ok=True)
    dummy = torch.zeros(1, 1, config.GRID, config.GRID)
    # The TorchScript exporter: no onnxscript dependency, and plain Resize/Conv graphs.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            model,
            (dummy,),
            str(config.FP32_ONNX),
            dynamo=False,
            opset_version=OPSET,
            input_names=["input"],
            output_names=["output"],
            dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}},
            do_constant_folding=True,
        )
    # Name the file in its doc string and check it against the ONNX spec.
    proto = onnx.load(str(config.FP32_ONNX))
    proto.doc_string = f"{config.BUNDLE_NAME} {config.BUNDLE_VERSION} fp32 reference"
    onnx.checker.check_model(proto, full_check=True)
    onnx.save(proto, str(config.FP32_ONNX))


def check_against_torch(model: UNetLite) -> float:
    """Max abs difference between torch and onnxruntime on a random batch of 2."""
    x = torch.rand(2, 1, config.GRID, config.GRID, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(x).numpy()
    sess = ort.InferenceSession(str(config.FP32_ONNX), providers=["CPUExecutionProvider"])
    got = sess.run(["output"], {"input": x.numpy()})[0]
    return float(np.abs(got - expected).max())


def main() -> None:
    start = time.perf_counter()
    torch.set_num_threads(2)
    model = load_model()
    export(model)
    diff = check_against_torch(model)
    if diff > 1e-4:
        raise SystemExit(f"onnx export mismatch: max abs diff {diff:.2e}")
    ops = sorted({n.op_type for n in onnx.load(str(config.FP32_ONNX)).graph.node})
    print(f"exported {config.FP32_ONNX.name}: ops {ops}, torch vs ort max diff {diff:.1e}")
    record_timing("export", time.perf_counter() - start)


if __name__ == "__main__":
    main()
