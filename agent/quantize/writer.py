"""The bundle on disk: a staging directory beside ``--out``, every file, the agent's own
checks on it (``load_bundle`` with every sha256, the guard through the agent's runners),
then one rename into place."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from agent.model.domain_reference import install_reference
from agent.model.guard import verify_bundle
from agent.quantize.errors import BadInput, QuantizeError
from agent.quantize.report import bundle_json, model_card
from agent.quantize.session import Judged, Session


def prepare_out(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise BadInput(f"--out {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise BadInput(f"--out {out} exists and is not empty: choose another directory or "
                       "pass --force to replace it")
    if not out.parent.is_dir():
        raise BadInput(f"--out {out}: parent directory {out.parent} does not exist")


def stage_dir(out: Path) -> Path:
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    stage.chmod(0o755)  # mkdtemp makes it private; the agent's service user must read it
    return stage


def install(stage: Path, out: Path) -> None:
    """Move the finished bundle into place; a replaced one is removed only afterwards."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        out.rename(old)
    stage.rename(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def write_bundle(s: Session, stage: Path, chosen: Judged, report: dict[str, Any]) -> None:
    """Everything into ``stage``, then the agent's own checks on it."""
    shutil.copyfile(s.o.fp32, stage / "model.fp32.onnx")
    shutil.copyfile(chosen.path, stage / "model.int8.onnx")
    shutil.copyfile(s.work / "golden.npz", stage / "golden.npz")
    litert = None
    if s.o.tflite:
        from agent.quantize.tflite import export_tflite

        t = time.perf_counter()
        litert = export_tflite(s.o.fp32, s.work, stage, s.contract.input.tensor_name,
                               s.calibration, s.judge, s.target)
        s.timed("tflite", t)
        report["tflite"] = litert
    report["timings_s"] = s.timings
    (stage / "MODEL_CARD.md").write_text(model_card(s.contract, report), encoding="utf-8")
    (stage / "bundle.json").write_text(bundle_json(s.contract, stage, report), encoding="utf-8")
    t = time.perf_counter()
    report["guard"] = {}
    runtimes = ["onnxruntime"] + (["litert"] if litert and litert.get("ok") else [])
    with s.progress.stage("guard (agent runner)", len(runtimes)) as st:
        for runtime in runtimes:
            verdict = verify_bundle(stage, runtime=runtime, intra_op_threads=s.o.threads)
            report["guard"][runtime] = verdict.summary()
            st.tick()
            if not verdict.ok:
                raise QuantizeError(f"the written bundle fails the agent's guard on {runtime}: "
                                    f"{verdict.reason}")
    s.timed("guard", t)
    # Again, with the figures just measured (golden.recorded_psnr_db; no file digest changes).
    (stage / "bundle.json").write_text(bundle_json(s.contract, stage, report), encoding="utf-8")
    if s.domain is not None:  # domain.json and its bundle.json entry; no model file changes
        install_reference(stage, s.domain)
