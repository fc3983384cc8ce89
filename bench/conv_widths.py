"""One 3 x 3 conv + ReLU, fp32 against int8, for several channel counts: which widths the
runtime's int8 kernels run well.

Why: onnxruntime's u8s8 GEMM on AVX2 works on tiles of 16 output channels, so a layer of 24
channels pays for 32 in int8 while fp32 (8-wide NCHWc blocks on AVX2) pays for 24. Measured
on the AVX2 kernels at 128 x 128, 2 threads: 24 -> 24 channels ran 1.15x faster in int8 than
in fp32, 32 -> 32 1.54x; that is why lite 1.2.0 has 32 channels at 128 x 128
(models/README.md, "int8 on CPUs without dot product").

Each layer is built with random weights, quantized as the recipe's ``u8s8_rr`` (QDQ, weights
per channel in 7 bits, uint8 activations, MinMax calibration on random inputs) and timed
with its fp32 file, every file taking turns (median of ``--rounds``). Only ratios inside one
run carry over; run it under ``bench/avx2_kernels.py`` for the kernels of a CPU without an
int8 dot product:

    python bench/avx2_kernels.py -- python bench/conv_widths.py --size 128 24x24 32x32
    python bench/conv_widths.py --size 64 --threads 1 48x48 64x64 --json out.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_static,
)


def conv_model(c_in: int, c_out: int, size: int, path: Path) -> None:
    rng = np.random.default_rng(0)
    w = rng.standard_normal((c_out, c_in, 3, 3)) * np.sqrt(2 / (9 * c_in))
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1]),
         helper.make_node("Relu", ["c"], ["y"])],
        "conv",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, c_in, size, size])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, c_out, size, size])],
        [numpy_helper.from_array(w.astype(np.float32), "w"),
         numpy_helper.from_array(np.zeros(c_out, np.float32), "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))


class RandomInputs(CalibrationDataReader):  # type: ignore[misc]
    def __init__(self, c_in: int, size: int) -> None:
        self._it = iter([{"x": np.random.default_rng(i).random((1, c_in, size, size),
                                                               np.float32)} for i in range(4)])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._it, None)


def session(path: Path, threads: int) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("shapes", nargs="+", metavar="CINxCOUT", help="e.g. 24x24 32x32")
    parser.add_argument("--size", type=int, default=128, help="height and width")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=60)
    parser.add_argument("--json", type=Path, help="write the rows here")
    args = parser.parse_args()
    shapes = [tuple(int(c) for c in s.split("x")) for s in args.shapes]
    runs: dict[tuple[int, int, str], ort.InferenceSession] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for c_in, c_out in shapes:
            fp32, int8 = Path(tmp) / f"{c_in}x{c_out}.onnx", Path(tmp) / f"{c_in}x{c_out}.q.onnx"
            conv_model(c_in, c_out, args.size, fp32)
            quantize_static(str(fp32), str(int8), RandomInputs(c_in, args.size),
                            quant_format=QuantFormat.QDQ, per_channel=True, reduce_range=True,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            calibrate_method=CalibrationMethod.MinMax)
            runs[(c_in, c_out, "fp32")] = session(fp32, args.threads)
            runs[(c_in, c_out, "int8")] = session(int8, args.threads)
    inputs = {c_in: np.random.default_rng(9).random((1, c_in, args.size, args.size), np.float32)
              for c_in, _ in shapes}
    times: dict[tuple[int, int, str], list[float]] = {key: [] for key in runs}
    for key, sess in runs.items():
        sess.run(None, {"x": inputs[key[0]]})
    for _ in range(args.rounds):
        for key, sess in runs.items():
            start = time.perf_counter()
            sess.run(None, {"x": inputs[key[0]]})
            times[key].append(time.perf_counter() - start)
    rows = []
    print(f"3 x 3 conv + ReLU at {args.size} x {args.size}, {args.threads} threads, "
          f"median of {args.rounds} rounds")
    print(f"{'channels':>10} {'MMAC':>7} {'fp32 ms':>8} {'int8 ms':>8} {'fp32/int8':>9}")
    for c_in, c_out in shapes:
        fp32_ms = statistics.median(times[(c_in, c_out, "fp32")]) * 1e3
        int8_ms = statistics.median(times[(c_in, c_out, "int8")]) * 1e3
        mmac = c_in * c_out * 9 * args.size ** 2 / 1e6
        rows.append({"c_in": c_in, "c_out": c_out, "size": args.size, "mmac": mmac,
                     "fp32_ms": round(fp32_ms, 3), "int8_ms": round(int8_ms, 3),
                     "fp32_over_int8": round(fp32_ms / int8_ms, 2)})
        print(f"{f'{c_in}->{c_out}':>10} {mmac:7.1f} {fp32_ms:8.3f} {int8_ms:8.3f} "
              f"{fp32_ms / int8_ms:8.2f}x")
    if args.json:
        args.json.write_text(json.dumps({"threads": args.threads, "rounds": args.rounds,
                                         "rows": rows}, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
