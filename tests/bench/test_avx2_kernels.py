"""bench/avx2_kernels.py: the installed runtimes, patched onto their AVX2 kernels.

The proof is numeric and holds on every x86-64 host the tool supports (AVX2 + FMA, no
AVX-VNNI): on an AVX-512 VNNI host the patch is what makes onnxruntime's u8s8 kernel
saturate, on an AVX2-only host it saturates anyway, so either way the patched copy must give
the AVX2 kernel's value and a command run through the tool must import that copy. On a host
the tool refuses (AVX-VNNI, no AVX2), the refusal is what is asserted.
"""

from __future__ import annotations

import os
import platform
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from agent.cpu import identify, read_cpu
from bench import avx2_kernels

X86 = platform.machine() in ("x86_64", "AMD64")
REFUSAL = avx2_kernels.host_refusal(avx2_kernels.cpu_flags()) if X86 else "not x86-64"
needs_x86 = pytest.mark.skipif(not X86 or shutil.which("objdump") is None or bool(REFUSAL),
                               reason=f"patches x86-64 code; needs objdump (binutils); "
                                      f"refused here: {REFUSAL or 'no'}")


PrepareRuns = tuple[Path, list[dict[str, dict[str, int]]]]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> PrepareRuns:
    """Two runs preparing the same fresh directory at once (as two test workers or two
    benches would): one builds, the other waits for it and reuses the result."""
    path = tmp_path_factory.mktemp("avx2-kernels")
    with ThreadPoolExecutor(2) as pool:
        runs = list(pool.map(lambda _: avx2_kernels.prepare(path, packages=("onnxruntime",)),
                             range(2)))
    return path, runs


@pytest.fixture(scope="module")
def site(prepared: PrepareRuns) -> Path:
    return prepared[0]


@needs_x86
def test_runs_preparing_one_directory_at_once_share_one_build(prepared: PrepareRuns) -> None:
    path, (first, second) = prepared
    assert first == second and first["onnxruntime"]
    assert avx2_kernels.check(path) == avx2_kernels.SATURATED


@needs_x86
def test_patched_onnxruntime_runs_the_saturating_avx2_kernel(site: Path) -> None:
    assert avx2_kernels.check(site) == avx2_kernels.SATURATED
    stamp = (site / ".onnxruntime.json").read_text()
    assert "onnxruntime_pybind11_state" in stamp  # the library Python loads was patched


@needs_x86
def test_only_the_patched_libraries_are_copies(site: Path) -> None:
    files = [p for p in (site / "onnxruntime").rglob("*") if p.is_file()]
    copies = [p for p in files if not p.is_symlink()]
    assert copies and all(".so" in p.name for p in copies)
    assert any(p.name == "__init__.py" and p.is_symlink() for p in files)


@needs_x86
def test_a_command_sees_the_patched_copy_and_the_forced_cpu(
        site: Path, capfd: pytest.CaptureFixture[str]) -> None:
    code = ("import os, onnxruntime, agent.cpu as c, bench.avx2_kernels as k; "
            "print(onnxruntime.__file__); print(c.read_cpu().int8_dot); "
            "print(os.environ['OPENSSL_ia32cap']); print(k.numpy_avx512_targets() == "
            "os.environ.get('NPY_DISABLE_CPU_FEATURES', '').split())")
    rc = avx2_kernels.main(["--dir", str(site), "--", "python", "-c", code])
    out, err = capfd.readouterr()
    assert rc == 0
    origin, dot, openssl, numpy_masked = out.split()
    assert Path(origin).is_relative_to(site)
    assert dot == "None"  # no int8 dot product reported while AVX2 kernels are forced
    assert openssl == avx2_kernels.OPENSSL_AVX2_ONLY  # OpenSSL's AVX-512 paths off
    assert numpy_masked == "True"  # numpy's AVX-512 targets named, whatever this CPU has
    assert f"fingerprint {avx2_kernels.SATURATED}" in err


@pytest.mark.skipif(not X86 or not REFUSAL, reason="the tool serves this CPU (tests above)")
def test_a_refused_cpu_gets_the_reason(tmp_path: Path) -> None:
    with pytest.raises(avx2_kernels.PatchError, match=REFUSAL[:30]):
        avx2_kernels.prepare(tmp_path)


def test_which_cpus_the_patch_cannot_serve() -> None:
    assert avx2_kernels.host_refusal({"avx2", "fma", "avx512f", "avx512_vnni"}) == ""
    assert avx2_kernels.host_refusal({"avx2", "fma"}) == ""
    assert "AVX-VNNI" in avx2_kernels.host_refusal({"avx2", "fma", "avx_vnni"})
    assert "no AVX2" in avx2_kernels.host_refusal({"sse2", "avx"})
    assert avx2_kernels.host_refusal(set()) == ""  # unknown: the fingerprint decides


def test_numpy_and_openssl_masks_name_only_avx512_paths() -> None:
    assert all(t == "X86_V4" or t.startswith("AVX512") for t in avx2_kernels.numpy_avx512_targets())
    mask = int(avx2_kernels.OPENSSL_AVX2_ONLY.removeprefix(":~"), 16)
    ebx, ecx = mask & 0xFFFFFFFF, mask >> 32
    assert ebx >> 16 & 1 and ebx >> 31 & 1  # AVX512F, AVX512VL
    assert not ebx >> 5 & 1 and not ebx >> 29 & 1  # AVX2 and SHA-NI stay
    assert ecx >> 11 & 1 and ecx >> 9 & 1  # AVX512VNNI, VAES (an AVX2-only EPYC: Zen 2)


def test_the_patch_touches_no_memory() -> None:
    # lea eax, [rcx + 7]: a register-only instruction of xgetbv's length
    assert bytes([0x8D, 0x41, 0x07]) == avx2_kernels.XCR0_AVX_ONLY
    assert len(avx2_kernels.XCR0_AVX_ONLY) == len(avx2_kernels.XGETBV)


def test_refuses_a_non_x86_host(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("platform.machine", lambda: "aarch64")
    with pytest.raises(avx2_kernels.PatchError, match=r"x86-64 only.*qemu"):
        avx2_kernels.prepare(tmp_path)


@needs_x86
def test_says_which_package_gives_objdump(tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("shutil.which", lambda _name: None)
    with pytest.raises(avx2_kernels.PatchError, match="binutils"):
        avx2_kernels.prepare(tmp_path, packages=("onnxruntime",))


def test_a_command_or_check_is_required(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        avx2_kernels.main([])
    assert exit_info.value.code == 2
    assert "give a command" in capsys.readouterr().err


VNNI_CPUINFO = """processor\t: 0
model name\t: AMD EPYC
flags\t\t: fpu sse2 avx avx2 fma avx512f avx512bw avx512_vnni amx_int8
cpu MHz\t\t: 2600.000
"""


def test_forced_avx2_drops_avx512_and_vnni_from_the_reading() -> None:
    native = identify(VNNI_CPUINFO, machine="x86_64")
    forced = identify(VNNI_CPUINFO, machine="x86_64", avx2_kernels=True)
    assert native.int8_dot == "AVX-512 VNNI"
    assert forced.int8_dot is None
    assert forced.isa == ("AVX2", "FMA", "AVX2 kernels forced")
    assert forced.groups[0].fp32_macs == 16 and forced.groups[0].int8_macs == 32
    assert any("bench/avx2_kernels.py" in a for a in forced.assumptions)


def test_read_cpu_follows_the_tool_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IOMT_AVX2_KERNELS", "1")
    forced = read_cpu()
    monkeypatch.delenv("IOMT_AVX2_KERNELS")
    if "avx2" in (Path("/proc/cpuinfo").read_text() if os.path.exists("/proc/cpuinfo")
                  else ""):
        assert forced.int8_dot is None and "AVX2 kernels forced" in forced.isa
