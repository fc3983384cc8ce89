"""The int8 accuracy guard: before a model serves, its bundle's golden inputs go through the
runner that will serve it, and the outputs are compared with the fp32 reference outputs
stored beside them. A model that misses the bundle's fidelity floor is refused.

``golden.npz`` holds ``input`` (float32 [N, C, H, W], already normalised model input) and
``reference_output`` (float32, the fp32 model's outputs for them); ``bundle.json`` gives
``golden.min_psnr_db``. The figures, all on the model's output scale:

* PSNR = 10 log10(L^2 / MSE) with the data range L = max(reference) - min(0, min(reference))
  over the whole golden set: the reference's peak for a non-negative output, which is the
  convention ``models/recipes/build_bundle.py`` uses when it sets the floor, and the full
  span for a signed one. L is 1.0 (the normalised scale's nominal peak) when the reference
  is all zeros.
* The gate: the *worst* of the pooled PSNR and every per-input PSNR must reach the floor
  (the recipe sets the floor a margin below both, so a healthy model passes either way;
  the worst catches a model that breaks on one kind of input only). Any non-finite output
  fails.
* Mean and maximum absolute error and SSIM (Gaussian window 11 x 11, sigma 1.5, as in
  the model card) are reported, not gated; so is the latency of each golden input
  (batch of one, after one untimed warm-up run).

A bundle without a golden set: a quantized one (``precision`` other than fp32) fails, since
nothing shows that it has not drifted from its reference; an fp32 one passes with a warning,
since its served file is its own reference.

A failed report says what failed (``shortfall``), why where it can (``cause``: this CPU's
int8 kernels, a bundle that never passed; ``agent.model.guard_cause``) and what to do (``fix``);
``reason`` joins them in one line.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from agent.backends import BackendError, ModelRunner, RunnerOptions, open_runner
from agent.model.bundle import BundleError, ModelBundle, load_bundle
from agent.model.fidelity import data_range as golden_range
from agent.model.fidelity import psnr_from_mse, ssim
from agent.model.guard_cause import FLOAT_PRECISIONS, diagnose, format_db

__all__ = ["FLOAT_PRECISIONS", "GoldenFigures", "GuardFailed", "GuardReport", "check_guard",
           "format_db", "load_golden", "report_json", "run_guard", "verify_bundle"]

Floats = npt.NDArray[np.float64]


@dataclass(frozen=True)
class GoldenFigures:
    """One golden input: its figures against the reference."""

    index: int
    psnr_db: float
    mae: float
    max_abs_error: float
    ssim: float
    latency_ms: float


@dataclass(frozen=True)
class GuardReport:
    """The guard's verdict and the figures behind it. ``reason`` is one line for logs."""

    bundle: str
    version: str
    precision: str
    runtime: str
    ok: bool
    reason: str
    min_psnr_db: float | None = None  # None: the bundle has no golden set
    psnr_db: float | None = None  # pooled over the golden set
    worst_psnr_db: float | None = None  # min of pooled and per-input: what is gated
    mae: float | None = None
    max_abs_error: float | None = None
    ssim: float | None = None
    data_range: float | None = None
    inputs: tuple[GoldenFigures, ...] = field(default=())
    warning: str | None = None
    shortfall: str | None = None  # a failed report: what failed, with the figures
    cause: str | None = None  # why, where known: agent.guard_cause.CauseKind
    explanation: str | None = None  # the cause in words
    fix: str | None = None  # what to do about it

    def with_fix(self, fix: str) -> GuardReport:
        """The same report with another fix (one that names a runtime that passes here)."""
        reason = self.reason
        if self.fix and reason.endswith(self.fix):
            reason = reason[: -len(self.fix)] + fix
        return replace(self, fix=fix, reason=reason)

    @property
    def has_golden(self) -> bool:
        return self.min_psnr_db is not None

    def summary(self) -> dict[str, Any]:
        """The figures for a status message or a log line (JSON-safe: inf becomes "inf")."""
        return {
            "ok": self.ok,
            "runtime": self.runtime,
            "min_psnr_db": self.min_psnr_db,
            "psnr_db": _json_number(self.psnr_db),
            "worst_psnr_db": _json_number(self.worst_psnr_db),
            "mae": _json_number(self.mae),
            "max_abs_error": _json_number(self.max_abs_error),
            "golden_inputs": len(self.inputs),
            "reason": self.reason,
            **({"cause": self.cause} if self.cause else {}),
            **({"fix": self.fix} if self.fix else {}),
        }

    def as_dict(self) -> dict[str, Any]:
        """Everything, JSON-safe (``iomt-agent model verify --json``)."""
        out = asdict(self)
        out["inputs"] = [{k: _json_number(v) for k, v in asdict(g).items()} for g in self.inputs]
        return {k: _json_number(v) for k, v in out.items()}

    def render(self) -> str:
        """The human-readable report ``iomt-agent model verify`` prints."""
        lines = [f"model {self.bundle} {self.version} ({self.precision}) on {self.runtime}"]
        if self.warning:
            lines.append(f"warning: {self.warning}")
        if self.inputs:
            lines.append(f"golden set: {len(self.inputs)} input(s), data range "
                         f"{self.data_range:.4g} (output scale)")
            lines.append(f"{'input':>7} {'PSNR dB':>9} {'MAE':>10} {'max err':>10} "
                         f"{'SSIM':>7} {'ms':>8}")
            for g in self.inputs:
                lines.append(f"{g.index:>7} {format_db(g.psnr_db):>9} {g.mae:>10.4g} "
                             f"{g.max_abs_error:>10.4g} {g.ssim:>7.4f} {g.latency_ms:>8.2f}")
            latencies = sorted(g.latency_ms for g in self.inputs)
            lines.append(f"{'pooled':>7} {format_db(self.psnr_db):>9} {self.mae or 0:>10.4g} "
                         f"{self.max_abs_error or 0:>10.4g} {self.ssim or 0:>7.4f} "
                         f"{latencies[len(latencies) // 2]:>8.2f} (median)")
        verdict = "PASS" if self.ok else "FAIL"
        lines.append(f"{verdict}: {self.reason}")
        return "\n".join(lines)


class GuardFailed(BundleError):
    """The served model misses its bundle's fidelity floor (or has no golden set to show it
    does not). A ``BundleError``: the bundle is not fit to serve. ``report`` has the figures."""

    def __init__(self, report: GuardReport) -> None:
        super().__init__(report.reason)
        self.report = report


def _json_number(value: Any) -> Any:
    if isinstance(value, float):
        if math.isnan(value):
            return None
        return "inf" if math.isinf(value) else round(value, 6)
    return value


RUNTIME_FIX = 'serve it on another runtime or set model.backend = "auto"'


def _failed(base: dict[str, Any], shortfall: str, *, fix: str, explanation: str | None = None,
            cause: str | None = None, **figures: Any) -> GuardReport:
    """A failed report; its ``reason``: what failed; why (where known): what to do."""
    why = f"; {explanation}" if explanation else ""
    return GuardReport(**base, **figures, ok=False, reason=f"{shortfall}{why}: {fix}",
                       shortfall=shortfall, cause=cause, explanation=explanation, fix=fix)


def load_golden(bundle: ModelBundle) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]:
    """Read and check ``golden.npz``: (inputs, reference outputs). Raises ``BundleError``."""
    assert bundle.golden is not None
    where = f"bundle {bundle.name}: {bundle.golden.path.name}"
    try:
        with np.load(bundle.golden.path, allow_pickle=False) as golden:
            missing = sorted({"input", "reference_output"} - set(golden.files))
            if missing:
                raise BundleError(f"{where} has no array {missing[0]!r} "
                                  "(expected 'input' and 'reference_output')")
            x, ref = golden["input"], golden["reference_output"]
    except (OSError, ValueError) as exc:
        raise BundleError(f"{where} is not a readable .npz file ({exc})") from None
    for name, array in (("input", x), ("reference_output", ref)):
        if array.ndim != 4 or not np.issubdtype(array.dtype, np.floating) or len(array) < 1:
            raise BundleError(f"{where}: {name} is {array.dtype} {list(array.shape)}, "
                              "expected float32 [N, C, H, W] with N >= 1")
    channels = bundle.input_channels
    if x.shape[1:] != (channels, *bundle.input.shape):
        raise BundleError(f"{where}: input is {list(x.shape)}, the input contract says "
                          f"[N, {channels}, {bundle.input.shape[0]}, {bundle.input.shape[1]}]")
    if len(ref) != len(x):
        raise BundleError(f"{where}: {len(x)} inputs but {len(ref)} reference outputs")
    return x.astype(np.float32, copy=False), ref.astype(np.float32, copy=False)


def run_guard(bundle: ModelBundle, runner: ModelRunner, *,
              precision: str | None = None) -> GuardReport:
    """Run the golden set through ``runner`` and judge it against the bundle's floor.

    ``precision`` is that of the file ``runner`` serves when it is not the bundle's own
    (``"fp32"`` for a reference file that ``backend = "auto"`` weighs); it labels the
    report. Never raises for a model that runs badly (that is a failed report); raises
    ``BundleError`` when the golden set itself is malformed."""
    base: dict[str, Any] = {"bundle": bundle.name, "version": bundle.version,
                            "precision": precision or bundle.precision,
                            "runtime": runner.runtime}
    if bundle.golden is None:
        if bundle.precision.lower() in FLOAT_PRECISIONS:
            note = "no golden set: an fp32 model is its own reference, nothing to compare"
            return GuardReport(**base, ok=True, reason=note, warning=note)
        return _failed(base, (
            f"{bundle.precision} model {bundle.name} {bundle.version} has no golden set, so "
            "nothing shows it has not drifted from its fp32 reference"),
            fix="rebuild the bundle with golden.npz and golden.min_psnr_db")
    x, ref = load_golden(bundle)
    floor = bundle.golden.min_psnr_db
    base["min_psnr_db"] = floor
    ref64 = ref.astype(np.float64)
    data_range = golden_range(ref64)
    base["data_range"] = data_range
    try:
        runner.run(x[:1])  # warm-up: first-run allocations are not the model's latency
        outputs, latencies = [], []
        for i in range(len(x)):
            started = time.perf_counter()
            out = runner.run(x[i : i + 1])
            latencies.append((time.perf_counter() - started) * 1000)
            if out.shape != ref[i : i + 1].shape:
                return _failed(base, (
                    f"golden input {i}: the model returns {list(out.shape)}, the reference "
                    f"is {list(ref[i : i + 1].shape)}"), fix=(
                    "the bundle's model file does not match its golden set: rebuild the bundle"))
            outputs.append(np.asarray(out, dtype=np.float64))
    except BackendError as exc:
        return _failed(base, f"the runtime failed on the golden set: {exc}", fix=RUNTIME_FIX)
    except Exception as exc:  # a runtime's own errors are untyped
        return _failed(base, (
            f"the runtime failed on the golden set ({type(exc).__name__}: {exc})"),
            fix=RUNTIME_FIX)
    got = np.concatenate(outputs)
    if not np.all(np.isfinite(got)):
        bad = int(np.count_nonzero(~np.isfinite(got)))
        cause = diagnose(bundle, runner.runtime, base["precision"])
        return _failed(base, f"{bad} non-finite output value(s) on the golden set on this CPU",
                       explanation=cause.explanation, fix=cause.fix, cause=cause.kind)
    err = got - ref64
    per_input = tuple(
        GoldenFigures(
            index=i,
            psnr_db=psnr_from_mse(float(np.mean(err[i] ** 2)), data_range),
            mae=float(np.mean(np.abs(err[i]))),
            max_abs_error=float(np.max(np.abs(err[i]))),
            ssim=ssim(got[i], ref64[i], data_range),
            latency_ms=latencies[i],
        )
        for i in range(len(x))
    )
    pooled = psnr_from_mse(float(np.mean(err**2)), data_range)
    worst = min(pooled, *(g.psnr_db for g in per_input))
    weakest = min(per_input, key=lambda g: g.psnr_db)
    figures: dict[str, Any] = {
        "psnr_db": pooled, "worst_psnr_db": worst, "mae": float(np.mean(np.abs(err))),
        "max_abs_error": float(np.max(np.abs(err))),
        "ssim": float(np.mean([g.ssim for g in per_input])), "inputs": per_input}
    if worst >= floor:
        return GuardReport(**base, **figures, ok=True, reason=(
            f"golden PSNR {format_db(worst)} dB (worst of pooled {format_db(pooled)} and "
            f"{len(per_input)} input(s)) >= floor {floor:g} dB"))
    cause = diagnose(bundle, runner.runtime, base["precision"])
    return _failed(base, (
        f"{base['precision']} model {bundle.name} {bundle.version} on {runner.runtime} "
        f"misses its fidelity floor on this CPU: golden PSNR {format_db(worst)} dB < "
        f"{floor:g} dB (pooled {format_db(pooled)} dB, worst input {weakest.index})"),
        explanation=cause.explanation, fix=cause.fix, cause=cause.kind, **figures)


def check_guard(bundle: ModelBundle, runner: ModelRunner) -> GuardReport:
    """``run_guard``, raising ``GuardFailed`` when the model must not serve."""
    report = run_guard(bundle, runner)
    if not report.ok:
        raise GuardFailed(report)
    return report


def verify_bundle(
    path: str | Path, *, runtime: str = "onnxruntime", intra_op_threads: int = 0
) -> GuardReport:
    """What ``iomt-agent model verify`` does: load the bundle (checking every digest), open
    the runtime, run the guard. Raises ``BundleError`` or ``BackendError`` when the bundle
    or its model file cannot be used at all."""
    bundle = load_bundle(path)
    runner = open_runner(
        runtime,
        str(bundle.backend_file(runtime).path),
        RunnerOptions(intra_op_threads=intra_op_threads, input_name=bundle.input.input_name,
                      output_name=bundle.output.output_name),
    )
    try:
        return run_guard(bundle, runner)
    finally:
        runner.close()


def report_json(report: GuardReport) -> str:
    return json.dumps(report.as_dict(), indent=2, allow_nan=False)
