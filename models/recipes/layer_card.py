"""The model card's per-layer section: where onnxruntime's time goes, fp32 against int8.

``agent.bench.layers`` profiles both ONNX files of the bundle on the golden set's first
input (one thread, so that the kernel times add up to the inference) and the card gets one
table per precision: the nodes with at least ``MIN_SHARE`` of the time, the rest folded.
It does so twice: on this machine's kernels, and in a child under ``bench/avx2_kernels.py``
on the AVX2 kernels of a CPU without an int8 dot product (where that cannot be forced, the
card says so and has only the first two tables).
``build_bundle`` writes it with the card; on its own it replaces the section of a built
bundle's card in place (no other file changes):

    python -m recipes.layer_card --model NAME
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from agent.bench.layers import float_share, run_profile, table
from recipes import config
from recipes.runtime import json_on_avx2_kernels

BEGIN, END = "<!-- layers:begin -->", "<!-- layers:end -->"

MIN_SHARE = 0.02
RUNS = 20


def avx2_profile(spec: config.ModelSpec) -> tuple[dict[str, Any] | None, str]:
    """agent.bench.layers's report on the AVX2 kernels (a child process), or None and why."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "layers.json"
        report, why_not = json_on_avx2_kernels(
            ["agent.bench.layers", str(spec.bundle_dir), "--runs", str(RUNS), "--json",
             str(out)], out)
    return report, why_not


def summary(rows: dict[str, list[dict[str, Any]]]) -> str:
    total = {p: sum(r["median_us"] for r in rs) / 1000 for p, rs in rows.items()}
    gemm = sum(r["share"] for r in rows["int8"] if r["op"] == "QLinearConv")
    return (f"fp32 {total['fp32']:.1f} ms, int8 {total['int8']:.1f} ms in kernels "
            f"(fp32 / int8 {total['fp32'] / total['int8']:.2f}x); in the int8 graph "
            f"{100 * gemm:.0f} % of the time is in integer convolutions (QLinearConv) and "
            f"{100 * float_share(rows['int8']):.1f} % in kernels that stay in float")


def layer_section(spec: config.ModelSpec, machine: str) -> str:
    """Markdown for the card (the bundle's ONNX files and golden.npz must exist)."""
    x = np.load(spec.bundle("golden.npz"))["input"][:1].astype(np.float32)
    rows = {p: run_profile(spec.bundle(f"model.{p}.onnx"), x, threads=1, runs=RUNS)
            for p in ("fp32", "int8")}
    tables = "\n\n".join(table(f"**{p}**", rows[p], MIN_SHARE) for p in ("fp32", "int8"))
    avx2, why_not = avx2_profile(spec)
    if avx2 is None:
        avx2_text = (f"The AVX2 kernels of a CPU without an int8 dot product could not be "
                     f"forced here ({why_not}); `../README.md`, \"int8 on CPUs without dot "
                     "product\", has their instruction counts.")
    else:
        avx2_rows = {p: avx2[p] for p in ("fp32", "int8")}
        avx2_tables = "\n\n".join(table(f"**{p}, AVX2 kernels**", avx2_rows[p], MIN_SHARE)
                                   for p in ("fp32", "int8"))
        avx2_text = f"""### On the AVX2 kernels (no int8 dot product)

The same profile with onnxruntime forced onto the kernels of an x86 CPU without VNNI
(`bench/avx2_kernels.py`; this machine's cores and clock): {summary(avx2_rows)}.

{avx2_tables}"""
    return f"""
{BEGIN}
## Where the time goes (per layer)

onnxruntime's profiler on this bundle's two ONNX files after graph optimisation (what the
agent runs): one thread, batch 1, median of {RUNS} runs per node. Machine: {machine}.
"MMAC": the multiply-accumulates the kernel executes (the fp32 graph's NCHWc convolutions
pad their channels to the vector width, so they execute more than the model's own count);
"KiB moved": every input and output tensor once, weights included; "MAC / byte": the two
divided, the arithmetic intensity (below about 10 a layer is bound by memory traffic, not
by MACs). Nodes under {100 * MIN_SHARE:.0f} % of the time are folded into one row.

In one thread, on this machine's kernels: {summary(rows)}.

{tables}

{avx2_text}
{END}
"""


def put_section(spec: config.ModelSpec, section: str) -> None:
    """Replace the card's section, or put it before the domain-shift section (or last)."""
    card = spec.bundle("MODEL_CARD.md")
    text = card.read_text(encoding="utf-8")
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        text = head.rstrip("\n") + "\n" + section.strip("\n") + rest.split(END, 1)[1]
    elif "<!-- domain-shift:begin -->" in text:
        head, rest = text.split("<!-- domain-shift:begin -->", 1)
        text = (head.rstrip("\n") + "\n" + section.rstrip("\n") + "\n\n"
                "<!-- domain-shift:begin -->" + rest)
    else:
        text = text.rstrip("\n") + "\n" + section
    card.write_text(text, encoding="utf-8")


def main() -> None:
    from recipes.model_card import cpu_name, isa_line

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    config.add_model_argument(parser)
    spec = config.spec(parser.parse_args().model)
    put_section(spec, layer_section(spec, f"{cpu_name()} ({isa_line()})"))
    print(f"{spec.bundle('MODEL_CARD.md')}: per-layer section written")


if __name__ == "__main__":
    main()
