"""Run a command with onnxruntime and LiteRT on their AVX2 kernels, at native speed.

Why: the int8 kernels the runtimes pick depend on the CPU, and most edge nodes have no int8
dot product. A build machine with AVX-512 VNNI runs onnxruntime's VNNI kernels and cannot
time the ones an AVX2 node runs. ``bench/avx2_instructions.py`` counts those kernels'
instructions under valgrind; this tool times them.

How: both runtimes ask the CPU which register state the OS saves (the ``xgetbv``
instruction, XCR0) before they pick AVX-512 kernels. The tool makes a copy of each
runtime's Python package under ``--dir`` (symbolic links, except the shared libraries that
it patches) in which every ``xgetbv`` is replaced by ``lea eax, [rcx + 7]`` (``xgetbv``
reads XCR0 only with ecx = 0, so eax becomes 7; no memory is touched, the stack's red zone
included): XCR0 reads as x87 + SSE + AVX, so AVX2 and FMA stay on and every AVX-512 path,
AVX-512 VNNI included, is off. AVX-VNNI (the VEX-coded VNNI of recent Intel and AMD cores)
depends on AVX state only and cannot be switched off this way: on such a CPU the tool
refuses (time those kernels under valgrind, ``bench/avx2_instructions.py``).
Then it runs the command with that copy first on ``PYTHONPATH``.

The agent's own work beside the model runs on two more libraries that pick their code by
CPU: numpy (its dispatch targets read CPUID, not XCR0) and OpenSSL inside ``cryptography``
(the seal: AES-GCM, SHA-512 in Ed25519). The command also gets ``NPY_DISABLE_CPU_FEATURES``
naming numpy's AVX-512 targets and ``OPENSSL_ia32cap`` with the AVX-512 bits and VAES /
VPCLMULQDQ cleared (``OPENSSL_AVX2_ONLY``; the level of an AVX2-only EPYC, Zen 2), so decode,
resampling, the domain check and sealing run the code an AVX2 node runs too (on the build
machine, AMD EPYC Zen 4 with AVX-512 VNNI: AES-GCM of 8 MiB 0.8 -> 3.2 ms, SHA-512 10.6 ->
14.1 ms).

Proof that it took: before the command runs, a ``MatMulInteger`` of 255 x 127 over 64
terms runs on the patched onnxruntime. MLAS's AVX2 u8s8 kernel adds pairs of products in
16 bits and saturates (1,048,544); the VNNI kernels give the exact 2,072,640. The tool
stops unless the patched copy saturates. LiteRT (XNNPACK, through cpuinfo) reads XCR0 the
same way; there is no numeric fingerprint for it (its AVX2 int8 kernel widens to 16 bits
first and is exact), so the tool only reports how many sites it patched there.

What it is not: an AVX2 CPU. The kernels are the ones an AVX2 node runs, on this machine's
cores, caches and clock (say which, ``lscpu``). Ratios between paths inside one run are
the useful output, absolute times are this machine's. A measurement aid only: never serve
from the patched copy.

    python bench/avx2_kernels.py -- python -m agent.cli bench --quick
    python bench/avx2_kernels.py --check

Needs an x86-64 host and ``objdump`` (Debian package ``binutils``) to find the instructions.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import importlib.util
import json
import os
import platform
import re
import shutil
import struct
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("onnxruntime", "ai_edge_litert")
XGETBV = b"\x0f\x01\xd0"
XCR0_AVX_ONLY = b"\x8d\x41\x07"  # lea eax, [rcx + 7] (ecx = 0): XCR0 = x87 | SSE | AVX
SATURATED, EXACT = 32767 * 32, 255 * 127 * 64
# OpenSSL's second capability word is CPUID leaf 7: EBX in the low half, ECX in the high.
# Cleared: EBX AVX512F, DQ, IFMA, PF, ER, CD, BW, VL; ECX AVX512VBMI, VBMI2, VAES, VPCLMULQDQ,
# AVX512VNNI, BITALG, VPOPCNTDQ.
OPENSSL_AVX2_ONLY = ":~0x5E42DC230000"

FINGERPRINT = """
import numpy as np, onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper
w = numpy_helper.from_array(np.full((64, 16), 127, np.int8), "W")
graph = helper.make_graph(
    [helper.make_node("MatMulInteger", ["A", "W"], ["Y"])], "fingerprint",
    [helper.make_tensor_value_info("A", TensorProto.UINT8, [4, 64])],
    [helper.make_tensor_value_info("Y", TensorProto.INT32, [4, 16])], [w])
model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
model.ir_version = 8
session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
y = session.run(None, {"A": np.full((4, 64), 255, np.uint8)})[0]
try:
    from numpy._core._multiarray_umath import __cpu_dispatch__, __cpu_features__
except ImportError:  # numpy 1.x
    from numpy.core._multiarray_umath import __cpu_dispatch__, __cpu_features__
on = [t for t in __cpu_dispatch__ if __cpu_features__.get(t)]
print(ort.__file__, int(y[0, 0]), ",".join(on) or "-")
"""


class PatchError(RuntimeError):
    """The patched copy cannot be made or does not run the AVX2 kernels."""


def package_dir(name: str) -> Path | None:
    """The installed package's directory, without importing it."""
    spec = importlib.util.find_spec(name)
    if spec is None or spec.origin is None:
        return None
    return Path(spec.origin).parent


def original_package(src: Path) -> Path:
    """The installed package behind ``src``: itself, or, where ``src`` is another patched
    copy (a command already run through this tool, e.g. the test suite), the directory its
    symbolic links point into (only the shared libraries are copies)."""
    init = src / "__init__.py"
    return init.resolve().parent if init.is_symlink() else src


def load_segments(data: bytes) -> list[tuple[int, int, int]]:
    """(virtual address, file offset, size in file) of each PT_LOAD of a 64-bit ELF."""
    if data[:4] != b"\x7fELF" or data[4] != 2:
        raise PatchError("not a 64-bit ELF file")
    phoff, = struct.unpack_from("<Q", data, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
    segments = []
    for i in range(phnum):
        p_type, _flags, p_offset, p_vaddr, _paddr, p_filesz = struct.unpack_from(
            "<IIQQQQ", data, phoff + i * phentsize)
        if p_type == 1:
            segments.append((p_vaddr, p_offset, p_filesz))
    return segments


def xgetbv_offsets(lib: Path) -> list[int]:
    """File offsets of the real ``xgetbv`` instructions of a shared library (objdump's
    disassembly, so that the same three bytes inside other code or data are left alone)."""
    data = lib.read_bytes()
    if XGETBV not in data:
        return []
    objdump = shutil.which("objdump")
    if objdump is None:
        raise PatchError("objdump not found: install the Debian package binutils")
    try:
        listing = subprocess.run([objdump, "-d", "--no-show-raw-insn", str(lib)], check=True,
                                 capture_output=True, text=True).stdout
    except subprocess.CalledProcessError as e:
        raise PatchError(f"objdump failed on {lib.name}: {e.stderr.strip()[-200:]}") from e
    addresses = [int(m.group(1), 16)
                 for m in re.finditer(r"^\s*([0-9a-f]+):\s+xgetbv\s*$", listing, re.M)]
    offsets = []
    for address in addresses:
        found = [address - vaddr + offset for vaddr, offset, size in load_segments(data)
                 if vaddr <= address < vaddr + size]
        if not found:
            raise PatchError(f"{lib.name}: xgetbv at {address:#x} is in no loaded segment")
        offsets.append(found[0])
    for offset in offsets:
        if data[offset:offset + 3] != XGETBV:
            raise PatchError(f"{lib.name}: no xgetbv at file offset {offset:#x}")
    return offsets


def source_key(src: Path) -> str:
    """Changes when the installed package does (its shared libraries' names, sizes, mtimes)."""
    parts = [XCR0_AVX_ONLY.hex()] + [
        f"{p.relative_to(src)}:{p.stat().st_size}:{p.stat().st_mtime_ns}"
        for p in sorted(src.rglob("*.so*")) if p.is_file()]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def mirror(src: Path, dest: Path) -> dict[str, int]:
    """``dest``: ``src`` as symbolic links, with each library holding xgetbv patched."""
    if dest.exists():
        shutil.rmtree(dest)
    patched: dict[str, int] = {}
    for path in sorted(src.rglob("*")):
        target = dest / path.relative_to(src)
        if path.is_dir():
            target.mkdir(parents=True, exist_ok=True)
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        offsets = xgetbv_offsets(path) if ".so" in path.name else []
        if not offsets:
            target.symlink_to(path)
            continue
        data = bytearray(path.read_bytes())
        for offset in offsets:
            data[offset:offset + 3] = XCR0_AVX_ONLY
        target.write_bytes(bytes(data))
        target.chmod(path.stat().st_mode)
        patched[str(path.relative_to(src))] = len(offsets)
    return patched


def prepare(site: Path, packages: tuple[str, ...] = PACKAGES) -> dict[str, dict[str, int]]:
    """Patched copies of the installed runtimes under ``site`` (reused while the installed
    packages are unchanged); returns the patched instruction counts per library."""
    if platform.machine() not in ("x86_64", "AMD64"):
        raise PatchError(f"x86-64 only (this machine is {platform.machine()}): on ARM, "
                         "choose the core under qemu instead (tools/cpu_matrix.py)")
    refusal = host_refusal(cpu_flags())
    if refusal:
        raise PatchError(refusal)
    site = site.resolve()
    site.mkdir(parents=True, exist_ok=True)
    report: dict[str, dict[str, int]] = {}
    with (site / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # parallel runs wait for one build, not race it
        for name in packages:
            src = package_dir(name)
            if src is None:
                continue
            stamp = site / f".{name}.json"
            if src.resolve().is_relative_to(site) and stamp.exists():  # run under itself
                report[name] = json.loads(stamp.read_text())["patched"]
                continue
            src = original_package(src)  # under another patched copy: mirror the original
            key = source_key(src)
            if stamp.exists() and json.loads(stamp.read_text())["key"] == key \
                    and (site / name).exists():
                report[name] = json.loads(stamp.read_text())["patched"]
                continue
            patched = mirror(src, site / name)
            stamp.write_text(json.dumps({"key": key, "patched": patched}) + "\n")
            report[name] = patched
    if not report.get("onnxruntime"):
        raise PatchError("onnxruntime is not installed, or holds no xgetbv to patch")
    return report


def cpu_flags() -> set[str]:
    """The x86 flags of /proc/cpuinfo (empty where there is none)."""
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return set()
    match = re.search(r"^flags\s*:(.*)$", text, re.M)
    return set(match.group(1).split()) if match else set()


def host_refusal(flags: set[str]) -> str:
    """Why this CPU cannot run the AVX2 kernels through the patch ('' when it can)."""
    if not flags:
        return ""  # cannot tell: the fingerprint decides
    if not {"avx2", "fma"} <= flags:
        return "this CPU has no AVX2 + FMA, so there are no AVX2 kernels to time"
    if "avx_vnni" in flags:
        return ("this CPU has AVX-VNNI, which onnxruntime uses whatever XCR0 says: time the "
                "AVX2 kernels under valgrind instead (bench/avx2_instructions.py)")
    return ""


def patched_env(site: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(site), str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    env["IOMT_AVX2_KERNELS"] = "1"  # lets a bench label its output
    targets = numpy_avx512_targets()
    if targets:
        env["NPY_DISABLE_CPU_FEATURES"] = " ".join(targets)
    env["OPENSSL_ia32cap"] = OPENSSL_AVX2_ONLY
    return env


def numpy_avx512_targets() -> list[str]:
    """numpy's dispatch targets that need AVX-512 (X86_V4, AVX512_*), for
    ``NPY_DISABLE_CPU_FEATURES``; naming one numpy was not built for only warns, so the list
    comes from the numpy that the command runs (this interpreter's)."""
    for module in ("numpy._core._multiarray_umath", "numpy.core._multiarray_umath"):  # 2.x, 1.x
        try:
            dispatch: list[str] = list(importlib.import_module(module).__cpu_dispatch__)
            break
        except (ImportError, AttributeError):
            continue
    else:
        return []
    return [t for t in dispatch if needs_avx512(t)]


def needs_avx512(target: str) -> bool:
    """Whether a numpy dispatch target is an AVX-512 one."""
    return target == "X86_V4" or target.startswith("AVX512")


def check(site: Path) -> int:
    """The fingerprint's value on the patched onnxruntime; raises unless it saturated."""
    site = site.resolve()
    proc = subprocess.run([sys.executable, "-c", FINGERPRINT], env=patched_env(site),
                          check=False, capture_output=True, text=True)
    if proc.returncode != 0:
        raise PatchError("the fingerprint did not run: "
                         + (proc.stderr.strip().splitlines() or ["no output"])[-1])
    out = proc.stdout.split()
    origin, value, numpy_on = Path(out[0]), int(out[1]), out[2].split(",")
    if site not in origin.parents:
        raise PatchError(f"the command imported onnxruntime from {origin}, not from {site}")
    if value != SATURATED:
        raise PatchError(f"patched onnxruntime gave {value}, not the AVX2 kernel's "
                         f"saturated {SATURATED} (exact: {EXACT}): its kernels are not AVX2")
    wide = [t for t in numpy_on if needs_avx512(t)]
    if wide:
        raise PatchError(f"numpy still dispatches to {', '.join(wide)} under "
                         "NPY_DISABLE_CPU_FEATURES")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=ROOT / "build" / "avx2-kernels",
                        help="where the patched copies live (reused while the installed "
                             "runtimes are unchanged)")
    parser.add_argument("--check", action="store_true",
                        help="only prepare and prove the patched copy, run nothing")
    parser.add_argument("command", nargs=argparse.REMAINDER,
                        help="the command to run after '--'")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command and not args.check:
        parser.error("give a command after '--', or --check")
    site = args.dir.resolve()
    try:
        report = prepare(site)
        value = check(site)
    except PatchError as e:
        print(f"avx2_kernels: {e}", file=sys.stderr)
        return 2
    sites = ", ".join(f"{lib} {n}" for libs in report.values() for lib, n in libs.items())
    print(f"avx2_kernels: xgetbv patched ({sites}); onnxruntime u8s8 fingerprint {value} "
          f"= AVX2 kernel (VNNI would give {EXACT}); numpy without "
          f"{' '.join(numpy_avx512_targets()) or 'AVX-512 targets'}, OpenSSL without AVX-512 "
          "and VAES", file=sys.stderr)
    if args.check:
        return 0
    if command[0] in ("python", "python3"):
        command = [sys.executable, *command[1:]]
    return subprocess.run(command, env=patched_env(site), check=False).returncode


if __name__ == "__main__":
    sys.exit(main())
