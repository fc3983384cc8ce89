"""``make test-cpus``: the int8 guard on every shipped bundle x runtime, and the tests that
quantize their own small models, on the CPU classes edge nodes have.

Columns (``--cpus``, all by default):

* ``native``: this machine, the project's own venv (on the build server: AVX-512 VNNI);
* ``haswell``: the same venv python under ``qemu-x86_64 -cpu Haswell`` (AVX2 + FMA, no
  AVX-512, no VNNI; qemu's TCG cannot emulate AVX-512, so VNNI is covered by ``native``
  only when this machine has it);
* ``cortex-a72`` (no dot product, Raspberry Pi 4) and ``cortex-a76`` (dot product, Pi 5):
  an arm64 Debian rootfs under ``qemu-aarch64`` (see ``rootfs.py``), named cores only
  (``-cpu max`` brings SME kernels that LiteRT gets wrong under qemu).

Emulation says nothing about speed; it runs the kernels a real CPU of that kind picks, so
it shows saturation and wrong numerics. Exit 0: every cell passes; 1: a guard row, a test
or a CPU check failed; 2: the emulation could not be set up. Needs root (chroot, mounts).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import platform
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tools.cpu_matrix import report, rootfs

REPO = Path(__file__).resolve().parents[2]
X86_CPUS = ("native", "haswell")
ARM_CORES = ("cortex-a72", "cortex-a76")
ALL_CPUS = X86_CPUS + ARM_CORES
CELL_TIMEOUT_S = 3600  # a hung emulator fails its column instead of the whole run
QEMU_NOISE = "warning: TCG doesn't support requested feature"


def _stream(proc: subprocess.Popen[str]) -> None:
    """Pass a cell's stderr through, without qemu's per-start feature warnings."""
    assert proc.stderr is not None
    for line in proc.stderr:
        if QEMU_NOISE not in line:
            sys.stderr.write(line)


def _read_cell(out: Path, code: int | None, seconds: float) -> dict[str, Any]:
    try:
        cell: dict[str, Any] = json.loads(out.read_text())
    except (OSError, ValueError):
        cell = {}
    if code != 0:
        cell["error"] = ("timed out" if code is None else
                         f"the cell's process exited with {code} (killed by signal "
                         f"{-code})" if code < 0 else f"the cell's process exited with {code}")
    cell["seconds"] = round(seconds, 1)
    return cell


def run_x86(name: str, out: Path, tests: bool) -> dict[str, Any]:
    """The repo's venv python, natively or under qemu-x86_64."""
    cmd = [sys.executable, "-m", "tools.cpu_matrix.cell", "--out", str(out)]
    if not tests:
        cmd.append("--no-tests")
    if name == "haswell":
        cmd = ["qemu-x86_64-static", "-cpu", "Haswell", *cmd]
    out.unlink(missing_ok=True)
    started = time.monotonic()
    with subprocess.Popen(cmd, cwd=REPO, stdout=sys.stderr, stderr=subprocess.PIPE,
                          text=True) as proc:
        _stream(proc)
        try:
            code: int | None = proc.wait(CELL_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = None
    return _read_cell(out, code, time.monotonic() - started)


def run_arm(chroot: rootfs.Chroot, core: str, tests: bool) -> dict[str, Any]:
    """The rootfs's venv under ``QEMU_CPU=core``, with that core's /proc/cpuinfo."""
    env = {"QEMU_CPU": core}
    info = chroot.run("/usr/bin/python3", "-m", "tools.cpu_matrix.cpuinfo", core, env=env,
                      capture=True)
    if info.returncode != 0:
        return {"error": f"could not read the HWCAPs of {core} (exit {info.returncode})"}
    chroot.set_cpuinfo(info.stdout, core)
    out = chroot.root / "tmp" / f"iomt-cell-{core}.json"
    out.unlink(missing_ok=True)
    cmd = [f"{rootfs.VENV}/bin/python", "-m", "tools.cpu_matrix.cell", "--out",
           f"/tmp/{out.name}", *([] if tests else ["--no-tests"])]
    started = time.monotonic()
    try:
        code: int | None = chroot.run(*cmd, env=env, timeout=CELL_TIMEOUT_S).returncode
    except subprocess.TimeoutExpired:
        code = None
    return _read_cell(out, code, time.monotonic() - started)


@contextlib.contextmanager
def _locked() -> Iterator[None]:
    """One matrix at a time per cache (CI and a developer may share the machine)."""
    rootfs.cache_dir().mkdir(parents=True, exist_ok=True)
    with (rootfs.cache_dir() / "lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _terminate(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)  # unwinds through the finally that unmounts


def run_matrix(cpus: list[str], tests: bool, timings: dict[str, float]) -> dict[str, Any]:
    cells: dict[str, dict[str, Any]] = {}
    scratch = rootfs.cache_dir()
    for name in (c for c in cpus if c in X86_CPUS):
        rootfs.log(f"column {name}")
        started = time.monotonic()
        cells[name] = run_x86(name, scratch / f"cell-{name}.json", tests)
        timings[name] = time.monotonic() - started
    cores = [c for c in cpus if c in ARM_CORES]
    if not cores:
        return cells
    started = time.monotonic()
    rootfs.ensure_binfmt()
    built = not (rootfs.root_dir() / rootfs.STAMP).exists()
    root = rootfs.ensure_rootfs()
    timings["rootfs" + (" (built)" if built else " (cached)")] = time.monotonic() - started
    chroot = rootfs.Chroot(root)
    try:
        chroot.open()
        rootfs.copy_source(REPO, root)
        started = time.monotonic()
        rootfs.ensure_venv(chroot, REPO)
        timings["venv"] = time.monotonic() - started
        for core in cores:
            rootfs.log(f"column {core} (qemu-aarch64)")
            started = time.monotonic()
            cells[core] = run_arm(chroot, core, tests)
            timings[core] = time.monotonic() - started
    finally:
        chroot.close()
    return cells


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.cpu_matrix",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--cpus", default=",".join(ALL_CPUS),
                        help=f"comma-separated columns (default: {','.join(ALL_CPUS)})")
    parser.add_argument("--json", type=Path, default=REPO / "bench-out/cpus.json")
    parser.add_argument("--no-tests", action="store_true", help="the guard rows only")
    args = parser.parse_args(argv)
    cpus = [c.strip() for c in args.cpus.split(",") if c.strip()]
    unknown = sorted(set(cpus) - set(ALL_CPUS))
    if unknown:
        parser.error(f"unknown CPU(s) {', '.join(unknown)}; known: {', '.join(ALL_CPUS)}")
    if platform.machine() != "x86_64":
        print("cpu-matrix: needs an x86-64 host (its venv runs the x86 columns)",
              file=sys.stderr)
        return 2
    if os.geteuid() != 0:
        print("cpu-matrix: needs root (chroot and bind mounts for the arm64 rootfs)",
              file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGHUP, _terminate)
    timings: dict[str, float] = {}
    started = time.monotonic()
    began = datetime.now(UTC).isoformat(timespec="seconds")
    try:
        with _locked():
            cells = run_matrix(cpus, not args.no_tests, timings)
    except rootfs.SetupError as exc:
        print(f"cpu-matrix: setup failed: {exc}", file=sys.stderr)
        return 2
    timings["total"] = time.monotonic() - started
    problems = [p for name, cell in cells.items() for p in report.judge(name, cell)]
    result = {"schema_version": 1, "started": began, "host": platform.node(),
              "cache": str(rootfs.cache_dir()), "ok": not problems, "problems": problems,
              "timings_s": {k: round(v, 1) for k, v in timings.items()}, "cells": cells}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1) + "\n")
    print(report.table(cells))
    print("times: " + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items()))
    for problem in problems:
        print(f"FAIL {problem}")
    print(f"{'PASS' if not problems else 'FAIL'}: {len(cells)} CPU(s); JSON in {args.json}")
    return 0 if not problems else 1
