"""Text of MODEL_CARD.md and of the measured table in models/README.md, from the JSON
reports of the recipe steps."""

from __future__ import annotations

import platform
from typing import Any

import onnxruntime as ort
import torch

from recipes import config
from recipes.evaluate import FILES, RIM_PX
from recipes.notice import MNI_COPYRIGHT, REFERENCES, SIMULATED_T2, TEMPLATE_SOURCE
from recipes.quant_notes import avx2_ms, saturation_note, timing_note
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
        f"{cpu_name()} ({isa_line()}), onnxruntime {ort.__version__} CPU execution provider "
        "(session.intra_op.allow_spinning=0) and LiteRT with XNNPACK, through the agent's "
        "runners, 2 threads, batch 1, median of 60 runs (every runtime x precision taking "
        "turns)"
    )


RUNTIME_LABELS = {"onnxruntime": "onnxruntime", "litert": "LiteRT (XNNPACK)"}


def precision_label(ev: Json, name: str) -> str:
    m = ev["models"][name]
    if m["precision"] == "fp32":
        return "fp32"
    return f"int8 QDQ {ev['int8_variant']}" if m["runtime"] == "onnxruntime" else "int8"


def quality_table(ev: Json) -> str:
    rows = [
        "| runtime | precision | file | size | latency / slice | PSNR brain | PSNR full slice "
        "| SSIM brain | MAE brain | through-plane MAE |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, m in ev["models"].items():
        rows.append(
            f"| {RUNTIME_LABELS[m['runtime']]} | {precision_label(ev, name)} "
            f"| `{FILES[(m['runtime'], m['precision'])]}` | {m['size_bytes'] / 1024:.0f} KiB "
            f"| {m['latency_ms']:.1f} ms | {m['psnr_brain_db']:.2f} dB "
            f"| {m['psnr_full_db']:.2f} dB "
            f"| {m['ssim_brain']:.4f} | {m['mae_brain']:.4f} | {m['through_plane_mae']:.4f} |"
        )
    return "\n".join(rows)


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


def summary_table(spec: config.ModelSpec, train: Json, ev: Json) -> str:
    widths = tuple(train["widths"])
    c = spec.in_channels
    if spec.context:
        norm = (
            "`robust_max` on the stack: every slice / percentile(centre[centre > 0], "
            f"{config.NORM_PERCENTILE}), clipped to [0, {config.NORM_CLIP_MAX}]; an all-zero "
            "centre gives zeros"
        )
        inp = (f"`input`, float32 [N, {c}, 256, 256], N dynamic: the slice and its "
               f"{spec.context} neighbours on each side along the slice normal, in slice order "
               f"(channel {spec.context} is the slice itself)")
    else:
        norm = (
            f"`robust_max`: slice / percentile(slice[slice > 0], {config.NORM_PERCENTILE}), "
            f"clipped to [0, {config.NORM_CLIP_MAX}]; an all-zero slice stays zero"
        )
        inp = "`input`, float32 [N, 1, 256, 256], N dynamic"
    files = (f"`model.int8.onnx` (served by onnxruntime, int8 QDQ {ev['int8_variant']}), "
             "`model.fp32.onnx` (reference); ONNX opset 17")
    if any(m["runtime"] == "litert" for m in ev["models"].values()):
        tflite = ("int8, its first and last conv in float" if spec.litert_float_ends
                  else "full-integer int8")
        files += (f"; `model.int8.tflite` (served by LiteRT, {tflite}), "
                  "`model.fp32.tflite`")
    stem = (f"{spec.stem}x space-to-depth stem (the levels at 1/{spec.stem} resolution and "
            "below), " if spec.stem > 1 else "")
    head = f"{spec.head}x{spec.head} head" + (
        f" + depth-to-space x{spec.stem}" if spec.stem > 1 else "")
    rows = [
        (
            "architecture",
            f"U-Net, {len(widths)} levels, widths {widths}; {stem}Conv 3x3 + ReLU, MaxPool, "
            "1x1 conv + nearest Resize x2 upsampling (no ConvTranspose), skip Concat, "
            f"{head} + ReLU",
        ),
        ("parameters", f"{train['params']:,}"),
        ("compute", f"{ev['gmac_per_slice']:.3f} GMAC per 256 x 256 slice (Conv MACs)"),
        ("input", inp),
        (
            "output",
            "`output`, float32 [N, 1, 256, 256], >= 0; the agent stores "
            f"`output * {config.OUTPUT_SCALE:.0f}` as uint16",
        ),
        ("normalisation", norm),
        ("files", files),
    ]
    return "\n".join(["| | |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows)])


# How a model's design was arrived at, for its card. Kept here rather than in config.py,
# which the Makefile treats as a training input.
DESIGN_NOTES = {
    config.FULL.name: (
        "How this design was chosen: two 800-step pilot runs with lite's widths, without "
        "and with 2 neighbours each side, evaluated on the held-out slab, gave 27.0 and "
        "26.8 dB: too short to tell, and no sign that context alone pays at that size. The "
        "full model therefore adds depth (5 levels: a wider receptive field for the brain's "
        "outline, where most of the error is) and width along with the context, and trains "
        "a third longer. It was the only full configuration trained to the end; nothing "
        "else was tuned on the held-out slab."
    ),
}


def design_note(spec: config.ModelSpec) -> str:
    note = DESIGN_NOTES.get(spec.name)
    return f"\n{note}\n" if note else ""


def restored_text(restored: str | None) -> str:
    """The sentence a re-quantized build adds to the training section."""
    if not restored:
        return ""
    return (f"\nThis build re-quantized and re-evaluated the committed fp32 weights without "
            f"training them again; the training figures above are the training run's, "
            f"{restored} (`records/`).")


def render_model_card(
    spec: config.ModelSpec, train: Json, ev: Json, quant: Json, golden: Json,
    timings: dict[str, float], restored: str | None = None,
) -> str:
    """MODEL_CARD.md of the bundle. ``restored``: where the training record came from when
    this build re-quantized the committed weights instead of training them."""
    variants = "\n".join(
        f"| {name} | {v['train_psnr_db']:.2f} dB | {v['latency_ms']:.1f} ms "
        f"| {avx2_ms(v.get('latency_avx2_ms'))} "
        f"| {v['kernel_vs_qdq_reference_db']:.1f} dB | {'yes' if v['saturation_safe'] else 'no'} |"
        for name, v in quant["variants"].items()
    )
    variant_header = ("| variant | PSNR brain (training slices) | latency / slice | AVX2 kernels "
                      "| kernels vs QDQ | saturation-safe |\n|---|---|---|---|---|---|")
    timed = timing_note(quant)
    gates = ev["gates"]
    history = train["history"]
    golden_z = ", ".join(f"{z:+.0f}" for z in golden["z_mm"])
    fp32, int8 = ev["models"]["onnxruntime_fp32"], ev["models"]["onnxruntime_int8"]
    drops = ", ".join(f"{RUNTIME_LABELS[rt]} {d:.2f} dB" for rt, d in gates["int8_drop_db"].items())
    c = spec.in_channels
    if spec.context:
        what = (f"Translates one axial T1-weighted MR slice (256 x 256 at 1 mm), seen together "
                f"with its {spec.context} neighbours on each side (a stack of {c} slices 1 mm "
                "apart, 2.5D), into a synthetic T2-weighted slice on a fixed intensity scale "
                "(CSF = 1.0). The agent gathers the neighbours from the series as its slices "
                "arrive (README, 'Series assembly').")
        scope = ("- 2.5D, axial only, 1 mm grid and 1 mm slice spacing: the agent resamples "
                 "other in-plane grids to 256 x 256 at 1 mm but not the slice spacing; a series "
                 "at another spacing gives the model neighbours at other distances than it was "
                 "trained on. The first and last slices of a series (and slices next to a "
                 "missing one) see a repeated neighbour instead (edge padding).")
    else:
        what = ("Translates one axial T1-weighted MR slice (256 x 256 at 1 mm) into a "
                "synthetic T2-weighted slice on a fixed intensity scale (CSF = 1.0).")
        scope = ("- 2D, axial only, 1 mm grid; the agent must resample other grids to "
                 "256 x 256 at 1 mm. Each slice is translated alone, so adjacent output slices "
                 "can be less consistent than the anatomy (see through-plane MAE).")
    z0, z1 = ev["holdout_z_mm"]
    verdict = "passed" if gates["passed"] else "FAILED"
    build_min = sum(timings.values()) / 60
    restored_line = restored_text(restored)
    rim_px = RIM_PX
    return f"""# {spec.name} {spec.version} — model card

**NOT FOR DIAGNOSTIC USE.** A reference/demo model for the IoMT edge inference agent. It
was trained on one SIMULATED image pair derived from an atlas template, not on patient
scans; its output is a synthetic image and must never inform a clinical decision.

## What it does

{what}

{summary_table(spec, train, ev)}

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
  nor calibration (a 2.5D model's context may reach into the gap: its T1 only, never a
  target). Training: the other {train["train_slices"]} axial slices with at least
  {config.MIN_BRAIN_PIXELS} brain pixels; their neighbours past the volume's ends repeat the
  edge slice.
- Augmentation (on the fly): {augmentation_text(train["augment"])}

## Training

Loss {train["loss"]} on random {train["crop"]} x {train["crop"]} crops centred near brain
pixels (the network is fully convolutional), batch {train["batch"]}, {train["steps"]} steps,
{train["optimizer"]}, peak learning rate {train["lr"]}; seed {config.SEED};
PyTorch {torch.__version__} CPU, {train["threads"]} threads, {train["wall_s"] / 60:.1f} min wall.
Final training loss (mean of the last 200 steps): {history[-1]["loss"]:.4f}.{restored_line}
{design_note(spec)}
## Quantization

onnxruntime static quantization, QDQ format, per-channel int8 weights, activations
calibrated with MinMax on {quant["calibration_slices"]} evenly spaced training slices (after
`quant_pre_process`). Variants (activations/weights):

- `s8s8`, `u8s8`: 8-bit weights. onnxruntime runs both on u8s8 kernels on x86 (it shifts s8
  activations to u8; the two gave identical outputs here), and on CPUs without VNNI (AVX2,
  AVX-512F) those can saturate their 16-bit intermediate sums.
- `u8s8_rr`: `reduce_range` (7-bit weights), which cannot saturate.
- `u8s8_rr_fl`: `u8s8_rr` with the first and the last conv left in float (a small share of
  the MACs; in the 2D model the first conv, one input channel and nine weights per filter,
  is where 7-bit weights cost most).
- `u8s8_rr_last`: `u8s8_rr` with the last conv (the head) alone left in float: a head of
  few output channels reading many features is where the 2D model's 7-bit weights cost most
  once it is fine-tuned quantization-aware, and a float first conv costs a Transpose, a
  quantization and two layout reorders more.
- `u8s8_pl`: 8-bit weights with limited pair sums (`agent/quantize/pair_weights.py`): any
  two codes that the AVX2 kernel adds in one 16-bit lane sum to at most 128 in magnitude
  (255 x 128 = 32640 fits), so it cannot saturate, while most weights keep 8 bits; each
  bias absorbs the mean shift the limits cause. Every conv in int8, the outer level
  included. `u8s8_pl_last`: the same with the head left in float.
- `u8u8`: 8-bit unsigned weights. onnxruntime's u8u8 kernels widen both operands to 16 bits
  before they multiply, so they cannot saturate on any x86 CPU (checked under
  `qemu-x86_64 -cpu Haswell`, `make test-cpus`); slower than u8s8 where VNNI exists.
- `u8u8_fl`: `u8u8` with the first and the last conv left in float.
- `u8s8_rr_outer`: `u8s8_rr` with every node that reads or writes a full-resolution
  (256 x 256) tensor left in float: the outer level's convs, the pool, the last resize and
  concat, the head. Those layers have few channels, and on CPUs without an int8 dot product
  their int8 form (im2col and requantization around a small GEMM) costs more than the
  float one (`../README.md`, int8 on CPUs without dot product).

Rule: only saturation-safe variants are eligible, since edge nodes may lack the VNNI this
build machine ({isa_line()}) has and no measurement here would show saturation. Of those,
the ones within {quant["selection_drop_db"]} dB of fp32 on the training slices qualify (a
third of the 0.3 dB gate on the held-out slab, where the drop ran up to about three times
the drop on the training slices) and the fastest is chosen; when none qualifies, the most
accurate one, and the held-out gate decides. Here: {quant["selection"]}. fp32 on the
training slices: {quant["fp32_train_psnr_db"]:.2f} dB, {quant["fp32_latency_ms"]:.1f} ms.{timed}
"AVX2 kernels": the same latency with onnxruntime forced onto the kernels of a CPU without
VNNI (`bench/avx2_kernels.py`), on this machine's cores.
"Kernels vs QDQ": the output of onnxruntime's integer kernels against the same model run
with graph optimisations off (dequantize -> float op -> quantize), on this machine; a variant
under 55 dB there is not eligible.

{variant_header}
{variants}

Chosen: **{quant["chosen"]}**.{saturation_note(quant)}

## Measured quality and speed (held-out slab)

{quality_table(ev)}

- int8 vs fp32 outputs (onnxruntime): {ev["int8_vs_fp32"]["psnr_brain_db"]:.2f} dB PSNR in
  the brain, {ev["int8_vs_fp32"]["psnr_full_db"]:.2f} dB on the full slice.
- Through-plane consistency (fp32, onnxruntime): MAE of the difference between adjacent
  output slices against the same difference of the reference, in the brain:
  {fp32["through_plane_mae"]:.4f} ({fp32["through_plane_psnr_db"]:.2f} dB as a PSNR); int8
  {int8["through_plane_mae"]:.4f}. Lower MAE = adjacent slices change as the anatomy does.
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
  {gates["int8_max_drop_db"]} dB of fp32 on every runtime (drop: {drops}): {verdict}.
- Latency: {machine_line()}.

Definitions: the T2 target is compared on its own scale (CSF = 1.0). PSNR uses data range
L = max of the reference over the slab ({fp32["data_range"]:.3f}) and MSE pooled
over all slab pixels of the region. "Brain" = pixels where the T1 input or the T2 reference is
non-zero (the template is skull-stripped, so this is everything but the background); "full
slice" = all 256 x 256 pixels, background included. SSIM: Gaussian window 11 x 11, sigma 1.5,
K1 = 0.01, K2 = 0.03, same L, map averaged over the region. MAE on the target scale
(x 1000 for stored units).

## Golden set (activation gate)

`golden.npz`: `input` float32 [4, {c}, 256, 256], already-normalised held-out inputs (MNI z
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
{scope}

## Licence and notices

The model was derived from the MNI ICBM152 template, distributed under this notice:

{MNI_COPYRIGHT}

References:

{REFERENCES}

## Rebuild

`make -C models` (recipe in `models/recipes/`); last build {build_min:.1f} min wall on 2 CPU
cores. `make -C models requantize` redoes quantization, evaluation and this bundle from the
committed fp32 files and the training record in `models/records/`, without training.
"""
