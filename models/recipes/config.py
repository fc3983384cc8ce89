"""Constants shared by every step of the recipe: paths, data split, physics, seeds."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

MODELS_DIR = Path(__file__).resolve().parent.parent
BUILD_DIR = MODELS_DIR / "build"
BUNDLE_NAME = "t1w-to-t2w-lite"
BUNDLE_VERSION = "1.0.0"
BUNDLE_DIR = MODELS_DIR / BUNDLE_NAME
SAMPLES_DIR = MODELS_DIR.parent / "agent" / "samples"

DATA_NPZ = BUILD_DIR / "data.npz"
CHECKPOINT = BUILD_DIR / "model.pt"
TRAIN_LOG = BUILD_DIR / "train.json"
FP32_ONNX = BUNDLE_DIR / "model.fp32.onnx"
INT8_ONNX = BUNDLE_DIR / "model.int8.onnx"
QUANT_REPORT = BUILD_DIR / "quantize.json"
EVAL_REPORT = BUILD_DIR / "eval.json"
TIMINGS = BUILD_DIR / "timings.json"

SEED = 20240917

# Model grid: MNI axial slices (197 x 233 at 1 mm) zero-padded, centred, to 256 x 256.
GRID = 256

# Held-out slab: 24 contiguous mid-brain axial slices (template z indices 66..89, i.e.
# MNI z = -6 .. +17 mm) plus a 4-slice gap on each side that is used for nothing.
HOLDOUT_FIRST = 66
HOLDOUT_COUNT = 24
HOLDOUT_GAP = 4
# Slices with fewer brain voxels than this are left out of training and calibration.
MIN_BRAIN_PIXELS = 400

# Input normalisation; must equal bundle.json input.normalisation (the agent applies it).
NORM_PERCENTILE = 99.5
NORM_CLIP_MAX = 1.5
# The agent stores output * OUTPUT_SCALE as uint16.
OUTPUT_SCALE = 1000.0


@dataclass(frozen=True)
class Tissue:
    """Relaxation times (ms) and relative proton density of one tissue at 1.5 T."""

    t1_ms: float
    t2_ms: float
    pd: float


# BrainWeb (Kwan, Evans & Pike 1999; Collins et al. 1998) 1.5 T tissue parameters.
TISSUES: dict[str, Tissue] = {
    "csf": Tissue(t1_ms=2569.0, t2_ms=329.0, pd=1.00),
    "gm": Tissue(t1_ms=833.0, t2_ms=83.0, pd=0.86),
    "wm": Tissue(t1_ms=500.0, t2_ms=70.0, pd=0.77),
}
# Spin-echo T2-weighted protocol.
TR_MS = 4000.0
TE_MS = 95.0
