"""One quantize run's options and shared state, and how a candidate model is judged: the
agent's own guard (``agent.model.guard.run_guard``) through the agent's runner, on the golden set
and on the check set (a few calibration inputs)."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from agent.backends import BackendError, RunnerOptions, open_runner
from agent.model.bundle import GoldenSet, ModelBundle
from agent.model.contract import Contract
from agent.model.domain_reference import DomainReference
from agent.model.guard import GuardReport, run_guard
from agent.quantize.errors import BadInput, QuantizeError
from agent.quantize.progress import Progress
from agent.quantize.report import db_value


@dataclass(frozen=True)
class QuantizeOptions:
    """What the operator asked for (the CLI's flags)."""

    fp32: Path
    calibration_dir: Path
    contract: Path
    out: Path
    tflite: bool = False
    target_cpu: str = "host"
    margin_db: float = 3.0
    golden: int = 4
    calibration: int = 64
    check: int = 8
    max_float_nodes: int | None = None  # None: a quarter of the quantized nodes (>= 1)
    per_layer: bool = False
    threads: int = 0
    force: bool = False


@dataclass
class Judged:
    """A candidate int8 model and the guard's verdicts on the golden and check inputs."""

    path: Path
    float_nodes: list[str]
    golden: GuardReport
    check: GuardReport

    @property
    def worst_db(self) -> float:
        return min(self.golden.worst_psnr_db or -math.inf, self.check.worst_psnr_db or -math.inf)

    def step(self, target: float) -> dict[str, Any]:
        return {"float_nodes": self.float_nodes, "golden_worst_psnr_db": db_value(
            self.golden.worst_psnr_db), "check_worst_psnr_db": db_value(self.check.worst_psnr_db),
            "holds": self.worst_db >= target}


class Session:
    """Shared state of one quantize run."""

    def __init__(self, options: QuantizeOptions, contract: Contract, work: Path,
                 progress: Progress) -> None:
        self.o, self.contract, self.work, self.progress = options, contract, work, progress
        self.timings: dict[str, float] = {}
        self.calibration: list[np.ndarray] = []
        self.domain: DomainReference | None = None  # domain.json, when the inputs allow one
        self.target = math.inf
        self.runner_options = RunnerOptions(intra_op_threads=options.threads,
                                            input_name=contract.input.tensor_name,
                                            output_name=contract.output.tensor_name)

    def timed(self, key: str, started: float) -> None:
        self.timings[key] = round(self.timings.get(key, 0.0) + time.perf_counter() - started, 3)

    def fake_bundle(self, golden: Path) -> ModelBundle:
        """An in-memory bundle around a golden file, for ``run_guard`` on a candidate."""
        c = self.contract
        return ModelBundle(
            root=golden.parent, name=c.name, version=c.version, task=c.task, precision="int8",
            input=c.input_contract(), output=c.output_contract(), backends={},
            reference=None, golden=GoldenSet(golden, "", c.fidelity.min_psnr_db),
            model_card=None)

    def reference_outputs(self, x: np.ndarray, tick: Callable[[], None]) -> np.ndarray:
        """The fp32 model's outputs, one input at a time (as the agent and the guard run)."""
        try:
            runner = open_runner("onnxruntime", str(self.o.fp32), self.runner_options)
            try:
                outs = []
                for i in range(len(x)):
                    outs.append(runner.run(x[i : i + 1]))
                    tick()
            finally:
                runner.close()
        except BackendError as exc:
            raise BadInput(f"onnxruntime cannot run the float model: {exc}") from None
        except Exception as exc:  # onnxruntime's own errors are untyped
            raise BadInput(f"the float model fails on the contract's input shape "
                           f"{list(x[:1].shape)}: {type(exc).__name__}: {exc}") from None
        want = (1, 1, *self.contract.input.shape)
        for out in outs:
            if out.shape != want:
                raise BadInput(f"the float model returns {list(out.shape)} for an input "
                               f"{list(x[:1].shape)}; the contract says {list(want)}")
        y = np.concatenate(outs).astype(np.float32)
        if not np.all(np.isfinite(y)):
            raise BadInput("the float model returns non-finite values on the calibration data")
        return y

    def judge(self, path: Path, float_nodes: list[str], runtime: str = "onnxruntime") -> Judged:
        started = time.perf_counter()
        try:
            runner = open_runner(runtime, str(path), self.runner_options)
        except BackendError as exc:
            raise QuantizeError(f"{runtime} cannot load the quantized model: {exc}") from None
        try:
            golden = run_guard(self.fake_bundle(self.work / "golden.npz"), runner)
            check = run_guard(self.fake_bundle(self.work / "check.npz"), runner)
        finally:
            runner.close()
        self.timed("evaluate", started)
        return Judged(path, float_nodes, golden, check)
