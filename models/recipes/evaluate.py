"""Evaluate a model's files on the held-out slab: quality, through-plane consistency,
latency and size, for every runtime x precision the bundle has (onnxruntime and, when the
LiteRT files exist and LiteRT is installed, LiteRT), through the agent's own runners.

Quality gates (the build fails otherwise): fp32 PSNR >= 28 dB in the brain region, and
int8 within 0.3 dB of fp32 on every runtime.

Through-plane consistency: a 2D model sees each slice alone, so its output can flicker from
slice to slice where the anatomy does not. The score is the mean absolute error, in the
brain, of the difference between adjacent output slices against the same difference of the
reference (``through_plane_mae``, target scale; lower is better), also given as a PSNR
(``through_plane_psnr_db``, same data range as the PSNR).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from recipes import config
from recipes.context import model_inputs
from recipes.metrics import mae, psnr, ssim
from recipes.runtime import run_batched, runner_times_ms
from recipes.timing import record_timing

sys.path.insert(0, str(config.MODELS_DIR.parent))  # the agent's runners
from agent.backends import ModelRunner, RunnerOptions, open_runner, runtime_installed

MIN_FP32_PSNR_DB = 28.0
MAX_INT8_DROP_DB = 0.3
RIM_PX = 3  # width of the brain's outer rim reported apart
THREADS = 2
LATENCY_RUNS = 60
LATENCY_WARMUP = 5
FILES = {  # (runtime, precision) -> bundle file
    ("onnxruntime", "fp32"): "model.fp32.onnx",
    ("onnxruntime", "int8"): "model.int8.onnx",
    ("litert", "fp32"): "model.fp32.tflite",
    ("litert", "int8"): "model.int8.tflite",
}


def interior(region: np.ndarray) -> np.ndarray:
    """Brain region minus its outer RIM_PX pixels, per slice ([N, 1, H, W] masks)."""
    return np.stack([ndimage.binary_erosion(m, iterations=RIM_PX) for m in region[:, 0]])[:, None]


def image_edge(centre: np.ndarray, region: np.ndarray) -> np.ndarray:
    """The last pixels of the (skull-stripped) input: non-zero, with a zero 4-neighbour,
    inside the brain region ([N, 1, H, W]). Most of the rim's error is there: the target's
    CSF goes on where the T1 template was cut off."""
    inside = centre > 0
    beyond = np.zeros_like(inside)
    for shift, axis in ((1, 2), (-1, 2), (1, 3), (-1, 3)):
        beyond |= ~np.roll(inside, shift, axis=axis)
    return inside & beyond & region


def error_bias(pred: np.ndarray, ref: np.ndarray, region: np.ndarray,
               centre: np.ndarray) -> dict[str, float]:
    """Mean signed error (prediction - target) in the interior and on the input's last
    pixels, and that edge's share of the squared error in the brain: a model that blurs
    where the input ends reads negative there (and positive just beyond)."""
    edge = image_edge(centre, region)
    err = pred.astype(np.float64) - ref
    return {
        "mean_error_interior": round(float(err[interior(region)].mean()), 4),
        "mean_error_edge": round(float(err[edge].mean()), 4),
        "edge_share_of_squared_error": round(float((err[edge] ** 2).sum()
                                                   / (err[region] ** 2).sum()), 3),
        "edge_share_of_pixels": round(float(edge.sum() / region.sum()), 3),
    }


def holdout(spec: config.ModelSpec) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(normalised inputs [N, C, H, W], targets, brain-region masks, MNI z in mm) of the
    held-out slab; a 2.5D model's neighbours of the slab's end slices come from the gap."""
    data = np.load(config.DATA_NPZ)
    idx = data["holdout_idx"]
    x = model_inputs(data["t1"], idx, spec.context)
    return x, data["t2"][idx][:, None], data["region"][idx][:, None], data["z_mm"][idx]


def through_plane(pred: np.ndarray, ref: np.ndarray, region: np.ndarray,
                  data_range: float) -> dict[str, float]:
    """Consistency of adjacent slices (see the module docstring); stacks [N, 1, H, W] of
    contiguous slices."""
    d_pred = np.diff(pred[:, 0].astype(np.float64), axis=0)
    d_ref = np.diff(ref[:, 0].astype(np.float64), axis=0)
    both = region[1:, 0] & region[:-1, 0]
    err = d_pred - d_ref
    return {
        "through_plane_mae": round(float(np.mean(np.abs(err[both]))), 5),
        "through_plane_psnr_db": round(psnr(d_pred[both], d_ref[both], data_range), 2),
    }


def quality(pred: np.ndarray, ref: np.ndarray, region: np.ndarray) -> dict[str, float]:
    """Metrics of a prediction stack against a reference stack (see recipes.metrics)."""
    rng = float(ref.max())
    per_slice = [psnr(p, r, rng, m) for p, r, m in zip(pred, ref, region, strict=True)]
    inner = interior(region)
    sq = (pred.astype(np.float64) - ref) ** 2
    return {
        "psnr_brain_db": round(psnr(pred, ref, rng, region), 2),
        "psnr_brain_slice_mean_db": round(float(np.mean(per_slice)), 2),
        "psnr_brain_slice_min_db": round(float(np.min(per_slice)), 2),
        "psnr_full_db": round(psnr(pred, ref, rng), 2),
        "ssim_brain": round(ssim(pred[:, 0], ref[:, 0], rng, region[:, 0]), 4),
        "ssim_full": round(ssim(pred[:, 0], ref[:, 0], rng), 4),
        "mae_brain": round(mae(pred, ref, region), 5),
        "psnr_interior_db": round(psnr(pred, ref, rng, inner), 2),
        "rim_share_of_squared_error": round(float(sq[region & ~inner].sum() / sq[region].sum()), 3),
        "rim_share_of_pixels": round(float((region & ~inner).sum() / region.sum()), 3),
        **through_plane(pred, ref, region, rng),
        "data_range": rng,
    }


def open_runners(spec: config.ModelSpec) -> dict[str, ModelRunner]:
    """Every (runtime, precision) whose file exists and whose runtime is installed, keyed
    ``<runtime>_<precision>``."""
    runners: dict[str, ModelRunner] = {}
    for (runtime, precision), file in FILES.items():
        path = spec.bundle(file)
        if path.is_file() and runtime_installed(runtime):
            runners[f"{runtime}_{precision}"] = open_runner(
                runtime, str(path), RunnerOptions(intra_op_threads=THREADS))
    return runners


def file_size(path: Path) -> int:
    return path.stat().st_size


def evaluate(spec: config.ModelSpec) -> dict[str, Any]:
    x, y, region, z_mm = holdout(spec)
    runners = open_runners(spec)
    preds = {name: run_batched(r, x) for name, r in runners.items()}
    times = runner_times_ms(runners, x[len(x) // 2 : len(x) // 2 + 1], LATENCY_RUNS,
                            LATENCY_WARMUP)
    latency = {name: round(statistics.median(t), 2) for name, t in times.items()}
    train_log = json.loads(spec.build("train.json").read_text(encoding="utf-8"))
    quant = json.loads(spec.build("quantize.json").read_text(encoding="utf-8"))
    package = next((getattr(r, "package", "") for r in runners.values() if r.runtime == "litert"),
                   "")
    for r in runners.values():
        r.close()
    ref = preds["onnxruntime_fp32"]
    centre = x[:, spec.context : spec.context + 1]
    fp32_range = float(ref.max())
    models: dict[str, dict[str, Any]] = {}
    for name, pred in preds.items():
        runtime, precision = name.rsplit("_", 1)
        models[name] = quality(pred, y, region) | error_bias(pred, y, region, centre) | {
            "runtime": runtime,
            "precision": precision,
            "latency_ms": latency[name],
            "size_bytes": file_size(spec.bundle(FILES[(runtime, precision)])),
            "vs_onnxruntime_fp32_psnr_brain_db": (
                None if name == "onnxruntime_fp32"
                else round(psnr(pred, ref, fp32_range, region), 2)),
        }
    gates: dict[str, Any] = {"fp32_psnr_min_db": MIN_FP32_PSNR_DB,
                             "int8_max_drop_db": MAX_INT8_DROP_DB, "int8_drop_db": {}}
    passed = models["onnxruntime_fp32"]["psnr_brain_db"] >= MIN_FP32_PSNR_DB
    for runtime in ("onnxruntime", "litert"):
        if f"{runtime}_int8" in models and f"{runtime}_fp32" in models:
            drop = (models[f"{runtime}_fp32"]["psnr_brain_db"]
                    - models[f"{runtime}_int8"]["psnr_brain_db"])
            gates["int8_drop_db"][runtime] = round(drop, 2)
            passed = passed and drop <= MAX_INT8_DROP_DB
    gates["passed"] = bool(passed)
    return {
        "model": spec.name,
        "context_slices": spec.context,
        "holdout_slices": len(x),
        "holdout_z_mm": [float(z_mm[0]), float(z_mm[-1])],
        "gmac_per_slice": round(train_log["macs_256"] / 1e9, 3),
        "params": train_log["params"],
        "threads": THREADS,
        "litert_package": package,
        "int8_variant": quant["chosen"],
        "models": models,
        "int8_vs_fp32": {  # onnxruntime, the default runtime (model card, golden floor)
            "psnr_brain_db": models["onnxruntime_int8"]["vs_onnxruntime_fp32_psnr_brain_db"],
            "psnr_full_db": round(psnr(preds["onnxruntime_int8"], ref, fp32_range), 2),
        },
        "gates": gates,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    config.add_model_argument(parser)
    spec = config.spec(parser.parse_args().model)
    start = time.perf_counter()
    report = evaluate(spec)
    spec.build("eval.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(report, indent=2))
    record_timing("evaluate", time.perf_counter() - start, spec.name)
    if not report["gates"]["passed"]:
        raise SystemExit(f"quality gate failed (see build/{spec.name}/eval.json)")


if __name__ == "__main__":
    main()
