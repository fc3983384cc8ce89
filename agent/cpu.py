"""What CPU this is, and an *estimate* of its peak multiply-accumulate rate.

``read_cpu()`` reads ``/proc/cpuinfo`` (x86 ``flags``, ARM ``Features`` and ``CPU part``),
the cores this process may run on (its affinity) and each core's clock; ``estimate_peak``
turns that into peak GMAC/s for fp32 and int8 as

    cores x clock x MACs per cycle per core

where MACs per cycle come from the vector ISA (widest FMA, number of FMA pipes) and, for
int8, from whether the core has int8 dot-product instructions. It is a rule of thumb for
"how far from the hardware's limit is this model", not a measurement: real kernels lose to
memory bandwidth, non-MAC operators and clocks that drop under all-core load. Every
assumption behind a figure is returned with it, so that a report can print them.

The parsing is pure (``identify`` takes the texts), so it is tested on canned cpuinfo files.

``IOMT_AVX2_KERNELS=1`` (set by ``bench/avx2_kernels.py``, which runs the runtimes with
their AVX-512 paths switched off) makes ``read_cpu`` drop the AVX-512 and VNNI flags, so
that labels and peaks describe the kernels that actually run.
"""

from __future__ import annotations

import os
import platform
import re
from dataclasses import dataclass
from pathlib import Path

SYS_CPU = Path("/sys/devices/system/cpu")


@dataclass(frozen=True)
class ArmCore:
    name: str
    fp32_macs: int  # fp32 FMA lanes per cycle per core (128-bit NEON pipes x 4)
    typical_ghz: float  # a common max clock, used only when the kernel reports none
    where: str = ""


# ARM cores by (implementer, part) from /proc/cpuinfo. fp32 MACs/cycle: 2 x 128-bit FMA
# pipes = 8 on the big cores, 4 on the in-order little ones, 16 on the 4-pipe X / V cores.
ARM_CORES: dict[tuple[str, str], ArmCore] = {
    ("0x41", "0xd03"): ArmCore("Cortex-A53", 4, 1.4, "Raspberry Pi 3"),
    ("0x41", "0xd04"): ArmCore("Cortex-A35", 4, 1.5),
    ("0x41", "0xd05"): ArmCore("Cortex-A55", 4, 1.8),
    ("0x41", "0xd07"): ArmCore("Cortex-A57", 8, 1.43, "Jetson Nano / TX2"),
    ("0x41", "0xd08"): ArmCore("Cortex-A72", 8, 1.8, "Raspberry Pi 4"),
    ("0x41", "0xd09"): ArmCore("Cortex-A73", 8, 2.0),
    ("0x41", "0xd0a"): ArmCore("Cortex-A75", 8, 2.0),
    ("0x41", "0xd0b"): ArmCore("Cortex-A76", 8, 2.4, "Raspberry Pi 5"),
    ("0x41", "0xd0c"): ArmCore("Neoverse-N1", 8, 3.0),
    ("0x41", "0xd0d"): ArmCore("Cortex-A77", 8, 2.6),
    ("0x41", "0xd40"): ArmCore("Neoverse-V1", 16, 2.6),
    ("0x41", "0xd41"): ArmCore("Cortex-A78", 8, 2.4),
    ("0x41", "0xd42"): ArmCore("Cortex-A78AE", 8, 2.2, "Jetson Orin"),
    ("0x41", "0xd44"): ArmCore("Cortex-X1", 16, 3.0),
    ("0x41", "0xd46"): ArmCore("Cortex-A510", 4, 1.8),
    ("0x41", "0xd47"): ArmCore("Cortex-A710", 8, 2.8),
    ("0x41", "0xd48"): ArmCore("Cortex-X2", 16, 3.0),
    ("0x41", "0xd49"): ArmCore("Neoverse-N2", 8, 3.0),
    ("0x41", "0xd4f"): ArmCore("Neoverse-V2", 16, 3.1, "Grace"),
    ("0x4e", "0x004"): ArmCore("NVIDIA Carmel", 8, 2.26, "Jetson Xavier"),
}
UNKNOWN_ARM = ArmCore("ARM core", 8, 0.0)


@dataclass(frozen=True)
class CoreGroup:
    """Cores that share a kind and a clock (big.LITTLE chips have two groups)."""

    count: int
    kind: str  # "Cortex-A76", or the x86 model name
    ghz: float | None
    fp32_macs: int  # per cycle per core
    int8_macs: int


@dataclass(frozen=True)
class CpuInfo:
    model: str
    arch: str
    logical_cpus: int  # that this process may use
    cores: int  # physical cores among them (SMT siblings share their FMA units)
    isa: tuple[str, ...]  # human-readable SIMD features that matter here
    int8_dot: str | None  # the int8 dot-product instructions, None if there are none
    groups: tuple[CoreGroup, ...]
    clock_source: str
    assumptions: tuple[str, ...]
    aes: bool = False  # AES instructions (x86 AES-NI, ARMv8 AES): the seal's AEAD (seal.aead)

    @property
    def label(self) -> str:
        """One line naming the CPU and what matters for int8: "AMD EPYC, x86_64, AVX-512,
        AVX-512 VNNI" (bundle.json's ``golden.recorded_cpu``)."""
        return ", ".join((self.model, self.arch, *self.isa))


@dataclass(frozen=True)
class PeakEstimate:
    fp32_gmacs: float | None  # None: no clock known
    int8_gmacs: float | None
    formula: str  # "2 cores x 2.60 GHz x 32 (fp32) / 128 (int8) MACs per cycle per core"


def _number(text: str | None) -> float:
    """A /proc/cpuinfo number, 0.0 when absent or unreadable."""
    try:
        value = float(text or 0)
    except ValueError:
        return 0.0
    return value if value == value and value > 0 else 0.0  # NaN and negatives: 0


def _blocks(text: str) -> list[dict[str, str]]:
    """/proc/cpuinfo as one dict per blank-line separated block (keys lower-cased)."""
    blocks: list[dict[str, str]] = []
    for chunk in re.split(r"\n\s*\n", text):
        fields: dict[str, str] = {}
        for line in chunk.splitlines():
            key, sep, value = line.partition(":")
            if sep:
                fields[key.strip().lower()] = value.strip()
        if fields:
            blocks.append(fields)
    return blocks


def _x86_isa(flags: set[str], one_multiplier: str | None = None
             ) -> tuple[tuple[str, ...], int, int, str | None, list[str]]:
    """(ISA labels, fp32 MACs/cycle/core, int8 MACs/cycle/core, int8 dot, assumptions).
    ``one_multiplier``: the core's name when it has one vector integer multiplier
    (``_one_vector_multiplier``)."""
    if "avx512f" in flags:
        isa, fp32 = ["AVX-512"], 32
        why = ["fp32: 2 FMA units x 16 lanes (AVX-512); parts with one 512-bit FMA unit, "
               "or AVX-512 split into 256-bit halves (Zen 4), reach half of it"]
    elif "avx2" in flags and "fma" in flags:
        isa, fp32 = ["AVX2", "FMA"], 16
        why = ["fp32: 2 FMA units x 8 lanes (AVX2 + FMA)"]
    elif "avx" in flags:
        isa, fp32 = ["AVX"], 8
        why = ["fp32: one 8-lane multiply and one add per cycle (AVX, no FMA)"]
    else:
        isa, fp32 = ["SSE"], 4
        why = ["fp32: 4 lanes per cycle (SSE)"]
    if "avx512_vnni" in flags:
        dot: str | None = "AVX-512 VNNI"
    elif "avx_vnni" in flags:
        dot = "AVX-VNNI"
    else:
        dot = None
    if dot:
        isa.append(dot)
        # VPDPBUSD: 4 u8 x s8 products per 32-bit lane in one instruction.
        int8 = (128 if dot == "AVX-512 VNNI" else 64)
        why.append(f"int8: {dot} dot products, 4 per 32-bit lane, on the 2 FMA units "
                   f"({int8} MACs/cycle)")
    elif one_multiplier is not None:
        int8 = fp32
        why.append(f"int8 without VNNI on {one_multiplier}: one vector integer multiplier, "
                   "and VPMADDUBSW + VPMADDWD are two multiplies per 32 MACs, so int8 peaks "
                   "at the fp32 rate; int8 gains only in bytes moved")
    else:
        int8 = 2 * fp32
        why.append("int8 without VNNI: u8 x s8 multiply-add to 16 bits then widen "
                   "(VPMADDUBSW + VPMADDWD), about 2x the fp32 rate; onnxruntime's u8s8 "
                   "kernels can saturate there unless weights are 7-bit")
    if "amx_int8" in flags:
        isa.append("AMX-INT8 (not counted)")
    return tuple(isa), fp32, int8, dot, why


def _arm_int8(features: set[str], fp32: int) -> tuple[list[str], int, str | None, str]:
    if "i8mm" in features:
        return (["dot product (asimddp)", "i8mm"], 8 * fp32, "SMMLA (i8mm)",
                "int8: SMMLA (i8mm) does 8 products per 32-bit lane, 8x the fp32 rate")
    if "asimddp" in features:
        return (["dot product (asimddp)"], 4 * fp32, "SDOT/UDOT (asimddp)",
                "int8: SDOT/UDOT dot products, 4 per 32-bit lane, 4x the fp32 rate")
    return ([], 2 * fp32, None,
            "int8 without dot product: widening multiply-accumulate (SMLAL), 8 per "
            "128-bit instruction, 2x the fp32 rate")


# x86 cores with one vector integer multiply pipe (VPMADDUBSW, VPMADDWD); from Skylake and
# Zen 3 on there are two. Intel: family 6 model numbers; AMD: family 0x17.
_INTEL_ONE_MULTIPLIER = {0x3C: "Haswell", 0x3F: "Haswell", 0x45: "Haswell", 0x46: "Haswell",
                         0x3D: "Broadwell", 0x47: "Broadwell", 0x4F: "Broadwell",
                         0x56: "Broadwell"}


def _one_vector_multiplier(block: dict[str, str]) -> str | None:
    """The core's name when it has one vector integer multiplier, else None."""
    try:
        family, model = int(block.get("cpu family", "")), int(block.get("model", ""))
    except ValueError:
        return None
    vendor = block.get("vendor_id", "")
    if vendor == "GenuineIntel" and family == 6:
        name = _INTEL_ONE_MULTIPLIER.get(model)
        return f"Intel {name}" if name else None
    if vendor in ("AuthenticAMD", "HygonGenuine") and family == 0x17:
        return "AMD Zen / Zen+ / Zen 2 (family 17h)"
    return None


def identify(cpuinfo: str, *, max_khz: dict[int, int] | None = None,
             allowed: set[int] | None = None, machine: str = "",
             board: str | None = None, avx2_kernels: bool = False) -> CpuInfo:
    """Identify the CPU from the text of /proc/cpuinfo.

    ``max_khz``: cpufreq's ``cpuinfo_max_freq`` per logical CPU (kHz), where the kernel has
    it; ``allowed``: the logical CPUs this process may use (all when None); ``machine``:
    ``platform.machine()``; ``board``: the device tree's model (a Pi or Jetson name);
    ``avx2_kernels``: the runtimes were forced onto their AVX2 kernels (x86 flags of
    AVX-512, AVX-VNNI and AMX are ignored)."""
    blocks = _blocks(cpuinfo)
    procs = [b for b in blocks if "processor" in b and b["processor"].isdigit()]
    header = {k: v for b in blocks if "processor" not in b for k, v in b.items()}
    if allowed is not None:
        procs = [p for p in procs if int(p["processor"]) in allowed] or procs
    logical = len(procs) or len(allowed or ()) or (os.cpu_count() or 1)
    first = procs[0] if procs else header
    words = set((first.get("flags") or first.get("features") or
                 header.get("features", "")).split())
    is_arm = ("features" in first or "cpu part" in first or
              machine.lower().startswith(("arm", "aarch64")))
    khz = max_khz or {}
    why: list[str] = []

    if is_arm:
        fp32_note = "fp32: NEON 128-bit FMA pipes x 4 lanes per core (by core type)"
        labels = ["NEON"] if words & {"asimd", "neon"} else ["no NEON"]
        cores = logical
        cores_note = f"{cores} cores (ARM cores have no SMT siblings)"
        groups: dict[tuple[str, float | None], list[int]] = {}
        kinds: dict[str, ArmCore] = {}
        clock_src = set()
        for i, p in enumerate(procs or [header]):
            core = ARM_CORES.get((p.get("cpu implementer", "").lower(),
                                  p.get("cpu part", "").lower()), UNKNOWN_ARM)
            kinds[core.name] = core
            index = int(p.get("processor", i))
            if index in khz:
                ghz: float | None = khz[index] / 1e6
                clock_src.add("cpufreq cpuinfo_max_freq")
            elif core.typical_ghz:
                ghz = core.typical_ghz
                place = f" ({core.where})" if core.where else ""
                clock_src.add(f"no clock from the kernel: typical max clock of a "
                              f"{core.name}{place}")
            else:
                ghz = None
                clock_src.add("unknown (no cpufreq, unknown core type)")
            groups.setdefault((core.name, ghz), []).append(index)
        extra, _, dot, int8_note = _arm_int8(words, 8)
        labels += extra
        built = []
        for (name, ghz), members in groups.items():
            core = kinds[name]
            _, int8_macs, _, _ = _arm_int8(words, core.fp32_macs)
            built.append(CoreGroup(len(members), name, ghz, core.fp32_macs, int8_macs))
        if "ARM core" in kinds:
            why.append("unknown ARM core type: assumed 2 x 128-bit FMA pipes (8 fp32 MACs)")
        why += [fp32_note, int8_note]
        model = " + ".join(f"{g.count} x {g.kind}" for g in built)
        board_name = board or header.get("model") or header.get("hardware")
        model = f"{board_name} ({model})" if board_name else model
        return CpuInfo(model=model, arch=machine or "arm", logical_cpus=logical,
                       cores=cores, isa=tuple(labels), int8_dot=dot, groups=tuple(built),
                       clock_source="; ".join(sorted(clock_src)),
                       assumptions=(cores_note, *why), aes="aes" in words)

    forced = avx2_kernels and {"avx2", "fma"} <= words
    if forced:
        words = {w for w in words if not w.startswith(("avx512", "avx_vnni", "amx"))}
    isa, fp32, int8, dot, why = _x86_isa(words, _one_vector_multiplier(first))
    if forced:
        isa = (*isa, "AVX2 kernels forced")
        why.append("AVX2 kernels forced (bench/avx2_kernels.py): the runtimes run with "
                   "AVX-512 and VNNI off, on this CPU's cores and clock")
    pairs = {(p.get("physical id"), p.get("core id")) for p in procs
             if p.get("core id") is not None}
    cores = len(pairs) if pairs else logical
    cores_note = (f"{cores} physical cores of the {logical} logical CPUs this process may "
                  "use (SMT siblings share their FMA units)" if cores != logical
                  else f"{cores} cores this process may use")
    model = first.get("model name") or platform.processor() or "unknown x86 CPU"
    indices = [int(p["processor"]) for p in procs]
    mhz = max((_number(p.get("cpu mhz")) for p in procs), default=0.0)
    if indices and all(khz.get(i, 0) > 0 for i in indices):
        ghz = max(khz[i] for i in indices) / 1e6
        source = "cpufreq cpuinfo_max_freq"
    elif mhz > 0:  # some VMs print 0.000
        ghz = mhz / 1000
        source = "'cpu MHz' in /proc/cpuinfo (the current clock; turbo may be higher)"
    elif _number(first.get("bogomips")) > 0:
        ghz = _number(first.get("bogomips")) / 2000
        source = "BogoMIPS / 2 (on x86 twice the TSC clock in MHz)"
    else:
        ghz, source = None, "unknown (no cpufreq, cpu MHz or BogoMIPS)"
    group = CoreGroup(cores, model, ghz, fp32, int8)
    return CpuInfo(model=model, arch=machine or "x86_64", logical_cpus=logical, cores=cores,
                   isa=isa, int8_dot=dot, groups=(group,), clock_source=source,
                   assumptions=(cores_note, *why), aes="aes" in words)


def estimate_peak(cpu: CpuInfo) -> PeakEstimate:
    """Peak GMAC/s for fp32 and int8: the sum over core groups of cores x GHz x
    MACs/cycle. None when a group's clock is unknown."""
    if any(g.ghz is None for g in cpu.groups) or not cpu.groups:
        return PeakEstimate(None, None, "clock unknown")
    fp32 = sum(g.count * (g.ghz or 0) * g.fp32_macs for g in cpu.groups)
    int8 = sum(g.count * (g.ghz or 0) * g.int8_macs for g in cpu.groups)
    formula = " + ".join(f"{g.count} cores x {g.ghz:.2f} GHz x {g.fp32_macs} (fp32) / "
                         f"{g.int8_macs} (int8) MACs per cycle per core" for g in cpu.groups)
    return PeakEstimate(round(fp32, 1), round(int8, 1), formula)


def avx2_kernels_forced() -> bool:
    """True under ``bench/avx2_kernels.py``, whose runtimes run their AVX2 kernels."""
    return os.environ.get("IOMT_AVX2_KERNELS") == "1"


def _read(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None


def usable_cpus() -> int:
    """Logical CPUs this process may run on (its affinity mask; elsewhere all of them)."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def read_cpu() -> CpuInfo:
    """Identify this machine's CPU (Linux: /proc and /sys; elsewhere what ``platform``
    says, with the peak unknown)."""
    try:
        allowed: set[int] | None = set(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        allowed = None
    max_khz: dict[int, int] = {}
    for index in sorted(allowed) if allowed else range(os.cpu_count() or 1):
        text = _read(SYS_CPU / f"cpu{index}" / "cpufreq" / "cpuinfo_max_freq")
        if text and text.strip().isdigit():
            max_khz[index] = int(text.strip())
    board = _read(Path("/proc/device-tree/model"))
    return identify(_read(Path("/proc/cpuinfo")) or "", max_khz=max_khz, allowed=allowed,
                    machine=platform.machine(),
                    board=board.strip("\x00\n ") if board else None,
                    avx2_kernels=avx2_kernels_forced())
