"""Text of MODEL_CARD.md and of the measured table in models/README.md, from the JSON
reports of the recipe steps."""

from __future__ import annotations

import platform
from typing import Any

import onnxruntime as ort
import torch

from recipes import config
from recipes.evaluate import RIM_PX
from recipes.notice import MNI_COPYRIGHT, REFERENCES, SIMULATED_T2, TEMPLATE_SOURCE
from recipes.simulate import tissue_signals_relative_to_csf

Json = dict[str, Any]


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def isa_line() -> str:
    """The SIMD features that decide which int8 kernels onnxruntime uses."""
    flags = cpu_flags()
    if "avx512_vnni" in flags:
        return "AVX-512 with VNNI"
    if "avx_vnni" in flags:
        return "AVX2 with AVX-VNNI"
    if "avx2" in flags:
        return "AVX2 without VNNI"
    return "no AVX2"


def machine_line() -> str:
    return (
        f"{cpu_name()} ({isa_line()}), onnxruntime {ort.__version__} CPU execution provider, "
        "2 intra-op threads, session.intra_op.allow_spinning=0, batch 1, median of 60 runs "
        "(fp32 and int8 sessions alternating)"
    )


def quality_table(ev: Json) -> str:
    rows = [
        "| precision | file | size | latency / slice | PSNR brain | PSNR full slice "
        "| SSIM brain | MAE brain |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, file in (("fp32", config.FP32_ONNX.name), ("int8", config.INT8_ONNX.name)):
        m = ev["models"][name]
        label = name if name == "fp32" else f"int8 ({ev['int8_variant']})"
        rows.append(
            f"| {label} | `{file}` | {m['size_bytes'] / 1024:.0f} KiB | {m['latency_ms']:.1f} ms "
            f"| {m['psnr_brain_db']:.2f} dB | {m['psnr_full_db']:.2f} dB "
            f"| {m['ssim_brain']:.4f} | {m['mae_brain']:.4f} |"
        )
    return "\n".join(rows)


def render_readme_table(ev: Json, timings: dict[str, float]) -> str:
    """Table for models/README.md."""
    rows = [
        "| model | precision | runtime | GMAC / slice | size | latency / slice "
        "| PSNR brain | SSIM brain | MAE brain |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name in ("fp32", "int8"):
        m = ev["models"][name]
        label = name if name == "fp32" else f"int8 QDQ {ev['int8_variant']}"
        rows.append(
            f"| {config.BUNDLE_NAME} | {label} | onnxruntime {ort.__version__} CPU, 2 threads "
            f"| {ev['gmac_per_slice']:.2f} | {m['size_bytes'] / 1024:.0f} KiB "
            f"| {m['latency_ms']:.1f} ms | {m['psnr_brain_db']:.2f} dB | {m['ssim_brain']:.4f} "
            f"| {m['mae_brain']:.4f} |"
        )
    total = sum(timings.values())
    steps = ", ".join(f"{k} {v:.0f} s" for k, v in timings.items())
    return (
        "\n".join(rows) + f"\n\nHeld-out slab: {ev['holdout_slices']} axial slices, MNI z "
        f"{ev['holdout_z_mm'][0]:+.0f} to {ev['holdout_z_mm'][1]:+.0f} mm. int8 vs fp32 output: "
        f"{ev['int8_vs_fp32']['psnr_brain_db']:.2f} dB PSNR (brain). Machine: {machine_line()}.\n\n"
        f"Last full build: {total / 60:.1f} min wall on 2 cores ({steps})."
    )


def tissue_table() -> str:
    signals = tissue_signals_relative_to_csf()
    rows = ["| tissue | T1 (ms) | T2 (ms) | PD | signal (CSF = 1) |", "|---|---|---|---|---|"]
    for name, t in config.TISSUES.items():
        rows.append(
            f"| {name.upper()} | {t.t1_ms:.0f} | {t.t2_ms:.0f} | {t.pd:.2f} | {signals[name]:.3f} |"
        )
    return "\n".join(rows)


def augmentation_text(a: Json) -> str:
    """One sentence per augmentation family, from the AugmentConfig in train.json."""
    turns = "random 90-degree turns and flips" if a["turns"] else "random flips of both axes"
    lo, hi = a["scale_range"]
    ilo, ihi = a["intensity_range"]
    return (
        f"{turns}; rotation within +-{a['max_rotation_deg']:g} degrees and scaling "
        f"{lo:g}-{hi:g} on {a['p_affine'] * 100:.0f} % of samples (input and target alike, "
        "bilinear); on the T1 only, before normalisation: global intensity scaling "
        f"{ilo:g}-{ihi:g}, a smooth multiplicative bias field (quadratic, up to "
        f"+-{a['bias_strength'] * 100:.0f} %) on {a['p_bias'] * 100:.0f} % of samples, Rician "
        f"noise up to {a['max_noise'] * 100:g} % of the slice maximum on "
        f"{a['p_noise'] * 100:.0f} % of samples."
    )


def summary_table(train: Json, ev: Json) -> str:
    widths = tuple(train["widths"])
    norm = (
        f"`robust_max`: slice / percentile(slice[slice > 0], {config.NORM_PERCENTILE}), "
        f"clipped to [0, {config.NORM_CLIP_MAX}]; an all-zero slice stays zero"
    )
    rows = [
        (
            "architecture",
            f"U-Net, {len(widths)} levels, widths {widths}; Conv 3x3 + ReLU, MaxPool, "
            "1x1 conv + nearest Resize x2 upsampling (no ConvTranspose), skip Concat, "
            "1x1 head + ReLU",
        ),
        ("parameters", f"{train['params']:,}"),
        ("compute", f"{ev['gmac_per_slice']:.3f} GMAC per 256 x 256 slice (Conv MACs)"),
        ("input", "`input`, float32 [N, 1, 256, 256], N dynamic"),
        (
            "output",
            "`output`, float32 [N, 1, 256, 256], >= 0; the agent stores "
            f"`output * {config.OUTPUT_SCALE:.0f}` as uint16",
        ),
        ("normalisation", norm),
        (
            "files",
            f"`model.int8.onnx` (served, int8 QDQ {ev['int8_variant']}), "
            "`model.fp32.onnx` (reference); ONNX opset 17",
        ),
    ]
    return "\n".join(["| | |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows)])


def render_model_card(
    train: Json, ev: Json, quant: Json, golden: Json, timings: dict[str, float]
) -> str:
    """MODEL_CARD.md of the bundle."""
    variants = "\n".join(
        f"| {name} | {v['train_psnr_db']:.2f} dB | {v['latency_ms']:.1f} ms "
        f"| {v['kernel_vs_qdq_reference_db']:.1f} dB | {'yes' if v['saturation_safe'] else 'no'} |"
        for name, v in quant["variants"].items()
    )
    gates = ev["gates"]
    history = train["history"]
    golden_z = ", ".join(f"{z:+.0f}" for z in golden["z_mm"])
    fp32, int8 = ev["models"]["fp32"], ev["models"]["int8"]
    z0, z1 = ev["holdout_z_mm"]
    verdict = "passed" if gates["passed"] else "FAILED"
    build_min = sum(timings.values()) / 60
    rim_px = RIM_PX
    return f"""# {config.BUNDLE_NAME} {config.BUNDLE_VERSION} — model card

**NOT FOR DIAGNOSTIC USE.** A reference/demo model for the IoMT edge inference agent. It
was trained on one SIMULATED image pair derived from an atlas template, not on patient
scans; its output is a synthetic image and must never inform a clinical decision.

## What it does

Translates one axial T1-weighted MR slice (256 x 256 at 1 mm) into a synthetic
T2-weighted slice on a fixed intensity scale (CSF = 1.0).

{summary_table(train, ev)}

## Training data

Source: {TEMPLATE_SOURCE}

{SIMULATED_T2}

- Input: the real MNI152 T1 template, axial slices.
- Target: a SIMULATED T2-weighted partner of the same slices, not an acquired MR image.
- Simulation (BrainWeb style): spin echo, `S = PD * (1 - exp(-TR/T1)) * exp(-TE/T2)`,
  TR = {config.TR_MS:.0f} ms, TE = {config.TE_MS:.0f} ms, 1.5 T tissue parameters of BrainWeb
  (Kwan et al. 1999; Collins et al. 1998). Each voxel mixes the pure-tissue signals by the
  tissue probabilities; CSF probability = brain mask - GM - WM, clipped at 0 (brain mask:
  nilearn's `load_mni152_brain_mask`, T1 template > 0.2). The result is divided by the pure
  CSF signal (one global constant), so CSF = 1.0.

{tissue_table()}

- Grid: 197 x 233 axial slices zero-padded (centred) to 256 x 256, 1 mm; rows along MNI x,
  columns along MNI y.
- Split: held-out slab of {ev["holdout_slices"]} contiguous slices (MNI z {z0:+.0f} to
  {z1:+.0f} mm) plus a {config.HOLDOUT_GAP}-slice gap on each side, used for neither training
  nor calibration. Training: the other {train["train_slices"]} axial slices with at least
  {config.MIN_BRAIN_PIXELS} brain pixels.
- Augmentation (on the fly): {augmentation_text(train["augment"])}

## Training

Loss {train["loss"]} on random {train["crop"]} x {train["crop"]} crops centred near brain
pixels (the network is fully convolutional), batch {train["batch"]}, {train["steps"]} steps,
{train["optimizer"]}, peak learning rate {train["lr"]}; seed {config.SEED};
PyTorch {torch.__version__} CPU, {train["threads"]} threads, {train["wall_s"] / 60:.1f} min wall.
Final training loss (mean of the last 200 steps): {history[-1]["loss"]:.4f}.

## Quantization

onnxruntime static quantization, QDQ format, per-channel int8 weights, activations
calibrated with MinMax on {quant["calibration_slices"]} evenly spaced training slices (after
`quant_pre_process`). Variants (activations/weights):

- `s8s8`, `u8s8`: 8-bit weights. onnxruntime runs both on u8s8 kernels on x86 (it shifts s8
  activations to u8; the two gave identical outputs here), and on CPUs without VNNI (AVX2,
  AVX-512F) those can saturate their 16-bit intermediate sums.
- `u8s8_rr`: `reduce_range` (7-bit weights), which cannot saturate.
- `u8s8_rr_fl`: `u8s8_rr` with the first and the last conv left in float (about 1 % of the
  MACs; the first conv, with one input channel, is where 7-bit weights cost accuracy).

Rule: variants within {quant["selection_drop_db"]} dB of fp32 on the training slices qualify (a
fifth of the 0.5 dB gate: the drop on the held-out slab ran about three times the drop on
the training slices); a saturation-safe one is preferred, since edge nodes may lack the VNNI
this build machine ({isa_line()}) has, and no measurement here would show saturation; then
the fastest. fp32 on the training slices: {quant["fp32_train_psnr_db"]:.2f} dB,
{quant["fp32_latency_ms"]:.1f} ms. "Kernels vs QDQ": the output of onnxruntime's integer
kernels against the same model run with graph optimisations off (dequantize -> float op ->
quantize), on this machine.

| variant | PSNR brain (training slices) | latency / slice | kernels vs QDQ | saturation-safe |
|---|---|---|---|---|
{variants}

Chosen: **{quant["chosen"]}**.

## Measured quality and speed (held-out slab)

{quality_table(ev)}

- int8 vs fp32 outputs: {ev["int8_vs_fp32"]["psnr_brain_db"]:.2f} dB PSNR in the brain,
  {ev["int8_vs_fp32"]["psnr_full_db"]:.2f} dB on the full slice.
- Where the error is: the outer {rim_px}-pixel rim of the brain holds
  {fp32["rim_share_of_pixels"] * 100:.0f} % of the brain pixels but
  {fp32["rim_share_of_squared_error"] * 100:.0f} % of the fp32 squared error. There the
  skull-stripped T1 template ends abruptly while the tissue maps (and so the simulated CSF
  rim) do not follow it, so the target is only partly predictable from the T1. Inside the
  rim: fp32 {fp32["psnr_interior_db"]:.2f} dB, int8 {int8["psnr_interior_db"]:.2f} dB.
- Per-slice PSNR (brain), fp32: mean {fp32["psnr_brain_slice_mean_db"]:.2f} dB, min
  {fp32["psnr_brain_slice_min_db"]:.2f} dB; int8: mean {int8["psnr_brain_slice_mean_db"]:.2f} dB,
  min {int8["psnr_brain_slice_min_db"]:.2f} dB.
- Gates: fp32 PSNR brain >= {gates["fp32_psnr_min_db"]:.0f} dB and int8 within
  {gates["int8_max_drop_db"]} dB of fp32 (drop: {gates["int8_drop_db"]:.2f} dB): {verdict}.
- Latency: {machine_line()}.

Definitions: the T2 target is compared on its own scale (CSF = 1.0). PSNR uses data range
L = max of the reference over the slab ({fp32["data_range"]:.3f}) and MSE pooled
over all slab pixels of the region. "Brain" = pixels where the T1 input or the T2 reference is
non-zero (the template is skull-stripped, so this is everything but the background); "full
slice" = all 256 x 256 pixels, background included. SSIM: Gaussian window 11 x 11, sigma 1.5,
K1 = 0.01, K2 = 0.03, same L, map averaged over the region. MAE on the target scale
(x 1000 for stored units).

## Golden set (activation gate)

`golden.npz`: `input` float32 [4, 1, 256, 256], already-normalised held-out slices (MNI z
{golden_z} mm); `reference_output` float32 [4, 1, 256, 256], the fp32 model's outputs.
int8 vs fp32 PSNR on it: {golden["int8_vs_fp32_psnr_db"]:.2f} dB pooled, lowest slice
{golden["int8_vs_fp32_psnr_slice_min_db"]:.2f} dB (full slices, data range = max of
`reference_output` over the set). `min_psnr_db` = {golden["min_psnr_db"]:.0f} (the lower of these
minus 3 dB, rounded down).

## Limitations

- One subject-like image: the template is an average of 152 brains, smooth and
  skull-stripped. Real T1 scans (skull, noise, other contrast, other field strengths,
  pathology) are outside the training distribution; expect implausible output on them.
- The target is simulated from three tissue classes: no vessels, flow voids, lesions,
  susceptibility or scanner effects.
- The held-out slab comes from the same template volume as the training slices, so the
  measured quality is optimistic for any other input.
- 2D, axial only, 1 mm grid; the agent must resample other grids to 256 x 256 at 1 mm.

## Licence and notices

The model was derived from the MNI ICBM152 template, distributed under this notice:

{MNI_COPYRIGHT}

References:

{REFERENCES}

## Rebuild

`make -C models` (recipe in `models/recipes/`); last build {build_min:.1f} min wall on 2 CPU
cores.
"""
