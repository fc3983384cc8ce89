"""Assemble a model's bundle: golden.npz, bundle.json (with sha256 digests) and
MODEL_CARD.md. (The family's side-by-side table in models/README.md is ``recipes.compare``.)"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np

from agent.model.manifest import BundleManifest
from recipes import config
from recipes.context import model_inputs
from recipes.layer_card import layer_section
from recipes.metrics import psnr
from recipes.model_card import cpu_name, isa_line, render_model_card
from recipes.npz import save_npz
from recipes.record import restored_note, save_record
from recipes.runtime import make_session
from recipes.timing import load_timings, record_timing

GOLDEN_SLAB_POSITIONS = (2, 9, 15, 21)  # positions inside the held-out slab
GOLDEN_MARGIN_DB = 3.0


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def build_golden(spec: config.ModelSpec) -> dict[str, Any]:
    """Write golden.npz; return the int8-vs-fp32 PSNRs and the activation floor.

    Golden PSNR convention: full 256 x 256 slices, data range = max of reference_output
    over the golden set. The floor is the lowest of the pooled PSNR and every per-slice
    PSNR, minus 3 dB, rounded down, so an agent that checks either way passes."""
    data = np.load(config.DATA_NPZ)
    idx = data["holdout_idx"][list(GOLDEN_SLAB_POSITIONS)]
    x = model_inputs(data["t1"], idx, spec.context)
    fp32 = make_session(spec.bundle("model.fp32.onnx"))
    ref = fp32.run(["output"], {"input": x})[0].astype(np.float32)
    served = {"onnxruntime": make_session(spec.bundle("model.int8.onnx")).run(
        ["output"], {"input": x})[0]}
    int8_tflite = spec.bundle("model.int8.tflite")
    if int8_tflite.is_file():  # the floor must hold on every runtime the bundle serves
        from agent.backends import RunnerOptions, open_runner

        runner = open_runner("litert", str(int8_tflite), RunnerOptions(intra_op_threads=2))
        served["litert"] = runner.run(x)
        runner.close()
    got = served["onnxruntime"]
    rng = float(ref.max())
    pooled = psnr(got, ref, rng)
    per_slice = [psnr(g, r, rng) for g, r in zip(got, ref, strict=True)]
    worst = {rt: min([psnr(o, ref, rng)] + [psnr(g, r, rng) for g, r in zip(o, ref, strict=True)])
             for rt, o in served.items()}
    floor = math.floor(min(worst.values()) - GOLDEN_MARGIN_DB)
    save_npz(spec.bundle("golden.npz"), input=x, reference_output=ref)
    return {
        "int8_vs_fp32_psnr_db": round(pooled, 2),
        "int8_vs_fp32_psnr_slice_min_db": round(min(per_slice), 2),
        "min_psnr_db": float(floor),
        "int8_vs_fp32_psnr_db_by_runtime": {
            rt: round(psnr(o, ref, rng), 2) for rt, o in served.items()},
        # The guard's figure (worst of pooled and per slice) per runtime on this machine:
        # bundle.json's golden.recorded_psnr_db, so that a node whose int8 kernels give less
        # can say that this CPU differs, not the file (agent/model/guard_cause.py).
        "recorded_psnr_db": {rt: round(w, 2) for rt, w in worst.items()},
        "z_mm": [float(z) for z in data["z_mm"][idx]],
    }


def _file(path: Path) -> dict[str, str]:
    return {"path": path.name, "sha256": sha256(path)}


def bundle_json(spec: config.ModelSpec, golden: dict[str, Any], gmac: float) -> dict[str, object]:
    """bundle.json in the format of agent/model/manifest.py (docs/bundle.md); ``golden``
    is what ``build_golden`` returned."""
    from agent.cpu import read_cpu

    tflite = {name: spec.bundle(f"model.{name}.tflite") for name in ("int8", "fp32")}
    return {
        "format": 1,
        "name": spec.name,
        "version": spec.version,
        "task": spec.task,
        "precision": "int8",
        "input": {
            "modality": "MR",
            "shape": [config.GRID, config.GRID],
            "pixel_spacing_mm": [1.0, 1.0],
            "channels": 1,
            "context_slices": spec.context,
            **({"slice_spacing_mm": 1.0} if spec.context else {}),
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
            "onnxruntime": _file(spec.bundle("model.int8.onnx")),
            **({"litert": _file(tflite["int8"])} if tflite["int8"].is_file() else {}),
        },
        "reference": _file(spec.bundle("model.fp32.onnx")),
        **({"references": {"litert": _file(tflite["fp32"])}} if tflite["fp32"].is_file()
           else {}),
        "golden": _file(spec.bundle("golden.npz")) | {
            "min_psnr_db": golden["min_psnr_db"],
            "recorded_psnr_db": golden["recorded_psnr_db"],
            "recorded_cpu": read_cpu().label},
        # The domain reference (recipes.domain_reference) survives a rebuild of bundle.json.
        **({"domain": _file(spec.bundle("domain.json"))} if spec.bundle("domain.json").is_file()
           else {}),
        "compute": {"gmac": gmac},
        "model_card": "MODEL_CARD.md",
    }


def to_json(meta: dict[str, object]) -> str:
    """bundle.json's text, checked against and written by the agent's schema of it."""
    return BundleManifest.model_validate(meta).to_json()


def _domain_section(card: Path) -> str:
    """The card's "Domain-shift score" section (recipes.domain_eval), kept across a rebuild."""
    begin, end = "<!-- domain-shift:begin -->", "<!-- domain-shift:end -->"
    old = card.read_text(encoding="utf-8") if card.is_file() else ""
    if begin not in old or end not in old:
        return ""
    return "\n" + begin + old.split(begin, 1)[1].split(end, 1)[0] + end + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    config.add_model_argument(parser)
    spec = config.spec(parser.parse_args().model)
    start = time.perf_counter()
    golden = build_golden(spec)
    train = json.loads(spec.build("train.json").read_text(encoding="utf-8"))
    evaluation = json.loads(spec.build("eval.json").read_text(encoding="utf-8"))
    quant = json.loads(spec.build("quantize.json").read_text(encoding="utf-8"))
    meta = bundle_json(spec, golden, evaluation["gmac_per_slice"])
    record_timing("bundle", time.perf_counter() - start, spec.name)
    timings = load_timings(spec.name)
    # bundle.json first: the card's per-layer section profiles the bundle through the agent,
    # which refuses files whose digests do not match it.
    spec.bundle("bundle.json").write_text(to_json(meta), encoding="utf-8")
    card = spec.bundle("MODEL_CARD.md")
    text = render_model_card(spec, train, evaluation, quant, golden, timings,
                             restored_note(spec))
    text += layer_section(spec, f"{cpu_name()} ({isa_line()})")
    card.write_text(text + _domain_section(card), encoding="utf-8")
    save_record(spec)  # so that a clone can redo these steps without training
    total = sum(p.stat().st_size for p in spec.bundle_dir.iterdir() if p.is_file())
    print(f"bundle {spec.bundle_dir} ({total} bytes); golden: {golden}")


if __name__ == "__main__":
    main()
