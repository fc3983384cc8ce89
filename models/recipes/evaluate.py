"""Evaluate fp32 and int8 ONNX models on the held-out slab: quality, latency, size.

Quality gates (the build fails otherwise): fp32 PSNR >= 28 dB in the brain region, and
int8 within 0.5 dB of fp32.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
from scipy import ndimage

from recipes import config
from recipes.metrics import mae, psnr, ssim
from recipes.normalise import robust_max_np
from recipes.runtime import THREADS, interleaved_latency_ms, make_session, predict
from recipes.timing import record_timing

MIN_FP32_PSNR_DB = 28.0
MAX_INT8_DROP_DB = 0.5
PREDICTIONS = config.BUILD_DIR / "holdout_predictions.npz"
RIM_PX = 3  # width of the brain's outer rim reported apart


def interior(region: np.ndarray) -> np.ndarray:
    """Brain region minus its outer RIM_PX pixels, per slice ([N, 1, H, W] masks)."""
    return np.stack([ndimage.binary_erosion(m, iterations=RIM_PX) for m in region[:, 0]])[:, None]


def holdout() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(normalised inputs, targets, brain-region masks, MNI z in mm) of the held-out slab."""
    data = np.load(config.DATA_NPZ)
    idx = data["holdout_idx"]
    x = np.stack([robust_max_np(s) for s in data["t1"][idx]])[:, None]
    return x, data["t2"][idx][:, None], data["region"][idx][:, None], data["z_mm"][idx]


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
        "data_range": rng,
    }


def file_size(path: Path) -> int:
    return path.stat().st_size


def main() -> None:
    start = time.perf_counter()
    x, y, region, z_mm = holdout()
    sessions = {"fp32": make_session(config.FP32_ONNX), "int8": make_session(config.INT8_ONNX)}
    preds = {name: predict(sess, x) for name, sess in sessions.items()}
    latency = interleaved_latency_ms(sessions, x[len(x) // 2, 0], runs=60)
    train_log = json.loads(config.TRAIN_LOG.read_text(encoding="utf-8"))
    quant = json.loads(config.QUANT_REPORT.read_text(encoding="utf-8"))
    fp32_range = float(preds["fp32"].max())

    report: dict[str, object] = {
        "holdout_slices": len(x),
        "holdout_z_mm": [float(z_mm[0]), float(z_mm[-1])],
        "gmac_per_slice": round(train_log["macs_256"] / 1e9, 3),
        "params": train_log["params"],
        "threads": THREADS,
        "int8_variant": quant["chosen"],
        "models": {
            name: quality(pred, y, region)
            | {
                "latency_ms": latency[name],
                "size_bytes": file_size(config.FP32_ONNX if name == "fp32" else config.INT8_ONNX),
            }
            for name, pred in preds.items()
        },
        "int8_vs_fp32": {
            "psnr_brain_db": round(psnr(preds["int8"], preds["fp32"], fp32_range, region), 2),
            "psnr_full_db": round(psnr(preds["int8"], preds["fp32"], fp32_range), 2),
        },
    }
    models: dict[str, dict[str, float]] = report["models"]  # type: ignore[assignment]
    fp32_psnr = models["fp32"]["psnr_brain_db"]
    drop = fp32_psnr - models["int8"]["psnr_brain_db"]
    report["gates"] = {
        "fp32_psnr_min_db": MIN_FP32_PSNR_DB,
        "int8_max_drop_db": MAX_INT8_DROP_DB,
        "int8_drop_db": round(drop, 2),
        "passed": bool(fp32_psnr >= MIN_FP32_PSNR_DB and drop <= MAX_INT8_DROP_DB),
    }
    config.EVAL_REPORT.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    np.savez_compressed(PREDICTIONS, fp32=preds["fp32"], int8=preds["int8"], target=y, input=x)
    print(json.dumps(report, indent=2))
    record_timing("evaluate", time.perf_counter() - start)
    if not report["gates"]["passed"]:  # type: ignore[index]
        raise SystemExit("quality gate failed (see build/eval.json)")


if __name__ == "__main__":
    main()
