"""The CPU matrix's own logic (``tools/cpu_matrix``), without emulation: the arm64
/proc/cpuinfo made from HWCAP bits, and the verdict that fails a column whose CPU is not
the one it stands for, a guard row under its floor, a failed test or a suite that does not
seal and open."""

from __future__ import annotations

from typing import Any

from tools.cpu_matrix import cpuinfo, report

# AT_HWCAP bits of qemu's cortex-a76 as getauxval reports them: fp asimd aes pmull sha1
# sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp.
A76_HWCAP = sum(1 << i for i in (0, 1, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 15, 16, 20))


def _row(ok: bool, psnr: float) -> dict[str, Any]:
    return {"bundle": "b", "runtime": "onnxruntime", "ok": ok, "worst_psnr_db": psnr,
            "floor_db": 50.0, "reason": "golden PSNR vs floor"}


def _sealing(ok: bool = True) -> dict[str, Any]:
    rows = [{"suite": "x25519-hkdfsha256-aes256gcm", "ok": True, "reason": ""},
            {"suite": "x25519-hkdfsha256-chacha20poly1305", "ok": ok,
             "reason": "" if ok else "InvalidTag: "}]
    return {"rows": rows, "ok": ok, "aes": False, "auto": "chacha20-poly1305"}


def _cell(cpu: dict[str, Any], ok: bool = True, tests_ok: bool = True,
          seal_ok: bool = True) -> dict[str, Any]:
    failed = {} if tests_ok else {"tests/t.py::x": {"outcome": "failed", "reason": "r"}}
    return {"cpu": cpu, "guard": [_row(ok, 54.0 if ok else 31.4)], "seal": _sealing(seal_ok),
            "tests": {"ok": tests_ok, "exit_code": 0 if tests_ok else 1,
                      "counts": {"passed": 3, "failed": len(failed)}, "not_passed": failed}}


def test_cpuinfo_features_come_from_the_hwcap_bits() -> None:
    assert cpuinfo.has_dotprod(A76_HWCAP)
    assert not cpuinfo.has_dotprod(A76_HWCAP & ~(1 << 20))
    text = cpuinfo.render("cortex-a76", A76_HWCAP, 0, cpus=2)
    blocks = text.strip().split("\n\n")
    assert len(blocks) == 2 and blocks[1].startswith("processor\t: 1\n")
    features = next(ln for ln in blocks[0].splitlines() if ln.startswith("Features"))
    assert features.split(":")[1].split() == [
        "fp", "asimd", "aes", "pmull", "sha1", "sha2", "crc32", "atomics", "fphp", "asimdhp",
        "cpuid", "asimdrdm", "lrcpc", "dcpop", "asimddp"]
    assert "CPU part\t: 0xd0b" in text and "CPU implementer\t: 0x41" in text
    assert "i8mm" in cpuinfo.feature_names(0, 1 << 13)


def test_a_column_passes_only_with_its_cpu_rows_and_tests() -> None:
    assert report.judge("cortex-a76", _cell({"dotprod": True})) == []
    wrong_cpu = report.judge("cortex-a72", _cell({"dotprod": True}))
    assert len(wrong_cpu) == 1 and "dotprod" in wrong_cpu[0]
    haswell = {"avx2": True, "fma3": True, "avx512f": False, "avx512vnni": False}
    assert report.judge("haswell", _cell(haswell)) == []
    assert report.judge("haswell", _cell({**haswell, "avx512vnni": True}))
    below = report.judge("haswell", _cell(haswell, ok=False))
    assert len(below) == 1 and "b on onnxruntime" in below[0]
    failed = report.judge("native", _cell({"avx2": True}, tests_ok=False))
    assert len(failed) == 1 and "tests/t.py::x" in failed[0]
    assert report.judge("native", {"cpu": {}, "error": "exited with -11"})  # a crash fails
    unsealed = report.judge("cortex-a72", _cell({"dotprod": False}, seal_ok=False))
    assert unsealed == ["cortex-a72: sealing with x25519-hkdfsha256-chacha20poly1305: "
                        "InvalidTag: "]
    no_seal = {k: v for k, v in _cell({"dotprod": False}).items() if k != "seal"}
    assert report.judge("cortex-a72", no_seal) == ["cortex-a72: no sealing results"]


def test_table_shows_each_cell_against_its_floor() -> None:
    cells = {"native": _cell({"avx512vnni": True}), "cortex-a72": _cell({"dotprod": False},
                                                                         ok=False)}
    text = report.table(cells)
    assert "AVX-512 VNNI" in text and "asimddp off" in text
    row = next(ln for ln in text.splitlines() if ln.startswith("b "))
    assert "54.00/50 PASS" in row and "31.40/50 FAIL" in row
    sealing = next(ln for ln in text.splitlines() if ln.startswith("sealing"))
    assert sealing.count("2/2 auto ChaCha20 PASS") == 2
