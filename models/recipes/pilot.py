"""The record of a pilot model (one that is trained and measured but not shipped):
``models/records/<model>-pilot.json``.

A pilot runs the shipped steps into its own directories (``models/<model>/`` stays
uncommitted): ``recipes.train``, ``recipes.export``, ``recipes.quantize`` (int8 variants,
timed on this machine's and on the AVX2 kernels) and ``recipes.evaluate`` (held-out slab,
both ONNX files; it may stop at the shipped gates, after writing its figures). This step
keeps what those wrote, so that a pilot's figures can be compared with the shipped models'
in models/README.md without its weights being committed:

    python -m recipes.pilot --model t1w-to-t2w-lite-s2r
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from recipes import config
from recipes.record import RECORDS_DIR

NOTE = ("pilot, not shipped: trained on the build machine with the shipped recipe; held-out "
        "slab quality from recipes.evaluate (its definitions), int8 variants and their "
        "latencies from recipes.quantize")


def pilot_record(spec: config.ModelSpec) -> dict[str, Any]:
    def read(name: str) -> Any:
        return json.loads(spec.build(name).read_text(encoding="utf-8"))

    train, quant, ev = read("train.json"), read("quantize.json"), read("eval.json")
    chosen = quant["variants"][quant["chosen"]]
    fp32_avx2 = quant.get("fp32_latency_avx2_ms")
    int8_avx2 = chosen.get("latency_avx2_ms")
    return {
        "note": NOTE,
        "train": train,
        "holdout_fp32_onnx": ev["models"]["onnxruntime_fp32"],
        "holdout_int8_onnx": ev["models"]["onnxruntime_int8"],
        "int8_variant": quant["chosen"],
        "gates": ev["gates"],
        "latency_ms": {
            "timed_on": quant.get("selection_timing", "this machine's kernels"),
            "fp32": quant["fp32_latency_ms"], "int8": chosen["latency_ms"],
            "fp32_avx2_kernels": fp32_avx2, "int8_avx2_kernels": int8_avx2,
            "fp32_over_int8_avx2_kernels": (round(fp32_avx2 / int8_avx2, 2)
                                            if fp32_avx2 and int8_avx2 else None),
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    config.add_model_argument(parser)
    spec = config.spec(parser.parse_args().model)
    if spec.name in config.SHIPPED:
        raise SystemExit(f"{spec.name} is shipped: its record is recipes.record's")
    path = RECORDS_DIR / f"{spec.name}-pilot.json"
    path.write_text(json.dumps(pilot_record(spec), indent=2) + "\n", encoding="utf-8")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
