"""Instruction counts of one inference on the AVX2 code paths, on any x86 host.

Why: the int8 kernels that onnxruntime (MLAS) and LiteRT (XNNPACK) pick depend on the CPU,
and most edge nodes have no int8 dot product (no VNNI on x86, no ``asimddp`` on a Pi 4).
A build machine with AVX-512 VNNI cannot time those paths. Valgrind's CPU model has no
AVX-512, so under valgrind both runtimes dispatch to their AVX2 kernels (FMA for fp32,
``vpmaddubsw``/``vpmaddwd`` for int8) whatever the host has. Valgrind counts instructions,
not seconds: repeatable, untouched by other load on the machine, and a fair proxy for the
compute-bound share of the time (it shows neither memory stalls nor IPC differences).

For each bundle x runtime x precision the model runs ``--runs`` times and once in a second
child; the difference divided by ``runs - 1`` is one inference (imports, session creation
and the first run's allocations cancel out). With ``--kernels`` callgrind also lists the
functions that execute most instructions in one inference (the kernels that dominate: int8
GEMMs, float convolutions, quantize/dequantize steps that stay in float).

    python bench/avx2_instructions.py --json bench-out/avx2.json [--kernels 8]

Needs valgrind (Debian package ``valgrind``). Slow: about a minute per cell.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CELLS = (("onnxruntime", "fp32"), ("onnxruntime", "int8"), ("litert", "fp32"),
         ("litert", "int8"))

CHILD = """
import sys
import numpy as np
from agent.backends import RunnerOptions, open_runner
from agent.model.bundle import load_bundle
bundle = load_bundle(sys.argv[1])
runtime, precision, runs = sys.argv[2], sys.argv[3], int(sys.argv[4])
path = (bundle.backend_file(runtime).path if precision == "int8"
        else bundle.reference_file(runtime).path)
runner = open_runner(runtime, str(path), RunnerOptions(
    intra_op_threads=1, input_name=bundle.input.input_name,
    output_name=bundle.output.output_name))
x = np.load(bundle.root / bundle.golden.path)["input"][:1].astype(np.float32)
for _ in range(runs):
    runner.run(x)
"""


def count(bundle: Path, runtime: str, precision: str, runs: int, tool: list[str],
          out: Path) -> int:
    """Instructions executed by one child (valgrind's total)."""
    cmd = ["valgrind", *tool, "-q", sys.executable, "-c", CHILD, str(bundle), runtime,
           precision, str(runs)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, cwd=ROOT)
    if proc.returncode != 0:
        raise SystemExit(f"{bundle.name} {runtime} {precision}: valgrind failed:\n"
                         f"{proc.stderr[-2000:]}")
    text = out.read_text(encoding="utf-8")
    m = re.search(r"^summary:\s+(\d+)", text, re.MULTILINE)
    if not m:
        raise SystemExit(f"no summary line in {out}")
    return int(m.group(1))


def top_kernels(out: Path, n: int) -> list[tuple[str, int]]:
    """The ``n`` functions with the most instructions (inclusive of nothing: self cost)."""
    proc = subprocess.run(["callgrind_annotate", "--threshold=100", str(out)],
                          capture_output=True, text=True, check=True)
    rows: list[tuple[str, int]] = []
    for line in proc.stdout.splitlines():
        m = re.match(r"\s*([\d,]+)\s+\([\s\d.]+%\)\s+(.*)$", line)
        if m and "PROGRAM TOTALS" not in line:
            rows.append((m.group(2).split(" [")[0][-90:], int(m.group(1).replace(",", ""))))
    return rows[:n]


def measure(bundle: Path, runtime: str, precision: str, runs: int, kernels: int,
            work: Path) -> dict[str, object]:
    name = f"{bundle.name}-{runtime}-{precision}"
    tool = "callgrind" if kernels else "cachegrind"
    totals = []
    for k, r in enumerate((1, runs)):
        out = work / f"{name}.{k}.out"
        opts = [f"--tool={tool}", f"--{tool}-out-file={out}"]
        if tool == "cachegrind":
            opts.append("--cache-sim=no")
        totals.append(count(bundle, runtime, precision, r, opts, out))
    per_run = (totals[1] - totals[0]) / (runs - 1)
    row: dict[str, object] = {"bundle": bundle.name, "runtime": runtime,
                              "precision": precision, "ginstr_per_inference": per_run / 1e9}
    if kernels:
        one = dict(top_kernels(work / f"{name}.0.out", 400))
        many = top_kernels(work / f"{name}.1.out", 400)
        row["kernels"] = [
            {"function": f, "ginstr_per_inference": (c - one.get(f, 0)) / (runs - 1) / 1e9}
            for f, c in many[:kernels]
        ]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundles", nargs="*", type=Path,
                        default=sorted(p.parent for p in (ROOT / "models").glob("*/bundle.json")))
    parser.add_argument("--runs", type=int, default=3, help="inferences in the long child")
    parser.add_argument("--kernels", type=int, default=0,
                        help="list this many top functions per cell (callgrind; slower)")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args()
    if platform.machine() not in ("x86_64", "AMD64"):
        raise SystemExit("valgrind's AVX2 model applies to x86-64 hosts only")
    if shutil.which("valgrind") is None:
        raise SystemExit("valgrind is not installed (Debian package: valgrind)")
    if args.runs < 2:
        raise SystemExit("--runs must be at least 2")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for bundle in args.bundles:
            for runtime, precision in CELLS:
                row = measure(bundle.resolve(), runtime, precision, args.runs, args.kernels,
                              Path(tmp))
                rows.append(row)
                print(f"{row['bundle']:<22} {runtime:<12} {precision:<5} "
                      f"{row['ginstr_per_inference']:7.3f} G instructions", flush=True)
                for k in row.get("kernels", []):  # type: ignore[attr-defined]
                    print(f"    {k['ginstr_per_inference']:7.3f}  {k['function']}")
    print()
    print("| bundle | runtime | fp32 G instr | int8 G instr | int8 / fp32 |")
    print("|---|---|---|---|---|")
    for bundle in args.bundles:
        for runtime in ("onnxruntime", "litert"):
            f32, i8 = (next(r["ginstr_per_inference"] for r in rows
                            if r["bundle"] == bundle.resolve().name and r["runtime"] == runtime
                            and r["precision"] == p) for p in ("fp32", "int8"))
            print(f"| {bundle.resolve().name} | {runtime} | {f32:.3f} | {i8:.3f} | "
                  f"{i8 / f32:.2f} |")  # type: ignore[operator]
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"isa": "AVX2 code paths (valgrind)", "rows": rows},
                                        indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
