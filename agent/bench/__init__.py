"""``iomt-agent bench``: model x runtime x precision on this node.

| module | job |
|---|---|
| ``run`` | the rows of each bundle and the order of the measurements |
| ``results`` | options and what a run produced (rows, per-bundle and machine figures) |
| ``measure`` | configurations taking turns; latency, throughput, fidelity figures |
| ``child`` | peak RSS of one configuration in a fresh process |
| ``macs`` | GMAC per item counted from an ONNX graph |
| ``report`` | the text table and the JSON |
| ``layers`` | per-layer profile of a bundle's ONNX files (``python -m agent.bench.layers``) |

``agent.cpu`` identifies the CPU and estimates its peak.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TextIO

from agent.bench.results import BenchOptions, BenchResult
from agent.bench.run import run_bench
from agent.model.bundle import BundleError, ModelBundle, load_bundle

EXIT_OK, EXIT_NOTHING, EXIT_USAGE = 0, 1, 2


def default_bundles() -> list[Path]:
    """Every bundle under the checkout's ``models/`` (beside the ``agent`` package, else in
    the working directory)."""
    for base in (Path(__file__).resolve().parents[2], Path.cwd()):
        found = sorted(p.parent for p in (base / "models").glob("*/bundle.json"))
        if found:
            return found
    return []


def load_bundles(paths: list[Path]) -> list[ModelBundle]:
    """Load (and check the digests of) every bundle; ``BundleError`` names the first bad
    one."""
    from agent.model.guard import load_golden

    if not paths:
        raise BundleError("no model bundles found under models/: pass --bundle DIR")
    bundles = [load_bundle(p) for p in paths]
    for bundle in bundles:
        if bundle.golden is not None:
            load_golden(bundle)  # a malformed golden set: stop now, not half-way through
    return bundles


def main(bundle_paths: list[Path], json_out: Path | None, options: BenchOptions,
         out: TextIO | None = None, err: TextIO | None = None) -> int:
    """Run the bench, print the table (``out``, default stdout), write the JSON. 0: it ran;
    1: no row could be measured; 2: a bundle cannot be read, or the JSON file cannot be
    written (messages on ``err``, default stderr)."""
    from agent.bench.report import render, to_json

    out = out or sys.stdout
    err = err or sys.stderr
    try:
        bundles = load_bundles(bundle_paths or default_bundles())
    except BundleError as exc:
        print(f"error: {exc}", file=err)
        return EXIT_USAGE
    if json_out is not None:
        try:  # fail before minutes of measuring, not after
            json_out.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            print(f"error: cannot write --json {json_out}: {exc}", file=err)
            return EXIT_USAGE
    result: BenchResult = run_bench(bundles, options)
    out.write(render(result))
    if json_out is not None:
        try:
            json_out.write_text(json.dumps(to_json(result), indent=2, allow_nan=False) + "\n",
                                encoding="utf-8")
        except OSError as exc:
            print(f"error: cannot write --json {json_out}: {exc}", file=err)
            return EXIT_USAGE
        print(f"wrote {json_out}", file=err)
    measured = any(r.latency is not None for b in result.bundles for r in b.rows)
    if not measured:
        print("error: no configuration could be measured (see the reasons above)", file=err)
        return EXIT_NOTHING
    return EXIT_OK


__all__ = ["BenchOptions", "default_bundles", "load_bundles", "main", "run_bench"]
