"""One CPU's column of the matrix, run by the interpreter under test (natively, under
``qemu-x86_64 -cpu Haswell``, or in the arm64 rootfs under ``qemu-aarch64``):

* what the CPU offers, as this process sees it (numpy's runtime dispatch flags on x86,
  ``getauxval(AT_HWCAP)`` on arm64): the evidence that the emulator gave the kernels the
  CPU we meant;
* the agent's own int8 guard (``agent.model.guard.verify_bundle``, what ``iomt-agent model
  verify`` and the agent at load run) on every bundle under ``models/`` x every runtime;
* the test files whose models are quantized here, on this CPU (``CELL_TESTS``), through
  pytest in this process, each test's outcome recorded;
* a result sealed and opened with every envelope suite (``seal_rows``): OpenSSL picks its
  AES, GHASH, ChaCha20 and SHA-512 code by the CPU as the runtimes pick their int8 kernels,
  and ``seal.aead = "auto"`` picks the AEAD by it.

``python -m tools.cpu_matrix.cell --out FILE [--no-tests]`` from the repository root
writes one JSON object. A cell never stops at a failing guard or test: each is a row.
"""

from __future__ import annotations

import argparse
import importlib
import itertools
import json
import math
import platform
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
# The tests that quantize small models themselves and judge them with the guard. Their
# tests of the shipped bundles are left out (DESELECT): the guard rows run the same check on
# the same files, and under emulation they are the slowest third of these files.
CELL_TESTS = ("tests/model/test_guard.py", "tests/backends/test_litert.py",
              "tests/quantize/test_quantize.py", "tests/quantize/test_nhwc.py",
              "tests/quantize/test_pair_weights.py")
DESELECT = "not shipped"


def cpu_identity() -> dict[str, Any]:
    """The instruction sets int8 kernels choose by, as seen from inside this process."""
    machine = platform.machine()
    if machine in ("aarch64", "arm64"):
        from tools.cpu_matrix.cpuinfo import feature_names, has_dotprod, hwcaps

        hwcap, hwcap2 = hwcaps()
        return {"machine": machine, "hwcap": hex(hwcap), "hwcap2": hex(hwcap2),
                "dotprod": has_dotprod(hwcap), "i8mm": "i8mm" in feature_names(hwcap, hwcap2),
                "features": feature_names(hwcap, hwcap2)}
    # numpy's runtime dispatch flags: what CPUID says in this process (the emulated CPU's),
    # unlike /proc/cpuinfo, which qemu-user leaves as the host's.
    try:
        umath = importlib.import_module("numpy._core._multiarray_umath")
    except ImportError:  # numpy 1.x
        umath = importlib.import_module("numpy.core._multiarray_umath")
    feats: dict[str, bool] = umath.__cpu_features__
    keys = ("AVX2", "FMA3", "AVX512F", "AVX512BW", "AVX512VNNI")
    return {"machine": machine, **{k.lower(): bool(feats.get(k)) for k in keys}}


def _number(value: float | None) -> float | str | None:
    if value is None or math.isnan(value):
        return None
    return "inf" if math.isinf(value) else round(value, 3)


def _db(value: Any) -> str:
    return f"{value:.2f}" if isinstance(value, (int, float)) else str(value)


def guard_rows() -> list[dict[str, Any]]:
    """``verify_bundle`` on every shipped bundle x runtime; a runtime that is missing or
    cannot open the file is a failed row, not a skipped one."""
    from agent.backends import RUNTIMES, runtime_installed
    from agent.model.bundle import BundleError, load_bundle
    from agent.model.guard import verify_bundle

    rows = []
    for path in sorted(p.parent for p in (REPO / "models").glob("*/bundle.json")):
        for runtime in RUNTIMES:
            row: dict[str, Any] = {"bundle": path.name, "runtime": runtime}
            started = time.monotonic()
            try:
                bundle = load_bundle(path)
                row["version"] = bundle.version
                if runtime not in bundle.backends:
                    row.update(ok=False, reason=f"the bundle has no {runtime} file")
                elif not runtime_installed(runtime):
                    row.update(ok=False, reason=f"{runtime} is not installed here")
                else:
                    report = verify_bundle(path, runtime=runtime)
                    row.update(ok=report.ok, worst_psnr_db=_number(report.worst_psnr_db),
                               floor_db=report.min_psnr_db, reason=report.reason)
            except Exception as exc:  # BundleError, BackendError, a runtime's own errors
                kind = "bundle" if isinstance(exc, BundleError) else "runtime"
                row.update(ok=False, reason=f"{kind} error: {type(exc).__name__}: {exc}")
            row["seconds"] = round(time.monotonic() - started, 1)
            rows.append(row)
            print(f"  {path.name} {runtime}: {'PASS' if row['ok'] else 'FAIL'} "
                  f"{_db(row.get('worst_psnr_db'))} dB", file=sys.stderr, flush=True)
    return rows


class _Outcomes:
    """A pytest plugin that keeps each test's outcome (a failing setup counts as failed)."""

    def __init__(self) -> None:
        self.results: dict[str, dict[str, str]] = {}

    def pytest_runtest_logreport(self, report: Any) -> None:
        if report.when == "call" or report.outcome != "passed":
            entry = {"outcome": report.outcome, "seconds": f"{report.duration:.1f}"}
            if report.outcome == "skipped" and isinstance(report.longrepr, tuple):
                entry["reason"] = str(report.longrepr[2])
            elif report.outcome == "failed":
                entry["reason"] = str(getattr(report.longrepr, "reprcrash", "") or "")[:400]
            self.results.setdefault(report.nodeid, entry)


def test_rows() -> dict[str, Any]:
    """The quantizing test files on this CPU, through pytest in this process."""
    import pytest

    outcomes = _Outcomes()
    started = time.monotonic()
    code = pytest.main(["-q", "-p", "no:cacheprovider", "--no-header", "-k", DESELECT,
                        *CELL_TESTS], plugins=[outcomes])
    counts: dict[str, int] = {}
    for entry in outcomes.results.values():
        counts[entry["outcome"]] = counts.get(entry["outcome"], 0) + 1
    return {"files": list(CELL_TESTS), "deselect": DESELECT, "exit_code": int(code),
            "counts": counts,
            "ok": int(code) == 0 and counts.get("failed", 0) == 0 and bool(outcomes.results),
            "seconds": round(time.monotonic() - started, 1),
            "slowest": sorted(outcomes.results, key=lambda k: -float(
                outcomes.results[k]["seconds"]))[:5],
            "not_passed": {k: v for k, v in outcomes.results.items()
                           if v["outcome"] != "passed"}}


def seal_rows() -> dict[str, Any]:
    """A 133 kB result sealed and opened with each KEM x AEAD x envelope version on this
    CPU, and the AEAD that ``seal.aead = "auto"`` picks here."""
    import os

    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from agent.cpu import read_cpu
    from agent.crypto import keys, seal
    from agent.crypto.aead_choice import choose_aead

    plaintext = os.urandom(133_000)
    device = Ed25519PrivateKey.generate()
    rows = []
    for (suite, (kind, aead)), version in itertools.product(seal.SUITES.items(),
                                                            seal.VERSIONS):
        row: dict[str, Any] = {"suite": suite, "version": version}
        try:
            private, public = keys.generate_recipient_keypair(kind)
            envelope = seal.seal(plaintext, recipient=public, signing_key=device,
                                 device_id="cell", message_id="m-1", aead=aead,
                                 version=version)
            opened = seal.open_envelope(envelope, recipients={private.key_id: private},
                                        trusted_devices={"cell": device.public_key()})
            row["ok"] = (opened.plaintext, opened.suite, opened.v) == (plaintext, suite, version)
            row["reason"] = "" if row["ok"] else "opened to other bytes or another suite"
        except Exception as exc:  # a crypto backend's own errors included
            row.update(ok=False, reason=f"{type(exc).__name__}: {exc}")
        rows.append(row)
    choice = choose_aead("auto")
    print(f"  sealing: {sum(r['ok'] for r in rows)}/{len(rows)} suite x version open; auto "
          f"picks "
          f"{choice.aead}", file=sys.stderr, flush=True)
    return {"rows": rows, "ok": all(r["ok"] for r in rows), "aes": read_cpu().aes,
            "auto": choice.aead}


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {"python": platform.python_version()}
    for name in ("numpy", "onnxruntime", "ai-edge-litert", "onnx"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = "-"
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--no-tests", action="store_true", help="the guard rows only")
    args = parser.parse_args(argv)
    result: dict[str, Any] = {"cpu": cpu_identity(), "versions": versions()}
    args.out.write_text(json.dumps(result))  # what the CPU is, even if a runtime crashes
    result["guard"] = guard_rows()
    result["seal"] = seal_rows()
    args.out.write_text(json.dumps(result))
    if not args.no_tests:
        result["tests"] = test_rows()
    args.out.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
