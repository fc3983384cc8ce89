"""Sentences of the model card's quantization section that depend on quantize.json: what
the chosen variant means on CPUs without VNNI, and where the variants were timed."""

from __future__ import annotations

from typing import Any

Json = dict[str, Any]


def saturation_note(quant: Json) -> str:
    """What the choice means on x86 CPUs without VNNI (empty when it cannot saturate)."""
    chosen = quant["variants"][quant["chosen"]]
    if chosen["saturation_safe"]:
        return ""
    safe = {n: v for n, v in quant["variants"].items() if v["saturation_safe"]}
    best = max(safe.values(), key=lambda v: v["train_psnr_db"]) if safe else None
    loss = quant["fp32_train_psnr_db"] - best["train_psnr_db"] if best else 0.0
    cost = f" (the best saturation-safe variant loses {loss:.1f} dB here)" if best else ""
    return (
        f" No saturation-safe variant qualified{cost}, so the served ONNX file has 8-bit "
        "weights. On an x86 CPU without VNNI onnxruntime runs it on u8s8 kernels whose 16-bit "
        "intermediate sums can saturate. The agent does not trust that to luck: every node "
        "runs the golden set through the file on its own CPU at every load and refuses it "
        "where its output misses the floor there (the guard), and LiteRT's XNNPACK kernels, "
        "which the `model.int8.tflite` file runs on, do not saturate: with "
        "`backend = \"auto\"` the node serves whichever runtime passes its guard and is faster."
    )


def avx2_ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f} ms"


def timing_note(quant: Json) -> str:
    """Where the variants' speed was measured (builds before AVX2 timing say nothing)."""
    where = quant.get("selection_timing")
    if not where:
        return ""
    fp32 = quant.get("fp32_latency_avx2_ms")
    on_avx2 = f"; fp32 on the AVX2 kernels: {fp32:.1f} ms" if fp32 else ""
    return (f" The choice is timed on {where}{on_avx2}: most edge nodes have no int8 dot "
            "product, and there the variants rank differently than on a VNNI build machine.")
