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
    python bench/avx2_instructions.py --file onnxruntime:variant.int8.onnx [--channels 5]

``--file`` counts one model file instead (a variant not in any bundle yet), on a seeded
random input of ``--channels`` x 256 x 256.

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
from pathlib import Path
import numpy as np
from agent.backends import RunnerOptions, open_runner
from agent.model.bundle import load_bundle
source, runtime, precision, runs = Path(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4])
if source.is_dir():
    bundle = load_bundle(source)
    path = (bundle.backend_file(runtime).path if precision == "int8"
            else bundle.reference_file(runtime).path)
    names = (bundle.input.input_name, bundle.output.output_name)
    x = np.load(bundle.root / bundle.golden.path)["input"][:1].astype(np.float32)
else:  # one model file: a seeded random input of --channels x 256 x 256
    path, names = source, ("input", "output")
    x = np.random.default_rng(0).random((1, int(sys.argv[5]), 256, 256), dtype=np.float32)
runner = open_runner(runtime, str(path), RunnerOptions(
    intra_op_threads=1, input_name=names[0], output_name=names[1]))
for _ in range(runs):
    runner.run(x)
"""


def count(bundle: Path, runtime: str, precision: str, runs: int, tool: list[str],
          out: Path, channels: int = 1) -> int:
    """Instructions executed by one child (valgrind's total). ``bundle``: a bundle
    directory, or one model file (then ``precision`` is only a label)."""
    cmd = ["valgrind", *tool, "-q", sys.executable, "-c", CHILD, str(bundle), runtime,
           precision, str(runs), str(channels)]
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
            work: Path, channels: int = 1) -> dict[str, object]:
    name = f"{bundle.name}-{runtime}-{precision}"
    tool = "callgrind" if kernels else "cachegrind"
    totals = []
    for k, r in enumerate((1, runs)):
        out = work / f"{name}.{k}.out"
        opts = [f"--tool={tool}", f"--{tool}-out-file={out}"]
        if tool == "cachegrind":
            opts.append("--cache-sim=no")
        totals.append(count(bundle, runtime, precision, r, opts, out, channels))
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
                        help="bundle directories (default: every bundle under models/)")
    parser.add_argument("--runs", type=int, default=3, help="inferences in the long child")
    parser.add_argument("--kernels", type=int, default=0,
                        help="list this many top functions per cell (callgrind; slower)")
    parser.add_argument("--file", action="append", default=[], metavar="RUNTIME:PATH",
                        help="also count one model file (onnxruntime:x.onnx, litert:x.tflite) "
                             "on a seeded random input; repeatable")
    parser.add_argument("--channels", type=int, default=1,
                        help="input channels of the --file models (default 1)")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args()
    files = []
    for spec in args.file:
        runtime, _, path = spec.partition(":")
        if runtime not in ("onnxruntime", "litert") or not Path(path).is_file():
            raise SystemExit(f"--file {spec!r}: expected onnxruntime:PATH or litert:PATH "
                             "of an existing file")
        files.append((runtime, Path(path).resolve()))
    # Without bundle arguments: every shipped bundle, unless only files were asked for.
    bundles = args.bundles or ([] if files else
                               sorted(p.parent for p in (ROOT / "models").glob("*/bundle.json")))
    if platform.machine() not in ("x86_64", "AMD64"):
        raise SystemExit("valgrind's AVX2 model applies to x86-64 hosts only")
    if shutil.which("valgrind") is None:
        raise SystemExit("valgrind is not installed (Debian package: valgrind)")
    if args.runs < 2:
        raise SystemExit("--runs must be at least 2")
    rows = []
    cells = [(b.resolve(), rt, p, 1) for b in bundles for rt, p in CELLS]
    cells += [(path, rt, "file", args.channels) for rt, path in files]
    with tempfile.TemporaryDirectory() as tmp:
        for source, runtime, precision, channels in cells:
            row = measure(source, runtime, precision, args.runs, args.kernels, Path(tmp),
                          channels)
            rows.append(row)
            print(f"{row['bundle']:<22} {runtime:<12} {precision:<5} "
                  f"{row['ginstr_per_inference']:7.3f} G instructions", flush=True)
            for k in row.get("kernels", []):  # type: ignore[attr-defined]
                print(f"    {k['ginstr_per_inference']:7.3f}  {k['function']}")
    if bundles:
        print()
        print("| bundle | runtime | fp32 G instr | int8 G instr | int8 / fp32 |")
        print("|---|---|---|---|---|")
    for bundle in bundles:
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
