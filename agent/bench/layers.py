"""Per-layer profile of a bundle's ONNX files: where the time goes, bytes moved against MACs.

onnxruntime's profiler (``SessionOptions.enable_profiling``) records every kernel it runs
after graph optimisation, with its input and output types and shapes. For each node of the
optimised graph this prints and writes (``--json``) the median kernel time over ``--runs``
inferences, its share of the total, MACs (convolutions: output elements x weights per
output), bytes moved (every input and output tensor once, weights included) and the element
types in and out, so that the ops that stay in float inside the int8 graph show up by name.

    python -m agent.bench.layers models/t1w-to-t2w-lite [--threads 1] [--json OUT.json]

Times are those of this machine's kernels: on a build machine with AVX-512 VNNI they are not
the AVX2 ones (``bench/avx2_instructions.py --kernels`` counts those). LiteRT's Python wheel
exposes no op profiler, so its side is counted with that script too. The recipe puts the
table of each shipped bundle in its model card (``models/recipes/layer_card.py``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from agent.model.bundle import BundleError, load_bundle

ITEM_BYTES = {"float": 4, "uint8": 1, "int8": 1, "int32": 4, "int64": 8, "float16": 2}
# Where each convolution keeps its weight among its inputs.
CONV_WEIGHT = {"Conv": 1, "FusedConv": 1, "QLinearConv": 3}


def _tensors(spec: list[dict[str, list[int]]]) -> list[tuple[str, list[int]]]:
    return [(dtype, shape) for item in spec for dtype, shape in item.items()]


def _elements(shape: list[int]) -> int:
    return int(np.prod(shape)) if shape else 1


def conv_weights(optimised: Path) -> dict[str, list[int]]:
    """Weight shape (O, I, kH, kW) of every convolution of the optimised graph, by node name.
    The profiler leaves pre-packed weights out of its shapes, the saved graph keeps them."""
    import onnx  # the quantize extra's; only this tool needs it

    graph = onnx.load(str(optimised)).graph
    init = {t.name: list(t.dims) for t in graph.initializer}
    out: dict[str, list[int]] = {}
    for node in graph.node:
        at = CONV_WEIGHT.get(node.op_type)
        if at is not None and len(node.input) > at and node.input[at] in init:
            out[node.name] = init[node.input[at]]
    return out


def layer_row(op: str, args: dict[str, Any], weight: list[int] | None) -> dict[str, Any]:
    """MACs, bytes and types of one kernel event's arguments (``weight``: the conv's)."""
    ins = _tensors(args.get("input_type_shape", []))
    outs = _tensors(args.get("output_type_shape", []))
    moved = sum(_elements(s) * ITEM_BYTES.get(t, 4) for t, s in ins + outs)
    macs = 0
    if weight and outs:
        # Output pixels x output channels x (input channels x kernel); an NCHWc weight is
        # padded to the vector width, so this counts what the kernel executes.
        shape = outs[0][1]
        nhwc = shape[-1] == weight[0]  # the int8 graph runs NHWC, the float one NCHW(c)
        spatial = shape[1] * shape[2] if nhwc else shape[2] * shape[3]
        macs = spatial * weight[0] * _elements(weight[1:])
        moved += _elements(weight)  # the weights, once, int8 or float alike
    return {
        "op": op,
        "in_types": sorted({t for t, _ in ins}),
        "out_types": sorted({t for t, _ in outs}),
        "out_shape": outs[0][1] if outs else [],
        "macs": macs,
        "bytes": moved,
    }


def run_profile(model: Path, x: np.ndarray, threads: int, runs: int) -> list[dict[str, Any]]:
    """One row per node of the optimised graph (``summarise``), from one warm-up and
    ``runs`` profiled inferences of ``model`` on ``x``."""
    with tempfile.TemporaryDirectory() as tmp:
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        so.enable_profiling = True
        so.log_severity_level = 3  # not the warning that a saved optimised graph is CPU-specific
        so.profile_file_prefix = str(Path(tmp) / "prof")
        so.optimized_model_filepath = str(Path(tmp) / "optimised.onnx")
        sess = ort.InferenceSession(str(model), sess_options=so,
                                    providers=["CPUExecutionProvider"])
        name = sess.get_inputs()[0].name
        for _ in range(runs + 1):
            sess.run(None, {name: x})
        events = json.loads(Path(sess.end_profiling()).read_text(encoding="utf-8"))
        weights = conv_weights(Path(tmp) / "optimised.onnx")
    return summarise(events, weights)


def summarise(events: list[dict[str, Any]],
              weights: dict[str, list[int]]) -> list[dict[str, Any]]:
    """Rows per node from profiler events; the first run of each node (warm-up) is dropped."""
    durations: dict[str, list[float]] = defaultdict(list)
    rows: dict[str, dict[str, Any]] = {}
    for ev in events:
        name = str(ev.get("name", ""))
        if ev.get("cat") != "Node" or not name.endswith("_kernel_time"):
            continue
        node = name[: -len("_kernel_time")]
        durations[node].append(float(ev["dur"]))
        if node not in rows:
            args = ev.get("args", {})
            rows[node] = {"node": node} | layer_row(str(args.get("op_name", "?")), args,
                                                    weights.get(node))
    out = []
    for node, row in rows.items():
        d = durations[node]
        row["median_us"] = statistics.median(d[1:] or d)
        out.append(row)
    total = sum(r["median_us"] for r in out) or 1.0
    for r in out:
        r["share"] = r["median_us"] / total
    return out


def float_share(rows: list[dict[str, Any]]) -> float:
    """Share of the time in kernels whose inputs and outputs are all float."""
    return float(sum(r["share"] for r in rows
                     if r["in_types"] == ["float"] and r["out_types"] == ["float"]))


HEADER = ("| node | op | types in -> out | output | MMAC | KiB moved | MAC / byte | us "
          "| share |")


def table(title: str, rows: list[dict[str, Any]], min_share: float = 0.0) -> str:
    """Markdown: a summary line, then one row per node; nodes under ``min_share`` of the
    time are folded into one last row."""
    kept = [r for r in rows if r["share"] >= min_share]
    rest = [r for r in rows if r["share"] < min_share]
    lines = [f"{title}: {sum(r['median_us'] for r in rows) / 1000:.2f} ms in kernels, "
             f"{sum(r['macs'] for r in rows) / 1e9:.3f} GMAC executed, "
             f"{100 * float_share(rows):.1f} % of the time in all-float kernels",
             "", HEADER, "|---|---|---|---|---|---|---|---|---|"]
    for r in kept:
        ratio = f"{r['macs'] / r['bytes']:.1f}" if r["macs"] and r["bytes"] else "-"
        shape = "x".join(str(d) for d in r["out_shape"][1:])
        lines.append(
            f"| {r['node'][-28:]} | {r['op']} | {','.join(r['in_types'])} -> "
            f"{','.join(r['out_types'])} | {shape} | {r['macs'] / 1e6:.1f} | "
            f"{r['bytes'] / 1024:.0f} | {ratio} | {r['median_us']:.0f} | "
            f"{100 * r['share']:.1f} % |")
    if rest:
        lines.append(
            f"| {len(rest)} other nodes | | | | {sum(r['macs'] for r in rest) / 1e6:.1f} | "
            f"{sum(r['bytes'] for r in rest) / 1024:.0f} | | "
            f"{sum(r['median_us'] for r in rest):.0f} | "
            f"{100 * sum(r['share'] for r in rest):.1f} % |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundle", type=Path)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--min-share", type=float, default=0.0,
                    help="fold nodes under this share of the time into one row")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    try:
        bundle = load_bundle(args.bundle)
    except BundleError as exc:
        raise SystemExit(f"{args.bundle}: {exc}") from None
    files = {"fp32": bundle.reference_file("onnxruntime"),
             "int8": bundle.backend_file("onnxruntime")}
    if bundle.golden is None or None in files.values():
        raise SystemExit(f"{args.bundle}: needs ONNX fp32 and int8 files and a golden set")
    x = np.load(bundle.root / bundle.golden.path)["input"][:1].astype(np.float32)
    report: dict[str, Any] = {"bundle": bundle.root.name, "threads": args.threads,
                              "runs": args.runs, "onnxruntime": ort.__version__}
    for precision, file in files.items():
        assert file is not None
        rows = run_profile(file.path, x, args.threads, args.runs)
        report[precision] = rows
        print(table(f"{bundle.root.name} {precision}", rows, args.min_share), end="\n\n")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
