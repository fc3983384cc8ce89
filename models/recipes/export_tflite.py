"""Export a trained U-Net to LiteRT (TFLite): model.fp32.tflite and model.int8.tflite.

Converter: ``litert-torch`` (torch.export -> TFLite flatbuffer) for the float model, then
``ai-edge-quantizer`` for a full-integer one: int8 weights per channel, int8 activations
and int8 input/output tensors (the agent's LiteRT runner applies their scale/zero point;
``ModelSpec.litert_float_ends`` keeps the first and the last conv in float, as lite's),
calibrated on the same 48 training inputs as the ONNX int8 model. Calibration keeps the
global min/max of each tensor over the slices (as onnxruntime's MinMax does), not the
quantizer's default moving average, which clips the output's upper range (about 9 dB
int8-vs-fp32 PSNR lost on this model).

The converter does not belong in the project venv (it pulls jax, transformers and LiteRT's
converter): ``python -m recipes.export_tflite --setup-env DIR`` makes a venv at DIR that
sees the project venv's packages (torch 2.13.0, onnxruntime, the agent) and installs the
converter there with torch pinned to the project's version. The Makefile does that under
``build/tflite-env``.

The files: named tensors ``input`` -> ``output``, channels-last ([1, 256, 256, C], C = 1 for
a 2D model and 2k + 1 for a 2.5D one: the layout TFLite kernels use, and a graph whose batch
can be resized), batch 1.

Checks (the step fails otherwise): the fp32 TFLite model reproduces model.fp32.onnx on the
held-out slab within 1e-4 (so both come from the same weights); int8 within 0.5 dB of fp32
against the target on the training slices (the gate of recipes/quantize.py).

Report: build/<model>/tflite.json: file sizes, int8-vs-fp32 PSNR (held-out slab and the golden
slices, the guard's convention), quality against the target, and batch-1 latency (median
of 50 interleaved runs, 2 threads) of fp32/int8 on LiteRT and onnxruntime through the
agent's own runners.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
import venv
from pathlib import Path
from typing import Any

import numpy as np

from recipes import config
from recipes.metrics import psnr
from recipes.runtime import run_batched, runner_times_ms
from recipes.timing import record_timing

ENV_DIR = config.BUILD_DIR / "tflite-env"
# The converter and quantizer releases this recipe was written against.
CONVERTER_REQUIREMENTS = ("litert-torch==0.10.*", "ai-edge-quantizer==0.10.*")
MAX_FP32_DIFF = 1e-4
MAX_PSNR_DROP_DB = 0.5
LATENCY_RUNS = 50
LATENCY_WARMUP = 5
THREADS = 2
GOLDEN_SLAB_POSITIONS = (2, 9, 15, 21)  # as recipes/build_bundle.py

sys.path.insert(0, str(config.MODELS_DIR.parent))  # the agent's runners, as recipes/check.py


def setup_env(env_dir: Path) -> None:
    """A venv for the converter that shares the running interpreter's packages (torch)."""
    import torch

    venv.EnvBuilder(with_pip=True, clear=False).create(env_dir)
    python = env_dir / "bin" / "python"
    site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    # Our own site-packages: the env's packages shadow the project's, never the reverse.
    # site.addsitedir (not a bare path line) so that their own .pth files run too: the
    # project's editable install is one.
    ours = [p for p in sys.path if p.endswith("site-packages") and Path(p).is_dir()]
    (Path(site) / "zz_project_venv.pth").write_text(
        "".join(f"import site; site.addsitedir({p!r})\n" for p in ours), encoding="utf-8")
    constraints = env_dir / "constraints.txt"
    constraints.write_text(f"torch=={torch.__version__.split('+')[0]}\n", encoding="utf-8")
    subprocess.run(
        [
            str(python),
            "-m",
            "pip",
            "install",
            "--quiet",
            "-c",
            str(constraints),
            *CONVERTER_REQUIREMENTS,
        ],
        check=True,
    )
    print(f"converter env ready: {python}")


def load_torch_model(spec: config.ModelSpec) -> Any:
    from recipes.export import load_model

    return load_model(spec)


def channels_last_named(model: Any) -> Any:
    """Wrap the NCHW net: NHWC tensor ``input`` in, dict with NHWC ``output`` out (the
    signature names the agent's runner looks for)."""
    import torch
    from torch import nn

    class Wrapped(nn.Module):
        def __init__(self, net: nn.Module) -> None:
            super().__init__()
            self.net = net

        def forward(self, input: torch.Tensor) -> dict[str, torch.Tensor]:
            y = self.net(input.permute(0, 3, 1, 2))
            return {"output": y.permute(0, 2, 3, 1)}

    return Wrapped(model).eval()


def convert_fp32(model: Any, path: Path, channels: int) -> None:
    import litert_torch
    import torch

    sample = torch.zeros(1, config.GRID, config.GRID, channels)
    edge = litert_torch.convert(channels_last_named(model), sample_kwargs={"input": sample})
    edge.export(str(path))


def end_convs(fp32: Path) -> list[str]:
    """The output tensor names of the first and the last CONV_2D of a TFLite model."""
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(str(fp32))
    convs = [op for op in interpreter._get_ops_details() if op["op_name"] == "CONV_2D"]
    return [interpreter._get_tensor_details(op["outputs"][0], 0)["name"]
            for op in (convs[0], convs[-1])]


def quantize_int8(fp32: Path, int8: Path, calibration: np.ndarray,
                  float_ends: bool = False) -> None:
    """Static int8 quantization, global min/max calibration (see the docstring); with
    ``float_ends`` the first and the last conv stay in float."""
    from ai_edge_quantizer import calibrator, quantizer, recipe, recipe_manager
    from ai_edge_quantizer.utils import qsv_utils

    rcp = recipe.static_wi8_ai8()
    if float_ends:
        ends = recipe_manager.RecipeManager()
        ends.load_quantization_recipe(rcp)
        for name in end_convs(fp32):
            ends.add_quantization_config(regex=re.escape(name), operation_name="CONV_2D",
                                         algorithm_key="no_quantize")
        rcp = ends.get_quantization_recipe()
    manager = recipe_manager.RecipeManager()
    manager.load_quantization_recipe(rcp)
    calib = calibrator.Calibrator(
        fp32.read_bytes(), num_threads=THREADS, qsv_update_func=qsv_utils.min_max_update
    )
    # calibration: [N, C, H, W] model inputs; the TFLite model takes channels-last.
    data = [{"input": np.moveaxis(s, 0, -1)[None].astype(np.float32)} for s in calibration]
    calib.calibrate({"serving_default": data}, manager)
    qt = quantizer.Quantizer(str(fp32))
    qt.load_quantization_recipe(rcp)
    result = qt.quantize(calib.get_model_qsvs(), enable_progress_report=False)
    result.export_model(str(int8), overwrite=True)
    int8.chmod(0o644)  # the quantizer writes it executable


def runners(spec: config.ModelSpec) -> dict[str, Any]:
    from agent.backends import RunnerOptions
    from agent.backends.litert import LiteRTRunner
    from agent.backends.onnx import OnnxRunner

    opts = RunnerOptions(intra_op_threads=THREADS)
    out: dict[str, Any] = {
        "litert_fp32": LiteRTRunner(str(spec.bundle("model.fp32.tflite")), opts),
        "litert_int8": LiteRTRunner(str(spec.bundle("model.int8.tflite")), opts),
        "onnxruntime_fp32": OnnxRunner(str(spec.bundle("model.fp32.onnx")), opts),
    }
    if spec.bundle("model.int8.onnx").is_file():
        out["onnxruntime_int8"] = OnnxRunner(str(spec.bundle("model.int8.onnx")), opts)
    return out


def latency_ms(models: dict[str, Any], sample: np.ndarray) -> dict[str, dict[str, float]]:
    """Batch-1 latency per runner (median, p95), the runners taking turns."""
    times = runner_times_ms(models, sample, LATENCY_RUNS, LATENCY_WARMUP)
    return {
        name: {
            "median_ms": round(statistics.median(t), 2),
            "p95_ms": round(float(np.percentile(t, 95)), 2),
        }
        for name, t in times.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--setup-env", type=Path, metavar="DIR", help="create the converter venv at DIR and exit"
    )
    config.add_model_argument(parser)
    args = parser.parse_args()
    if args.setup_env:
        setup_env(args.setup_env)
        return
    spec = config.spec(args.model)
    fp32_tflite, int8_tflite = spec.bundle("model.fp32.tflite"), spec.bundle("model.int8.tflite")
    fp32_onnx, int8_onnx = spec.bundle("model.fp32.onnx"), spec.bundle("model.int8.onnx")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    start = time.perf_counter()
    import torch

    torch.set_num_threads(THREADS)
    from recipes.evaluate import holdout
    from recipes.quantize import calibration_subset, training_slices

    model = load_torch_model(spec)
    spec.bundle_dir.mkdir(parents=True, exist_ok=True)
    convert_fp32(model, fp32_tflite, spec.in_channels)
    x_train, y_train, region_train = training_slices(spec)
    quantize_int8(fp32_tflite, int8_tflite, calibration_subset(x_train), spec.litert_float_ends)

    models = runners(spec)
    x, y, region, _z = holdout(spec)
    x = x.astype(np.float32)
    preds = {name: run_batched(r, x) for name, r in models.items()}
    fp32_diff = float(np.abs(preds["litert_fp32"] - preds["onnxruntime_fp32"]).max())
    if fp32_diff > MAX_FP32_DIFF:
        raise SystemExit(
            f"{fp32_tflite.name} differs from {fp32_onnx.name} by {fp32_diff:.2e} "
            f"(> {MAX_FP32_DIFF:g}): the checkpoint is not the one the ONNX model came from"
        )
    rng_train = float(y_train.max())
    x_train = x_train.astype(np.float32)
    train_fp32 = psnr(run_batched(models["litert_fp32"], x_train), y_train, rng_train,
                      region_train)
    train_int8 = psnr(run_batched(models["litert_int8"], x_train), y_train, rng_train,
                      region_train)
    if train_fp32 - train_int8 > MAX_PSNR_DROP_DB:
        raise SystemExit(
            f"int8 TFLite loses {train_fp32 - train_int8:.2f} dB against fp32 on "
            f"the training slices (> {MAX_PSNR_DROP_DB} dB)"
        )

    ref = preds["onnxruntime_fp32"]
    rng = float(ref.max())
    golden = list(GOLDEN_SLAB_POSITIONS)
    g_ref, g_rng = ref[golden], float(ref[golden].max())
    vs_fp32: dict[str, dict[str, float]] = {}
    for name in ("litert_int8", "onnxruntime_int8"):
        if name not in preds:
            continue
        got = preds[name]
        vs_fp32[name] = {
            "holdout_psnr_db": round(psnr(got, ref, rng), 2),
            "golden_psnr_db": round(psnr(got[golden], g_ref, g_rng), 2),
            "golden_psnr_slice_min_db": round(min(psnr(got[i], ref[i], g_rng) for i in golden), 2),
        }
    target_rng = float(y.max())
    quality = {name: round(psnr(p, y, target_rng, region), 2) for name, p in preds.items()}
    latency = latency_ms(models, x[len(x) // 2][None])
    package = models["litert_int8"].package
    for r in models.values():
        r.close()
    report: dict[str, Any] = {
        "converter": "litert-torch + ai-edge-quantizer (static int8, min/max calibration)",
        "interpreter": package,
        "threads": THREADS,
        "sizes_bytes": {
            p.name: p.stat().st_size
            for p in (fp32_tflite, int8_tflite, fp32_onnx, int8_onnx)
            if p.is_file()
        },
        "fp32_tflite_vs_onnx_max_abs_diff": fp32_diff,
        "train_psnr_db": {"litert_fp32": round(train_fp32, 2), "litert_int8": round(train_int8, 2)},
        "int8_vs_fp32": vs_fp32,
        "holdout_psnr_brain_db": quality,
        "latency_batch1": latency,
    }
    spec.build("tflite.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(report, indent=2))
    record_timing("export_tflite", time.perf_counter() - start, spec.name)


if __name__ == "__main__":
    main()
