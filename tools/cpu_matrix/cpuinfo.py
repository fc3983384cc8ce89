"""What the emulated arm64 CPU is: its HWCAP bits (``getauxval``) and an arm64-style
/proc/cpuinfo made from them.

qemu-user 7.2 does not emulate /proc/cpuinfo, so inside the chroot the host's x86 file
shows through, and onnxruntime's cpuinfo reader crashes on it. Run under qemu-aarch64 with
``QEMU_CPU`` set, ``python3 -m tools.cpu_matrix.cpuinfo CORE`` prints the file a Linux
kernel would show on that core: the ``Features`` line from the HWCAPs the emulator
reports (so it is what the runtimes' own getauxval probes see too), the ``CPU part`` from
the core's MIDR. Standard library only: it runs on the rootfs's Debian python.
"""

from __future__ import annotations

import ctypes
import os
import sys

AT_HWCAP, AT_HWCAP2 = 16, 26
# arch/arm64/include/uapi/asm/hwcap.h: bit i of AT_HWCAP / AT_HWCAP2 and its cpuinfo name.
HWCAP_NAMES = (
    "fp", "asimd", "evtstrm", "aes", "pmull", "sha1", "sha2", "crc32", "atomics", "fphp",
    "asimdhp", "cpuid", "asimdrdm", "jscvt", "fcma", "lrcpc", "dcpop", "sha3", "sm3", "sm4",
    "asimddp", "sha512", "sve", "asimdfhm", "dit", "uscat", "ilrcpc", "flagm", "ssbs", "sb",
    "paca", "pacg",
)
HWCAP2_NAMES = (
    "dcpodp", "sve2", "sveaes", "svepmull", "svebitperm", "svesha3", "svesm4", "flagm2",
    "frint", "svei8mm", "svef32mm", "svef64mm", "svebf16", "i8mm", "bf16", "dgh", "rng", "bti",
    "mte", "ecv", "afp", "rpres", "mte3", "sme", "sme_i16i64", "sme_f64f64", "sme_i8i32",
    "sme_f16f32", "sme_b16f32", "sme_f32f32", "sme_fa64", "wfxt",
)
ASIMDDP_BIT = HWCAP_NAMES.index("asimddp")
# MIDR fields of the cores the matrix uses (qemu target/arm/cpu64.c): implementer,
# variant, part, revision.
CORES = {
    "cortex-a53": (0x41, 0x0, 0xD03, 4),
    "cortex-a72": (0x41, 0x0, 0xD08, 3),
    "cortex-a76": (0x41, 0x4, 0xD0B, 1),
    "neoverse-n1": (0x41, 0x4, 0xD0C, 1),
}


def hwcaps() -> tuple[int, int]:
    """(AT_HWCAP, AT_HWCAP2) of this process: on qemu-user, the emulated core's."""
    libc = ctypes.CDLL(None)
    libc.getauxval.restype = ctypes.c_ulong
    libc.getauxval.argtypes = [ctypes.c_ulong]
    return int(libc.getauxval(AT_HWCAP)), int(libc.getauxval(AT_HWCAP2))


def feature_names(hwcap: int, hwcap2: int) -> list[str]:
    names = [n for i, n in enumerate(HWCAP_NAMES) if hwcap >> i & 1]
    return names + [n for i, n in enumerate(HWCAP2_NAMES) if hwcap2 >> i & 1]


def has_dotprod(hwcap: int) -> bool:
    """Armv8.2 int8 dot product (SDOT/UDOT), the bit int8 kernels choose by."""
    return bool(hwcap >> ASIMDDP_BIT & 1)


def render(core: str, hwcap: int, hwcap2: int, cpus: int) -> str:
    """An arm64 /proc/cpuinfo for ``cpus`` processors of ``core``."""
    implementer, variant, part, revision = CORES[core]
    features = " ".join(feature_names(hwcap, hwcap2))
    blocks = [
        f"processor\t: {i}\nBogoMIPS\t: 50.00\nFeatures\t: {features}\n"
        f"CPU implementer\t: 0x{implementer:02x}\nCPU architecture: 8\n"
        f"CPU variant\t: 0x{variant:x}\nCPU part\t: 0x{part:03x}\nCPU revision\t: {revision}\n"
        for i in range(cpus)
    ]
    return "\n".join(blocks) + "\n"


def main(argv: list[str]) -> int:
    if len(argv) != 1 or argv[0] not in CORES:
        print(f"usage: python3 -m tools.cpu_matrix.cpuinfo {{{','.join(CORES)}}}",
              file=sys.stderr)
        return 2
    hwcap, hwcap2 = hwcaps()
    cpus = len(os.sched_getaffinity(0))
    sys.stdout.write(render(argv[0], hwcap, hwcap2, cpus))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
