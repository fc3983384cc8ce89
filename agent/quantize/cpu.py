"""Saturation-safe weights or not: does the CPU that will serve the model have int8
dot-product instructions?

onnxruntime's x86 int8 kernels without VNNI (AVX2, AVX-512F) sum pairs of u8 x s8 products
in 16 bits, which can saturate; weights with limited pair sums (``pair_weights``) or 7-bit
weights (``reduce_range``) cannot. x86 with ``avx512_vnni`` / ``avx_vnni``, and ARM with the
dot-product extension (``asimddp``), do not saturate, so they get plain 8-bit weights. The
host decides by default; an operator who quantizes on a workstation for a fleet of other
CPUs says which kind the fleet is.
"""

from __future__ import annotations

import platform
import re
from dataclasses import dataclass
from pathlib import Path

from agent.cpu import avx2_kernels_forced, identify

TARGETS = ("host", "no-dot-product", "dot-product")
X86 = ("x86_64", "amd64", "i686", "i386")


@dataclass(frozen=True)
class WeightsDecision:
    """The choice and the reason the report gives for it."""

    saturation_safe: bool  # weights that cannot saturate 16-bit pair sums
    target: str
    reason: str


def host_dot_product(cpuinfo: str | None, machine: str) -> tuple[bool | None, str]:
    """(has int8 dot-product, what was seen); None when it cannot be told. The CPU is
    identified by ``agent.cpu`` (the same reading ``iomt-agent bench`` reports)."""
    if cpuinfo is None:
        return None, "cannot read /proc/cpuinfo"
    arch = machine.lower()
    described = re.search(r"^\s*(flags|features)\s*:", cpuinfo, re.MULTILINE | re.IGNORECASE)
    if not (arch in X86 or arch.startswith(("aarch64", "arm")) or described):
        return None, f"unknown CPU architecture {machine!r}"
    cpu = identify(cpuinfo, machine=machine, avx2_kernels=avx2_kernels_forced())
    kind = "ARM" if any(label.endswith("NEON") for label in cpu.isa) else "x86"
    if cpu.int8_dot:
        return True, f"{kind} host with {cpu.int8_dot}"
    return False, f"{kind} host without int8 dot-product instructions (VNNI / asimddp)"


def decide_weights(
    target: str = "host", cpuinfo_path: Path = Path("/proc/cpuinfo"), machine: str | None = None
) -> WeightsDecision:
    """Whether the weights must be saturation-safe for ``target`` (one of ``TARGETS``)."""
    if target == "dot-product":
        return WeightsDecision(False, target, "--target-cpu dot-product: the fleet's CPUs have "
                             "int8 dot-product instructions (VNNI / asimddp): 8-bit weights")
    if target == "no-dot-product":
        return WeightsDecision(True, target, "--target-cpu no-dot-product: weights that cannot "
                             "saturate onnxruntime's 16-bit int8 sums")
    if target != "host":
        raise ValueError(f"target CPU {target!r}: expected one of {', '.join(TARGETS)}")
    try:
        text: str | None = cpuinfo_path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        text = None
    has_dot, seen = host_dot_product(text, machine or platform.machine())
    if has_dot is None:
        return WeightsDecision(True, target, f"{seen}: assuming no int8 dot-product, so weights "
                             "that cannot saturate, to be safe; say --target-cpu dot-product "
                             "if the fleet has VNNI / asimddp")
    if has_dot:
        return WeightsDecision(False, target, f"{seen}: 8-bit weights (for a fleet without "
                             "int8 dot-product, quantize with --target-cpu no-dot-product)")
    return WeightsDecision(True, target, f"{seen}: weights that cannot saturate "
                         "onnxruntime's 16-bit int8 sums")
