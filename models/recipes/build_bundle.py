"""Assemble the bundle: golden.npz, bundle.json (with sha256 digests), MODEL_CARD.md, and
the measured-numbers block of models/README.md."""

from __future__ import annotations

import hashlib
import json
import math
import re
import time
from pathlib import Path
from typing import Any

import numpy as np

from recipes import config
from recipes.export_tflite import INT8_TFLITE
from recipes.metrics import psnr
from recipes.model_card import render_model_card, render_readme_table
from recipes.normalise import robust_max_np
from recipes.npz import save_npz
from recipes.runtime import make_session
from recipes.timing import load_timings, record_timing

GOLDEN_NPZ = config.BUNDLE_DIR / "golden.npz"
BUNDLE_JSON = config.BUNDLE_DIR / "bundle.json"
MODEL_CARD = config.BUNDLE_DIR / "MODEL_CARD.md"
README = config.MODELS_DIR / "README.md"
GOLDEN_SLAB_POSITIONS = (2, 9, 15, 21)  # positions inside the held-out slab
GOLDEN_MARGIN_DB = 3.0
README_BEGIN = "<!-- measured:begin -->"
README_END = "<!-- measured:end -->"


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def build_golden() -> dict[str, Any]:
    """Write golden.npz; return the int8-vs-fp32 PSNRs and the activation floor.

    Golden PSNR convention: full 256 x 256 slices, data range = max of reference_output
    over the golden set. The floor is the lowest of the pooled PSNR and every per-slice
    PSNR, minus 3 dB, rounded down, so an agent that checks either way passes."""
    data = np.load(config.DATA_NPZ)
    idx = data["holdout_idx"][list(GOLDEN_SLAB_POSITIONS)]
    x = np.stack([robust_max_np(s) for s in data["t1"][idx]])[:, None].astype(np.float32)
    ref = make_session(config.FP32_ONNX).run(["output"], {"input": x})[0].astype(np.float32)
    served = {"onnxruntime": make_session(config.INT8_ONNX).run(["output"], {"input": x})[0]}
    if INT8_TFLITE.is_file():  # the floor must hold on every runtime the bundle serves
        from agent.backends import RunnerOptions, open_runner

        runner = open_runner("litert", str(INT8_TFLITE), RunnerOptions(intra_op_threads=2))
        served["litert"] = runner.run(x)
        runner.close()
    got = served["onnxruntime"]
    rng = float(ref.max())
    pooled = psnr(got, ref, rng)
    per_slice = [psnr(g, r, rng) for g, r in zip(got, ref, strict=True)]
    every = [psnr(o, ref, rng) for o in served.values()] + [
        psnr(g, r, rng) for o in served.values() for g, r in zip(o, ref, strict=True)]
    floor = math.floor(min(every) - GOLDEN_MARGIN_DB)
    save_npz(GOLDEN_NPZ, input=x, reference_output=ref)
    return {
        "int8_vs_fp32_psnr_db": round(pooled, 2),
        "int8_vs_fp32_psnr_slice_min_db": round(min(per_slice), 2),
        "min_psnr_db": float(floor),
        "int8_vs_fp32_psnr_db_by_runtime": {
            rt: round(psnr(o, ref, rng), 2) for rt, o in served.items()},
        "z_mm": [float(z) for z in data["z_mm"][idx]],
    }


def bundle_json(min_psnr_db: float) -> dict[str, object]:
    """bundle.json in the format of agent/bundle.py (format 1)."""
    return {
        "format": 1,
        "name": config.BUNDLE_NAME,
        "version": config.BUNDLE_VERSION,
        "task": "MR T1-weighted to T2-weighted synthesis (2D, axial)",
        "precision": "int8",
        "input": {
            "modality": "MR",
            "shape": [config.GRID, config.GRID],
            "pixel_spacing_mm": [1.0, 1.0],
            "channels": 1,
            "context_slices": 0,
            "series_description_pattern": "t1",
            "photometric_interpretations": ["MONOCHROME2"],
            "bits_allocated": [8, 16],
            "normalisation": {
                "method": "robust_max",
                "percentile": config.NORM_PERCENTILE,
                "clip_max": config.NORM_CLIP_MAX,
            },
            "tensor_name": "input",
        },
        "output": {
            "modality": "MR",
            "scale": config.OUTPUT_SCALE,
            "rescale_slope": 1.0,
            "rescale_intercept": 0.0,
            "units": "arbitrary",
            "series_description": "SYNTHETIC T2w from T1w - NOT FOR DIAGNOSTIC USE",
            "tensor_name": "output",
        },
        "backends": {
            "onnxruntime": {"path": config.INT8_ONNX.name, "sha256": sha256(config.INT8_ONNX)},
            **({"litert": {"path": INT8_TFLITE.name, "sha256": sha256(INT8_TFLITE)}}
               if INT8_TFLITE.is_file() else {}),
        },
        "reference": {"path": config.FP32_ONNX.name, "sha256": sha256(config.FP32_ONNX)},
        "golden": {
            "path": GOLDEN_NPZ.name,
            "sha256": sha256(GOLDEN_NPZ),
            "min_psnr_db": min_psnr_db,
        },
        "model_card": MODEL_CARD.name,
    }


def to_json(meta: dict[str, object]) -> str:
    """Indented JSON with short lists of numbers/strings kept on one line."""
    text = json.dumps(meta, indent=2)

    def one_line(m: re.Match[str]) -> str:
        return "[" + ", ".join(item.strip() for item in m.group(1).split(",")) + "]"

    return re.sub(r"\[\s+([^\[\]{}]*?)\s+\]", one_line, text) + "\n"


def update_readme(table: str) -> None:
    """Replace the block between the README markers with the measured table."""
    text = README.read_text(encoding="utf-8")
    pattern = re.compile(re.escape(README_BEGIN) + r".*?" + re.escape(README_END), re.S)
    if not pattern.search(text):
        raise SystemExit(f"{README} lacks the {README_BEGIN} ... {README_END} block")
    block = f"{README_BEGIN}\n{table}\n{README_END}"
    README.write_text(pattern.sub(lambda _m: block, text), encoding="utf-8")


def main() -> None:
    start = time.perf_counter()
    golden = build_golden()
    meta = bundle_json(golden["min_psnr_db"])
    train = json.loads(config.TRAIN_LOG.read_text(encoding="utf-8"))
    evaluation = json.loads(config.EVAL_REPORT.read_text(encoding="utf-8"))
    quant = json.loads(config.QUANT_REPORT.read_text(encoding="utf-8"))
    record_timing("bundle", time.perf_counter() - start)
    timings = load_timings()
    MODEL_CARD.write_text(
        render_model_card(train, evaluation, quant, golden, timings), encoding="utf-8"
    )
    BUNDLE_JSON.write_text(to_json(meta), encoding="utf-8")
    update_readme(render_readme_table(evaluation, timings))
    total = sum(p.stat().st_size for p in config.BUNDLE_DIR.iterdir() if p.is_file())
    print(f"bundle {config.BUNDLE_DIR} ({total} bytes); golden: {golden}")


if __name__ == "__main__":
    main()
