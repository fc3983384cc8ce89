"""Interleaved batch-1 latency of model files, as a child process of recipes.quantize.

``recipes.quantize`` runs it through ``bench/avx2_kernels.py`` so that the int8 variants
are also timed on the AVX2 kernels that nodes without an int8 dot product run (the build
machine may have VNNI). Prints nothing but the JSON it writes.

    python -m recipes.latency --sample x.npy --json out.json fp32=a.onnx u8s8_rr=b.onnx
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from recipes.runtime import interleaved_latency_ms, make_session


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sample", type=Path, required=True, help="one input [1, C, H, W] (.npy)")
    parser.add_argument("--json", type=Path, required=True, help="where to write {name: ms}")
    parser.add_argument("files", nargs="+", metavar="NAME=PATH")
    args = parser.parse_args()
    pairs = [f.split("=", 1) for f in args.files]
    sessions = {name: make_session(Path(path)) for name, path in pairs}
    sample = np.load(args.sample)
    args.json.write_text(json.dumps(interleaved_latency_ms(sessions, sample)) + "\n",
                         encoding="utf-8")


if __name__ == "__main__":
    main()
