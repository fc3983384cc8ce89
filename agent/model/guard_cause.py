"""Why a model misses its fidelity floor on this node, and what fixes it.

The guard (``agent.model.guard``) sees only this CPU's figures. Three different faults end there,
and each has its own fix:

* **the file changed** (corrupted in transit, replaced): its sha256 no longer matches
  ``bundle.json``, and ``agent.model.bundle.load_bundle`` stops before the guard runs: reinstall
  the bundle;
* **this CPU's int8 kernels differ** from the build machine's: the file is the one that was
  built (sha256 checked), ``bundle.json`` records the figure it gave there
  (``golden.recorded_psnr_db``) at or above the floor, and here it gives less (on x86 without
  VNNI, u8 x s8 products can saturate AVX2's 16-bit sums). The bundle is fine; another
  runtime, or ``model.backend = "auto"``, serves it on this CPU;
* **the bundle never passed**: the recorded figure is below the floor too: rebuild it.

A bundle that records no figure for the runtime (built before the field existed, or by
hand) leaves the last two apart only by trying: the message says so.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from agent.model.bundle import ModelBundle

CauseKind = Literal["this_cpu", "never_passed", "unknown", "fp32_mismatch"]
FLOAT_PRECISIONS = frozenset({"fp32", "float32"})
REBUILD = ("rebuild the bundle (`iomt-agent model quantize`; the reference bundles: "
           "`make -C models`)")
REBUILD_FOR_CPU = ("rebuild it for CPUs like this one (`iomt-agent model quantize "
                   "--target-cpu no-dot-product`)")


@dataclass(frozen=True)
class Cause:
    """What a miss of the floor on this CPU means: ``kind`` for programs, ``explanation``
    (why) and ``fix`` (what to do) for people."""

    kind: CauseKind
    explanation: str
    fix: str


def format_db(value: float | None) -> str:
    """A PSNR for people: two decimals, "inf" for an exact match, "-" for none."""
    if value is None or math.isnan(value):
        return "-"
    return "inf" if math.isinf(value) else f"{value:.2f}"


def diagnose(bundle: ModelBundle, runtime: str, precision: str) -> Cause:
    """The cause of a miss of ``bundle``'s floor by its ``precision`` file on ``runtime``,
    from the figures ``bundle.json`` recorded where it was built."""
    assert bundle.golden is not None
    golden = bundle.golden
    if precision.lower() in FLOAT_PRECISIONS:
        return Cause("fp32_mismatch", (
            "an fp32 file misses the floor only when it does not match the golden set's "
            "reference outputs"), REBUILD)
    recorded = golden.recorded_psnr_db.get(runtime)
    if recorded is None:
        return Cause("unknown", (
            f"bundle.json records no build-time figure for {runtime} "
            "(golden.recorded_psnr_db), so it cannot tell whether this CPU's int8 kernels "
            "differ from the build machine's or the bundle never passed"),
            'serve it on another runtime or set model.backend = "auto" (the fastest '
            f"runtime x precision that passes on this CPU); if none passes, {REBUILD}")
    where = f" on {golden.recorded_cpu}" if golden.recorded_cpu else ""
    if recorded >= golden.min_psnr_db:
        return Cause("this_cpu", (
            f"the file is the one the bundle was built with (sha256 checked) and gave "
            f"{format_db(recorded)} dB there{where}, so this CPU's int8 kernels in {runtime} "
            "compute it differently (int8 kernels differ by CPU: on x86 without VNNI, "
            "u8 x s8 products can saturate); the bundle has not drifted"),
            'serve it on another runtime or set model.backend = "auto" (the fastest '
            f"runtime x precision that passes on this CPU), or {REBUILD_FOR_CPU}")
    return Cause("never_passed", (
        f"bundle.json records {format_db(recorded)} dB for it at build time{where}, below "
        "the floor too: the bundle never passed its guard"), REBUILD)
