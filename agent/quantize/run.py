"""``iomt-agent model quantize``: a float ONNX model + DICOMs + CONTRACT.toml -> a complete,
guarded int8 bundle. The steps, in order (each fails with a message that says what to fix):

1. read the contract; check the float model against it (names, rank, channels, grid);
2. decode the DICOMs into model inputs as the agent serves them (``inputs.py``); split them
   into calibration inputs and a held-out golden set;
3. reference outputs of the fp32 model (the golden set's ``reference_output``);
4. quantize all nodes (``qdq.py``); judge the result with the agent's own guard on the golden
   set and on a few calibration inputs: both must reach the floor plus a safety margin;
5. if they do not, the sensitivity pass (``sensitivity.py``) keeps the nodes that lose most
   in float, one more at a time, then drops those not needed;
6. write the bundle in a staging directory beside ``--out``, load it with
   ``agent.model.bundle.load_bundle`` and run ``agent.model.guard`` on it through the
   agent's runner(s), then move it into place.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from agent import __version__
from agent.model.bundle import sha256_file
from agent.model.contract import load_contract
from agent.quantize.cpu import decide_weights
from agent.quantize.domain import build_domain_reference
from agent.quantize.errors import BadInput, FloorNotReached, require_onnx
from agent.quantize.graph import check_against_contract, count_gmac, load_onnx, quantized_nodes
from agent.quantize.inputs import Collected, collect_inputs, list_files, split_inputs
from agent.quantize.progress import Progress
from agent.quantize.qdq import SETTINGS, Quantizer
from agent.quantize.report import db_value, render_table
from agent.quantize.sensitivity import LayerError, layer_errors, ranking
from agent.quantize.session import Judged, QuantizeOptions, Session
from agent.quantize.writer import install, prepare_out, stage_dir, write_bundle

MIN_CALIBRATION = 4
REPORT_NAME = "quantize-report.json"
SKIPPED_SHOWN = 20


def _check_options(o: QuantizeOptions) -> None:
    problems = [flag for flag, ok in (
        ("--golden must be at least 1", o.golden >= 1),
        (f"--calibration-count must be at least {MIN_CALIBRATION}",
         o.calibration >= MIN_CALIBRATION),
        ("--margin-db must be 0 or more", o.margin_db >= 0 and math.isfinite(o.margin_db)),
        ("--max-float-nodes must be at least 1",
         o.max_float_nodes is None or o.max_float_nodes >= 1),
        ("--threads must be 0 or more", o.threads >= 0),
    ) if not ok]
    if problems:
        raise BadInput("; ".join(problems))


def _collect(s: Session) -> Collected:
    root = s.o.calibration_dir
    if not root.is_dir():
        raise BadInput(f"--calibration {root} is not a directory")
    files = list_files(root)
    started = time.perf_counter()
    with s.progress.stage("decode DICOM", len(files)) as stage:
        got = collect_inputs(root, s.contract.input_contract(), files, stage.tick)
    s.timed("decode", started)
    # File names only on the operator's console: the report travels inside the bundle.
    for k in got.skipped[:SKIPPED_SHOWN]:
        s.progress.note(f"skipped {k.path}: {k.reason} ({k.detail})")
    if len(got.skipped) > SKIPPED_SHOWN:
        s.progress.note(f"... and {len(got.skipped) - SKIPPED_SHOWN} more skipped file(s)")
    for warning in got.warnings:
        s.progress.note(f"warning: {warning}")
    need = s.o.golden + MIN_CALIBRATION
    if len(got.inputs) < need:
        why = ", ".join(f"{r}: {n}" for r, n in got.skipped_by_reason().items()) or "none"
        raise BadInput(f"--calibration {root}: {len(got.inputs)} usable input(s) from "
                       f"{len(files)} file(s) (skipped: {why}); need at least {need} "
                       f"({s.o.golden} golden + {MIN_CALIBRATION} calibration) that match the "
                       "contract's input (modality, series description, photometric, bits)")
    return got


def _sensitivity(s: Session, q: Quantizer, first: Judged, check_x: list[np.ndarray],
                 target: float, report: dict[str, Any]) -> tuple[Judged, list[LayerError]]:
    started = time.perf_counter()
    candidates = [name for name, _op in quantized_nodes(first.path)]
    budget = s.o.max_float_nodes or max(1, math.ceil(len(candidates) / 4))
    with s.progress.stage("per-layer error"):
        errors = layer_errors(q.model, first.path, s.work, s.contract.input.tensor_name,
                              check_x, s.o.threads)
    s.timed("per_layer", started)
    ranked = ranking(errors, candidates)[:budget]
    steps: list[dict[str, Any]] = [first.step(target)]
    info = report["sensitivity"] = {"ran": True, "quantized_nodes": len(candidates),
                                    "max_float_nodes": budget, "steps": steps,
                                    "ranking": [e.as_dict() for e in ranked]}
    best, chosen = first, None
    with s.progress.stage("sensitivity pass", len(ranked)) as stage:
        keep: list[str] = []
        for i, err in enumerate(ranked):
            keep = [*keep, err.node]
            judged = s.judge(q.quantize(s.work / f"candidate-{i + 1}.onnx", keep), keep)
            steps.append(judged.step(target))
            stage.tick()
            best = judged if judged.worst_db > best.worst_db else best
            if judged.worst_db >= target:
                chosen = judged
                break
    if chosen is None:
        s.timed("sensitivity", started)
        raise FloorNotReached(
            f"the int8 model misses the fidelity floor {s.contract.fidelity.min_psnr_db:g} dB "
            f"+ margin {s.o.margin_db:g} dB = {target:g} dB even with the {len(ranked)} "
            f"worst node(s) kept in float (dB each loses: "
            f"{', '.join(f'{e.node} {e.drop_db:.1f}' for e in ranked) or 'none'}): best "
            f"worst-case PSNR {db_value(best.worst_db)} dB (all-int8 "
            f"{db_value(first.worst_db)} dB) with {best.float_nodes or 'no node'} in float. "
            "Raise --max-float-nodes, lower the floor in the contract, or make the model "
            "quantization-friendlier")
    # Drop float nodes the result does not need (the ranking is a heuristic), last-added kept.
    for node in list(chosen.float_nodes[:-1]):
        trial = [n for n in chosen.float_nodes if n != node]
        judged = s.judge(q.quantize(s.work / f"pruned-{len(steps)}.onnx", trial), trial)
        steps.append(judged.step(target))
        if judged.worst_db >= target:
            chosen = judged
    info["float_nodes"] = chosen.float_nodes
    s.timed("sensitivity", started)
    return chosen, errors


def quantize_bundle(options: QuantizeOptions, progress: Progress | None = None) -> dict[str, Any]:
    """Build the bundle at ``options.out``; return the report (also written there).
    Raises ``ContractError`` or a ``QuantizeError`` (``BadInput``: exit 2,
    ``FloorNotReached``: exit 1)."""
    started = time.perf_counter()
    progress = progress or Progress()
    _check_options(options)
    require_onnx()
    contract = load_contract(options.contract)
    if options.tflite:
        from agent.quantize.tflite import require_converter

        require_converter()
    prepare_out(options.out, options.force)
    model = load_onnx(options.fp32)
    facts = check_against_contract(model, contract, f"--fp32 {options.fp32.name}")
    decision = decide_weights(options.target_cpu)
    with tempfile.TemporaryDirectory(prefix="iomt-quantize-") as tmp:
        s = Session(options, contract, Path(tmp), progress)
        report: dict[str, Any] = {
            "format": 1, "tool": f"iomt-agent {__version__} model quantize",
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "bundle": {"name": contract.name, "version": contract.version},
            "model": {"fp32_sha256": sha256_file(options.fp32), "opset": facts.opset,
                      "input": [facts.input_name, list(facts.input_shape)],
                      "output": [facts.output_name, list(facts.output_shape)],
                      "gmac": count_gmac(model, contract)},
            "quantization": {**SETTINGS, "saturation_safe": decision.saturation_safe,
                             "target_cpu": decision.target, "weights_reason": decision.reason},
            "sensitivity": {"ran": False},
        }
        del model
        got = _collect(s)
        split = split_inputs(len(got.inputs), options.golden, options.calibration, options.check)
        x = np.stack([i.array for i in got.inputs])
        calib = s.calibration = [x[i] for i in split.calibration]
        report["data"] = _data_section(got, split)
        t = time.perf_counter()
        with progress.stage("fp32 reference", len(split.golden) + len(split.check)) as stage:
            golden_x, check_x = x[split.golden], x[split.check]
            golden_y = s.reference_outputs(golden_x, stage.tick)
            check_y = s.reference_outputs(check_x, stage.tick)
        s.timed("reference", t)
        with progress.stage("domain reference"):
            s.domain, report["domain"] = build_domain_reference(
                calib, np.concatenate([check_x, golden_x]), np.concatenate([check_y, golden_y]),
                lambda fx: s.reference_outputs(fx, lambda: None))
        np.savez(s.work / "golden.npz", input=golden_x, reference_output=golden_y)
        np.savez(s.work / "check.npz", input=check_x, reference_output=check_y)

        q = Quantizer(options.fp32, s.work, contract.input.tensor_name, calib,
                      saturation_safe=decision.saturation_safe)
        t = time.perf_counter()
        with progress.stage("pre-process"):
            report["quantization"]["pre_process"] = q.pre_process()
        s.timed("pre_process", t)
        t = time.perf_counter()
        with progress.stage("calibrate + quantize", len(calib)) as stage:
            first_path = q.quantize(s.work / "candidate-0.onnx", (), stage.tick)
        s.timed("calibrate_quantize", t)
        first = s.judge(first_path, [])
        floor, margin = contract.fidelity.min_psnr_db, options.margin_db
        target = s.target = floor + margin
        report["fidelity"] = {"floor_db": floor, "margin_db": margin, "target_db": target,
                              "all_int8": first.step(target)}
        errors: list[LayerError] = []
        chosen = first
        if first.worst_db < target:
            chosen, errors = _sensitivity(s, q, first, list(check_x), target, report)
        report["float_nodes"] = chosen.float_nodes
        report["quantization"]["calibration_runs"] = q.calibrations
        report["quantization"] |= {"reduce_range": q.reduce_range,
                                   "weight_codes": q.weights_note()}
        if options.per_layer:
            if chosen is not first or not errors:
                t = time.perf_counter()
                with progress.stage("per-layer error"):
                    errors = layer_errors(q.model, chosen.path, s.work,
                                          contract.input.tensor_name, list(check_x),
                                          options.threads)
                s.timed("per_layer", t)
            report["per_layer"] = [e.as_dict() for e in errors]
        report["fidelity"]["final"] = chosen.golden.as_dict()
        report["fidelity"]["check"] = chosen.check.summary()
        staging = stage_dir(options.out)
        try:
            write_bundle(s, staging, chosen, report)
            install(staging, options.out)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    report["timings_s"]["total"] = round(time.perf_counter() - started, 3)
    text = json.dumps(report, indent=2, allow_nan=False) + "\n"
    (options.out / REPORT_NAME).write_text(text, encoding="utf-8")
    return report


def _data_section(got: Collected, split: Any) -> dict[str, Any]:
    return {
        "files_seen": got.files_seen, "usable_inputs": len(got.inputs),
        "calibration_inputs": len(split.calibration), "golden_inputs": len(split.golden),
        "check_inputs": len(split.check), "skipped": got.skipped_by_reason(),
        "skipped_files": [{"sha256": k.sha256, "reason": k.reason, "detail": k.detail}
                          for k in got.skipped],
        "golden": [{"series": got.inputs[i].series, "position_mm": got.inputs[i].position_mm}
                   for i in split.golden],
        "warnings": got.warnings,
    }


__all__ = ["QuantizeOptions", "quantize_bundle", "render_table"]
