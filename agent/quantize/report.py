"""What ``model quantize`` writes besides models: bundle.json, the MODEL_CARD.md stub, and
the table it prints (the same figures as quantize-report.json)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from agent.model.bundle import sha256_file
from agent.model.contract import Contract
from agent.model.manifest import (
    BUNDLE_FORMAT,
    BundleManifest,
    ComputeSpec,
    FileEntry,
    GoldenEntry,
)


def db_value(value: float | None) -> float | str | None:
    """A dB figure for JSON: rounded, "inf" for an exact match, None for none."""
    if value is None or math.isnan(value):
        return None
    return "inf" if math.isinf(value) else round(value, 2)


def _file(stage: Path, name: str) -> FileEntry:
    return FileEntry(path=name, sha256=sha256_file(stage / name))


def _recorded(report: dict[str, Any]) -> dict[str, Any]:
    """``golden.recorded_psnr_db`` / ``recorded_cpu``: the agent's guard figures on this
    machine, once the guard has run (``report["guard"]``), so that a node whose int8
    kernels give less can tell that from a changed file (``agent.model.guard_cause``)."""
    figures = {rt: round(v["worst_psnr_db"], 2) for rt, v in report.get("guard", {}).items()
               if isinstance(v.get("worst_psnr_db"), float)}  # "inf": nothing to compare
    if not figures:
        return {}
    from agent.cpu import read_cpu

    return {"recorded_psnr_db": figures, "recorded_cpu": read_cpu().label}


def bundle_json(contract: Contract, stage: Path, report: dict[str, Any]) -> str:
    """bundle.json (``agent.model.manifest``) for the files in ``stage``; with the guard's
    figures once ``report`` has them."""
    backends = {"onnxruntime": _file(stage, "model.int8.onnx")}
    references = {}
    if (stage / "model.int8.tflite").is_file():
        backends["litert"] = _file(stage, "model.int8.tflite")
    if (stage / "model.fp32.tflite").is_file():
        references["litert"] = _file(stage, "model.fp32.tflite")
    gmac = report["model"].get("gmac")
    golden = _file(stage, "golden.npz")
    manifest = BundleManifest(
        format=BUNDLE_FORMAT, name=contract.name, version=contract.version,
        task=contract.task, precision="int8", input=contract.input, output=contract.output,
        backends=backends, reference=_file(stage, "model.fp32.onnx"), references=references,
        golden=GoldenEntry(path=golden.path, sha256=golden.sha256,
                           min_psnr_db=contract.fidelity.min_psnr_db, **_recorded(report)),
        compute=None if gmac is None else ComputeSpec(gmac=float(f"{gmac:.6g}")),
        model_card="MODEL_CARD.md")
    return manifest.to_json()


def _fmt(value: Any, spec: str = ".2f") -> str:
    if value is None:
        return "-"
    if isinstance(value, str):
        return value
    return format(value, spec)


def render_table(report: dict[str, Any]) -> str:
    """The human-readable summary the CLI prints."""
    q, d, f = report["quantization"], report["data"], report["fidelity"]
    final = f["final"]
    lines = [
        f"bundle {report['bundle']['name']} {report['bundle']['version']}: int8 QDQ, "
        f"weights {q['weight_codes']} ({q['weights_reason']})",
        f"data: {d['files_seen']} file(s), {d['usable_inputs']} usable, "
        f"{d['calibration_inputs']} calibration, {d['golden_inputs']} golden (held out)",
    ]
    if d["skipped"]:
        lines.append("skipped: " + ", ".join(f"{r} {n}" for r, n in d["skipped"].items()))
    lines += [f"warning: {w}" for w in d["warnings"]]
    lines.append(f"{'golden':>7} {'PSNR dB':>9} {'SSIM':>7} {'MAE':>10} {'max err':>10}")
    for g in final["inputs"]:
        lines.append(f"{g['index']:>7} {_fmt(g['psnr_db']):>9} {_fmt(g['ssim'], '.4f'):>7} "
                     f"{_fmt(g['mae'], '.4g'):>10} {_fmt(g['max_abs_error'], '.4g'):>10}")
    lines.append(f"{'pooled':>7} {_fmt(final['psnr_db']):>9} {_fmt(final['ssim'], '.4f'):>7} "
                 f"{_fmt(final['mae'], '.4g'):>10} {_fmt(final['max_abs_error'], '.4g'):>10}")
    lines.append(f"int8 vs fp32, worst: golden {_fmt(final['worst_psnr_db'])} dB, calibration "
                 f"check {_fmt(f['check']['worst_psnr_db'])} dB; floor {f['floor_db']:g} dB "
                 f"+ margin {f['margin_db']:g} dB (all-int8: golden "
                 f"{_fmt(f['all_int8']['golden_worst_psnr_db'])} dB)")
    float_nodes = report["float_nodes"]
    lines.append(f"kept in float: {', '.join(float_nodes) if float_nodes else 'none'}")
    for layer in report.get("per_layer", []):
        lines.append(f"  layer {layer['node']:<32} {layer['op_type']:<12} SQNR "
                     f"{layer['sqnr_db']:7.2f} dB  lost here {layer['drop_db']:6.2f} dB")
    for runtime, verdict in report.get("guard", {}).items():
        lines.append(f"guard ({runtime}): {'PASS' if verdict['ok'] else 'FAIL'}: "
                     f"{verdict['reason']}")
    timings = report.get("timings_s", {})
    lines.append("timings: " + ", ".join(f"{k} {v:.1f} s" for k, v in timings.items()))
    return "\n".join(lines)


def model_card(contract: Contract, report: dict[str, Any]) -> str:
    """A MODEL_CARD.md stub: the measured figures, and the sections only the operator can
    write."""
    q, d, f = report["quantization"], report["data"], report["fidelity"]
    final = f["final"]
    i, o = contract.input, contract.output
    float_nodes = ", ".join(f"`{n}`" for n in report["float_nodes"]) or "none"
    gmac = report["model"].get("gmac")
    tflite = report.get("tflite")
    return f"""# {contract.name} {contract.version}

**Synthetic output: not for diagnostic use.** Every output is a derived instance labelled
"{o.series_description}".

Task: {contract.task}

> This card was generated by `iomt-agent model quantize`. Fill in the sections marked TODO
> before the bundle ships.

## Model

* Input: {i.modality}, {i.shape[0]} x {i.shape[1]} at {i.pixel_spacing_mm[0]:g} x \
{i.pixel_spacing_mm[1]:g} mm, {2 * i.context_slices + 1} slice(s) \
({"2D" if i.context_slices == 0 else f"2.5D, {i.context_slices} neighbour(s) each side"}), \
normalised by the {i.normalisation.percentile:g}th percentile, clipped to \
[0, {i.normalisation.clip_max:g}].
* Output: {o.modality}, model output 1.0 = {o.scale:g} stored, {o.units}.
* Compute: {"unknown" if gmac is None else f"{gmac:.3f} GMAC"} per slice.
* Files: `model.int8.onnx` (served), `model.fp32.onnx` (reference){
    ", `model.int8.tflite` / `model.fp32.tflite` (LiteRT)" if tflite else ""}, `golden.npz`.

## Quantization

* onnxruntime static quantization, {q['format']}: activations {q['activations']}, weights
  {q['weights']}, {q['weight_codes']} ({q['weights_reason']}).
* Calibrated on {d['calibration_inputs']} input(s) from the operator's DICOMs; the
  {d['golden_inputs']} golden input(s) were held out from calibration.
* Nodes kept in float (sensitivity pass): {float_nodes}.

## Fidelity (int8 against fp32, golden set)

| figure | value |
|---|---|
| pooled PSNR | {_fmt(final['psnr_db'])} dB |
| worst PSNR (gated) | {_fmt(final['worst_psnr_db'])} dB |
| mean SSIM | {_fmt(final['ssim'], '.4f')} |
| floor (bundle.json) | {f['floor_db']:g} dB |
| build target (floor + margin) | {f['target_db']:g} dB |

The margin leaves room for other CPUs' int8 kernels: every node runs the guard on load and
refuses the model below the floor.

## Training data, intended use, limitations

TODO: how the model was trained and on what data, what it was validated against, who may
use it for what. Golden inputs are normalised pixel data from the calibration DICOMs: they
travel with the bundle to every node, so use de-identified or consented scans.
"""
