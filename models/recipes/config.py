"""Constants shared by every step of the recipe: paths, data split, physics, seeds."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, replace
from pathlib import Path

MODELS_DIR = Path(__file__).resolve().parent.parent
BUILD_DIR = MODELS_DIR / "build"
SAMPLES_DIR = MODELS_DIR.parent / "agent" / "samples"
DATA_NPZ = BUILD_DIR / "data.npz"
TIMINGS = BUILD_DIR / "timings.json"


@dataclass(frozen=True)
class ModelSpec:
    """One model of the family: its architecture, training length and where its files go
    (``models/<name>/`` for the bundle, ``build/<name>/`` for intermediates)."""

    name: str
    version: str
    task: str
    widths: tuple[int, ...]  # U-Net channel widths per level
    context: int  # neighbouring slices each side in the input (0: 2D)
    steps: int  # training steps
    stem: int = 1  # space-to-depth factor of the input (1: none)
    refine: int = 0  # channels of a full-resolution refinement after the output (0: none)
    head: int = 1  # kernel size of the head conv (before depth-to-space with a stem)
    edge: bool = False  # the input's local contrast (x - its 3 x 3 minimum) as more channels
    mse_weight: float = 0.0  # weight of an MSE term added to the L1 + SSIM loss (0: none)
    # The LiteRT int8 file keeps its first and last conv in float (as onnxruntime's
    # u8s8_rr_fl does): all in int8, lite 1.1.0 lost 0.50 dB against fp32 on the held-out slab.
    litert_float_ends: bool = False
    # Quantization-aware fine-tuning after training (recipes/qat.py), in steps (0: none).
    qat_steps: int = 0

    @property
    def in_channels(self) -> int:
        return 2 * self.context + 1

    @property
    def bundle_dir(self) -> Path:
        return MODELS_DIR / self.name

    @property
    def build_dir(self) -> Path:
        return BUILD_DIR / self.name

    def build(self, file: str) -> Path:
        """An intermediate file of this model: ``build/<name>/<file>``."""
        return self.build_dir / file

    def bundle(self, file: str) -> Path:
        """A file of this model's bundle: ``models/<name>/<file>``."""
        return self.bundle_dir / file


# lite 1.2.x is the pilot lite-s2h32q (below, records/t1w-to-t2w-lite-s2h32q-pilot.json; the
# same seed and steps, so the same weights): a 2x space-to-depth stem, widths (32, 48, 64, 96)
# at 128 x 128 and below, a 3 x 3 head before depth-to-space, 0.99 GMAC, fine-tuned
# quantization-aware; its LiteRT int8 file keeps the first and the last conv in float. With
# the int8 files quantized from agent/quantize/nhwc.py's rewrite, its 32 channels at 128 x 128
# (a multiple of MLAS's 16-column AVX2 tile) put its int8 at 1.46x its fp32 on the AVX2
# kernels, where lite 1.1.0's 24 stayed at 1.33x (models/README.md).
# lite 1.2.1: the same weights; its onnxruntime int8 file is u8s8_rr_last (the head alone in
# float, recipes/quantize.py), quantized from the rewrite's 4-D stem and head: 1.51x.
# lite 1.2.2: the same weights; its onnxruntime int8 file is u8s8_pl_last (8-bit weights with
# limited pair sums, agent/quantize/pair_weights.py; the head in float): 0.06 dB under fp32
# on the training slices (1.2.1: 0.09), 30.36 dB held-out (30.25), at the same speed.
# lite 1.1.0: the pilot lite-s2h, widths (24, 48, 64, 96), 0.767 GMAC, 29.74 dB.
# lite 1.0.0: widths (12, 24, 48, 64) at 256 x 256 and below, 0.936 GMAC, 29.60 dB.
LITE = ModelSpec(
    name="t1w-to-t2w-lite",
    version="1.2.2",
    task="MR T1-weighted to T2-weighted synthesis (2D, axial)",
    widths=(32, 48, 64, 96),
    context=0,
    steps=3600,
    stem=2,
    head=3,
    litert_float_ends=True,
    qat_steps=800,
)
# full 1.1.0: 1.0.0's weights; its onnxruntime int8 file is u8s8_pl (every conv in int8 with
# 8-bit weights whose pair sums are limited, agent/quantize/pair_weights.py), where 1.0.0's
# u8s8_rr_outer kept the 256 x 256 level in float because 7-bit weights cost 2.6 dB there.
FULL = ModelSpec(
    name="t1w-to-t2w-full",
    version="1.1.0",
    task="MR T1-weighted to T2-weighted synthesis (2.5D: a slice and 2 neighbours each side, "
    "axial)",
    widths=(16, 32, 64, 128, 160),
    context=2,
    steps=4800,
)
# Pilots with a space-to-depth stem, so that no conv runs at 256 x 256 on a handful of
# channels (models/README.md, "int8 on CPUs without dot product"); not shipped. Trained on
# the build machine with the shipped recipe (records/*-pilot.json): on the held-out slab
# lite-s2d (first level at 128 x 128) gave 28.3 dB and lite-s4 (64 x 64) 24.9 dB, against
# lite's 29.6 and the 29.5 that issue 8 asks of it. make -C models pilot MODEL=NAME trains
# and measures one (recipes/pilot.py).
LITE_S2D = ModelSpec(
    name="t1w-to-t2w-lite-s2d",
    version="0.0.1",
    task=LITE.task,
    widths=(24, 48, 64, 96),
    context=0,
    steps=3600,
    stem=2,
)
LITE_S4 = ModelSpec(
    name="t1w-to-t2w-lite-s4",
    version="0.0.1",
    task=LITE.task,
    widths=(32, 64, 96, 128),
    context=0,
    steps=3600,
    stem=4,
)
# lite-s2d with a full-resolution refinement (two 3x3 convs, 8 channels, on the input and
# the depth-to-space output, added to it), for the rim that the stem loses: 28.9 dB on the
# held-out slab (lite-s2d 28.3), the rim's error stays (records/t1w-to-t2w-lite-s2r-pilot.json).
LITE_S2R = replace(LITE_S2D, name="t1w-to-t2w-lite-s2r", refine=8)
# lite-s2d trained with an MSE term in its loss (5 * MSE added to 0.7 * L1 + 0.3 * (1 - SSIM)):
# more than half of its squared error is on the brain's outer rim, where the T2 target is only
# partly predictable from the T1; L1 trains the conditional median there, MSE the mean,
# which is what a PSNR scores.
# Measured: 27.7 dB (lite-s2d 28.3), the rim's share of the error up from 50 to 57 %
# (records/t1w-to-t2w-lite-s2m-pilot.json).
LITE_S2M = replace(LITE_S2D, name="t1w-to-t2w-lite-s2m", mse_weight=5.0)
# lite-s2d with a 3 x 3 head before depth-to-space (a 1 x 1 head makes each 2 x 2 output
# block from that block's features alone); 14 M MACs more, inside the int8 graph. Measured:
# 29.74 dB (int8 29.75), worst slice 29.33 dB, interior 33.95 dB: above lite (29.60, 28.32,
# 31.96) at 0.767 GMAC (records/t1w-to-t2w-lite-s2h-pilot.json). Shipped as lite 1.1.0, its
# LiteRT int8 file with the first and last conv in float: all in int8 it lost 0.50 dB
# against fp32 on the slab (29.24 dB; the gate allows 0.3).
LITE_S2H = replace(LITE_S2D, name="t1w-to-t2w-lite-s2h", head=3)
# Each input pixel's local contrast, x - min(x over 3 x 3), beside x (``edge``): on the
# held-out slab lite-s2m lost most against lite on the last pixels before the skull-stripped
# T1 ends (bright CSF in the target: mean error -0.074 there, lite -0.025) and bled
# brightness into the zeros beyond them (+0.018, lite +0.002).
# Tried on the 4x stem, with lite-s2h's 3 x 3 head (16 pixels a block from one feature
# vector was lite-s4's worst case): 25.36 dB (lite-s4 24.88), mean error -0.185 on the
# input's last pixels: a 4x stem does not place the edge
# (records/t1w-to-t2w-lite-s4he-pilot.json).
LITE_S4HE = replace(LITE_S4, name="t1w-to-t2w-lite-s4he", head=3, edge=True)
# full with lite 1.1.0's stem and head: the 2.5D input (5 slices) through a 2x space-to-depth
# stem, five levels at 128 x 128 and below, a 3 x 3 head before depth-to-space; 1.59 GMAC.
# Measured: 25.86 dB on the held-out slab (full 1.0.0: 32.02), worst slice 20.38 dB, yet
# 31.99 dB on training slices; the same weights on the held-out slab in 128 x 128 tiles (the
# training crop) gave 29.73 dB. Its deepest level is 8 x 8 on a 256 x 256 slice, a receptive
# field of the whole brain: with 122 training slices of one template it learnt their global
# shape, which the held-out slices do not share (records/t1w-to-t2w-full-s2h-pilot.json).
FULL_S2H = replace(FULL, name="t1w-to-t2w-full-s2h", version="0.0.1",
                   widths=(32, 64, 96, 128, 160), stem=2, head=3)
# So four levels after the stem: full 1.0.0's levels at 128 x 128 and below (its deepest
# again at 16 x 16) with the 256 x 256 level left out; 1.75 GMAC (1.0.0: 2.22). Measured:
# 30.64 dB (int8 30.52), worst slice 29.34 dB, under full 1.0.0's 32.02 and only 0.9 dB over
# lite 1.1.0; its 7-bit-weight int8 (u8s8_rr) ran 1.63x faster than its fp32 on the AVX2
# kernels (11.77 against 19.16 ms) but lost 0.48 dB on the training slices, so the recipe
# chose u8u8_fl (17.83 ms); on the held-out slab u8s8_rr is 0.77 dB under fp32 (29.87 dB)
# (records/t1w-to-t2w-full-s2h4-pilot.json).
FULL_S2H4 = replace(FULL, name="t1w-to-t2w-full-s2h4", version="0.0.1",
                    widths=(32, 64, 128, 160), stem=2, head=3)
# lite 1.1.0 with 32 channels at 128 x 128 (24 before): onnxruntime's AVX2 u8s8 kernels
# run a 3 x 3 conv of 24 channels at 1.15-1.3x their fp32 speed, and one of 32 channels (a
# multiple of their 16-column tile) at 1.55-1.6x (single-layer A/B, 2 threads), so the
# wider first level costs int8 little and fp32 much; 0.99 GMAC.
# Measured: 30.36 dB fp32 (lite 1.1.0: 29.74), but its 7-bit weights lost 0.86 dB on the
# training slices all in int8 (u8s8_rr) and 0.38 with the ends in float, so the recipe chose
# u8u8 (10.53 ms against fp32's 10.93 on the AVX2 kernels)
# (records/t1w-to-t2w-lite-s2h32-pilot.json).
LITE_S2H32 = replace(LITE_S2H, name="t1w-to-t2w-lite-s2h32", widths=(32, 48, 64, 96),
                     litert_float_ends=True)
# lite-s2h32 fine-tuned quantization-aware (recipes/qat.py, 800 steps, 7- and 8-bit weight
# grids on alternate steps): 30.41 dB fp32, onnxruntime int8 30.39 (u8s8_rr_fl; all in int8,
# u8s8_rr, 0.13 dB under fp32 on the training slices), LiteRT int8 30.18. Not shipped then: on
# the AVX2 kernels its best int8 took 7.81 ms against lite 1.1.0's 6.76 (2 threads), 1.34x its
# best fp32 (lite 1.1.0: 1.31x); on one thread 1.55x (1.44x)
# (records/t1w-to-t2w-lite-s2h32q-pilot.json). Shipped as lite 1.2.0 (stop 35) once the int8
# files came from the NHWC rewrite (agent/quantize/nhwc.py): 1.46x its best fp32 there.
LITE_S2H32Q = replace(LITE_S2H32, name="t1w-to-t2w-lite-s2h32q", qat_steps=800)
# lite 1.1.0's weights fine-tuned the same way (its checkpoint rebuilt from model.fp32.onnx,
# whose initializers carry the state_dict's names): fp32 29.75 dB, every conv in int8 on
# onnxruntime (u8s8_rr_outer, the recipe's pick) 29.63 dB, LiteRT int8 29.63 (lite 1.1.0:
# 29.75 and 29.47). Not shipped: 5-6 % more int8 throughput on the AVX2 kernels for 0.12 dB
# less on onnxruntime (records/t1w-to-t2w-lite-q-pilot.json).
LITE_Q = replace(LITE_S2H, name="t1w-to-t2w-lite-q", version="0.0.1", qat_steps=800,
                 litert_float_ends=True)
# full 1.0.0's weights fine-tuned quantization-aware (recipes/qat.py, 800 steps, 13 min on
# 2 cores; the checkpoint rebuilt from model.fp32.onnx): post-training, its 7-bit weights on
# the 256 x 256 level cost 2.6 dB on the training slices, so 23 % of its MACs stay in float.
# Measured (training slices / held-out slab, against fp32's 33.61 / 32.00): everything in
# int8 (u8s8_rr) -0.43 / -0.48 dB, nearly all of it the head's 7-bit weights (head alone in
# float -0.24 / -0.07; ends in float, u8s8_rr_fl, -0.20 / -0.05), so the 0.1 dB rule still
# chose u8s8_rr_outer (-0.03 / -0.01), no faster than full 1.0.0's. Not shipped. Two other
# schedules, tried once each and not kept: the 7-bit grid on every step made the float
# weights worse than their int8 rounding (fp32 30.86 dB on the training slices, u8s8_rr
# 33.61, 8-bit files 29.75), and the first and last conv left unrounded (for a file that
# keeps them in float) lost more: u8s8_rr_fl -0.29 / -0.14, fp32 31.74 held-out
# (records/t1w-to-t2w-full-q-pilot.json).
FULL_Q = replace(FULL, name="t1w-to-t2w-full-q", version="0.0.1", qat_steps=800)
MODELS = {m.name: m for m in (LITE, FULL, LITE_S2D, LITE_S4, LITE_S2R, LITE_S2M, LITE_S2H,
                              LITE_S4HE, FULL_S2H, FULL_S2H4, LITE_S2H32, LITE_S2H32Q, LITE_Q,
                              FULL_Q)}
# The bundles committed under models/ (what `make -C models check` verifies).
SHIPPED = {m.name: m for m in (LITE, FULL)}


def spec(name: str) -> ModelSpec:
    """The model called ``name`` (SystemExit naming the known ones otherwise)."""
    try:
        return MODELS[name]
    except KeyError:
        raise SystemExit(f"unknown model {name!r}; known: {', '.join(MODELS)}") from None


def add_model_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=LITE.name, choices=sorted(MODELS),
                        help="which model of the family (default: %(default)s)")


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
