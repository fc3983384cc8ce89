"""Static int8 QDQ quantization of models/<name>/model.fp32.onnx -> model.int8.onnx.

Weights int8 per channel; activations calibrated (MinMax) on training slices. Variants:

- ``s8s8`` and ``u8s8``: 8-bit weights. On x86, onnxruntime runs both on u8s8 kernels
  (s8 activations are shifted to u8), which on CPUs without VNNI (AVX2, AVX-512F) can
  saturate their 16-bit intermediate sums and lose accuracy on some inputs.
- ``u8s8_rr``: ``reduce_range`` (7-bit weights), which cannot saturate: onnxruntime's
  advice for x86 without VNNI. It costs this model about 0.7 dB on the held-out slab,
  nearly all of it in the first conv (one input channel, nine weights per filter).
- ``u8s8_rr_fl``: as ``u8s8_rr`` with the first and the last conv left in float (about
  1 % of the MACs).
- ``u8s8_rr_last``: as ``u8s8_rr`` with the last conv (the head) alone left in float. A
  head's few output channels read many features, so 7-bit weights there cost more than
  anywhere else (lite 1.2.0: everything in int8 0.13 dB under fp32 on the training slices,
  the head in float 0.09, both ends 0.085), and a float first conv costs a Transpose, a
  QuantizeLinear and two reorders more (lite 1.2.0 on the AVX2 kernels, 2 threads: 6.88
  against 7.01 ms in this step's timing, 7.12 against 7.35 and 7.75 against 8.42 in two
  runs of its own).
- ``u8s8_rr_outer``: as ``u8s8_rr`` with every node that reads or writes a full-resolution
  tensor left in float (the outer level: its convs, the pool, the last resize and concat,
  the head). Those few-channel 256 x 256 layers are where int8 loses on CPUs without a dot
  product (scalar im2col and requantization around a small GEMM; models/README.md).
- ``u8s8_pl``: 8-bit weights with limited pair sums (``agent.quantize.pair_weights``):
  each two codes that the AVX2 kernel adds in one 16-bit lane sum to at most 128 in
  magnitude, so no sum can saturate, and most weights keep 8 bits (per-channel scales
  0.54-0.86 of ``reduce_range``'s on the reference models). Every conv in int8, the outer
  level included, at the speed of ``u8s8``; each bias corrected for the mean shift its
  weights' limits cause, from the calibration slices. ``u8s8_pl_last``: the same with the
  head in float.
- ``u8u8``: 8-bit unsigned weights (asymmetric, per channel). onnxruntime runs these on its
  u8u8 kernels, which widen both operands to 16 bits before multiplying (``vpmaddwd`` on
  AVX2), so no intermediate sum can saturate on any x86 CPU, and on ARM they run on the
  plain or dot-product unsigned kernels. Checked under ``qemu-x86_64 -cpu Haswell``: the
  full model's ``u8s8`` file falls to 30.7 dB against fp32 there (saturation), its ``u8u8``
  file keeps the 51.9 dB it has on a VNNI CPU. Slower than ``u8s8`` where VNNI exists.

Selection, on the training slices only (the held-out slab stays untouched): only variants
that cannot saturate on any x86 CPU are eligible, since the build machine may have VNNI
while edge nodes do not and no measurement here would show the saturation (a file that
misses its floor on a node does not serve there at all). Among them, those whose PSNR
against the target is within SELECTION_DROP_DB of fp32 qualify and the fastest is chosen;
when none does, the most accurate one, and recipes/evaluate.py's gate on the held-out slab
(int8 within 0.3 dB of fp32) decides whether it ships. SELECTION_DROP_DB is a third of that
gate because the drop on the held-out slab ran up to about three times the drop on the
training slices. "Fastest" is timed on the AVX2 kernels (``bench/avx2_kernels.py``, in a
child process), because most edge nodes have no int8 dot product and the build machine may
have VNNI; where they cannot be forced (not x86, no objdump) on this machine's kernels, and
the report says which. The variants are timed on this machine's own kernels too.

Every variant is quantized from ``agent.quantize.nhwc``'s rewrite of the fp32 graph (the
same function to the bit, checked): nearest Resize, the space-to-depth stem and the
depth-to-space head spelt in NHWC, so that onnxruntime's int8 graph runs them as plain uint8
copies (on the AVX2 kernels the full model's int8 went from 16.6 to 15.0 ms, lite's from
6.5 to 6.0 ms, everything in int8; the fp32 file is not rewritten).

Kernel check: each variant's output with onnxruntime's integer kernels is compared with its
output with graph optimisations off, where each QDQ group runs as dequantize -> float op ->
quantize (the reference semantics); a variant below KERNEL_MIN_PSNR_DB is not eligible, and
the step fails when that leaves none.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_static,
)
from onnxruntime.quantization.shape_inference import quant_pre_process

from recipes import config
from recipes.context import model_inputs
from recipes.metrics import psnr
from recipes.runtime import interleaved_latency_ms, json_on_avx2_kernels, make_session, predict
from recipes.timing import record_timing

sys.path.insert(0, str(config.MODELS_DIR.parent))  # the agent's NHWC rewrite
from agent.quantize import nhwc, pair_weights

CALIBRATION_SLICES = 48
SELECTION_DROP_DB = 0.1
KERNEL_MIN_PSNR_DB = 55.0


@dataclass(frozen=True)
class Variant:
    name: str
    activation: QuantType
    weight: QuantType
    reduce_range: bool
    float_first_last: bool = False  # keep the first and the last conv in float
    float_last: bool = False  # keep the last conv in float
    float_outer: bool = False  # keep every node on a full-resolution tensor in float
    pair_limited: bool = False  # 8-bit weights whose neighbour pairs sum to <= 128

    @property
    def saturation_safe(self) -> bool:
        """True when no x86 int8 kernel can saturate: 7-bit weights, weights with limited
        pair sums, or unsigned weights (which onnxruntime multiplies on 16-bit lanes)."""
        return self.reduce_range or self.pair_limited or self.weight == QuantType.QUInt8


VARIANTS = (
    Variant("s8s8", QuantType.QInt8, QuantType.QInt8, reduce_range=False),
    Variant("u8s8", QuantType.QUInt8, QuantType.QInt8, reduce_range=False),
    Variant("u8s8_rr", QuantType.QUInt8, QuantType.QInt8, reduce_range=True),
    Variant("u8s8_rr_fl", QuantType.QUInt8, QuantType.QInt8, True, float_first_last=True),
    Variant("u8s8_rr_last", QuantType.QUInt8, QuantType.QInt8, True, float_last=True),
    Variant("u8s8_rr_outer", QuantType.QUInt8, QuantType.QInt8, True, float_outer=True),
    Variant("u8s8_pl", QuantType.QUInt8, QuantType.QInt8, False, pair_limited=True),
    Variant("u8s8_pl_last", QuantType.QUInt8, QuantType.QInt8, False, float_last=True,
            pair_limited=True),
    Variant("u8u8", QuantType.QUInt8, QuantType.QUInt8, reduce_range=False),
    Variant("u8u8_fl", QuantType.QUInt8, QuantType.QUInt8, False, float_first_last=True),
)


class SliceReader(CalibrationDataReader):  # type: ignore[misc]
    """Feeds normalised inputs ([C, H, W] each) one at a time to the calibrator."""

    def __init__(self, inputs: np.ndarray) -> None:
        self._it = iter(inputs)

    def get_next(self) -> dict[str, np.ndarray] | None:
        s = next(self._it, None)
        return None if s is None else {"input": s[None].astype(np.float32)}


def training_slices(spec: config.ModelSpec) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(normalised inputs [N,C,H,W], targets [N,1,H,W], region masks) of training slices."""
    data = np.load(config.DATA_NPZ)
    idx = data["train_idx"]
    x = model_inputs(data["t1"], idx, spec.context)
    return x, data["t2"][idx][:, None], data["region"][idx][:, None]


def calibration_subset(x: np.ndarray) -> np.ndarray:
    """Evenly spaced training inputs [N, C, H, W] (deterministic)."""
    pick = np.linspace(0, len(x) - 1, CALIBRATION_SLICES).round().astype(int)
    subset: np.ndarray = x[pick]
    return subset


def first_and_last_conv(model_path: Path) -> list[str]:
    """Names of the first and the last Conv (graph order is topological: the first reads
    the graph input, or its space-to-depth rearrangement in a model with a stem)."""
    graph = onnx.load(str(model_path)).graph
    convs = [n for n in graph.node if n.op_type == "Conv"]
    return [convs[0].name, convs[-1].name]


def full_resolution_nodes(model_path: Path) -> list[str]:
    """Names of the nodes with an input or output of the graph input's height and width,
    NCHW or NHWC (the outer level of the U-Net). Needs the shapes that quant_pre_process
    inferred."""
    graph = onnx.load(str(model_path)).graph
    size = [d.dim_value for d in graph.input[0].type.tensor_type.shape.dim][-2:]
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim]
              for v in (*graph.value_info, *graph.input, *graph.output)}
    return [n.name for n in graph.node
            if any(len(shapes.get(t, [])) == 4 and size in (shapes[t][-2:], shapes[t][1:3])
                   for t in (*n.input, *n.output))]


def preprocessed_path(spec: config.ModelSpec, float_outer: bool) -> Path:
    """The rewritten, shape-inferred fp32 graph that a variant is quantized from."""
    return spec.build(f"model.fp32.pre{'_outer' if float_outer else ''}.onnx")


def build_variant(spec: config.ModelSpec, v: Variant, calib: np.ndarray) -> Path:
    out = spec.build(f"model.int8.{v.name}.onnx")
    preprocessed = preprocessed_path(spec, v.float_outer)
    exclude = (first_and_last_conv(preprocessed) if v.float_first_last
               else first_and_last_conv(preprocessed)[1:] if v.float_last
               else full_resolution_nodes(preprocessed) if v.float_outer else None)
    quantize_static(
        preprocessed,
        out,
        SliceReader(calib),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        reduce_range=v.reduce_range,
        activation_type=v.activation,
        weight_type=v.weight,
        calibrate_method=CalibrationMethod.MinMax,
        nodes_to_exclude=exclude,
    )
    if v.pair_limited:
        model, source = onnx.load(str(out)), onnx.load(str(preprocessed))
        pair_weights.limit_pairs(model, source, pair_weights.conv_input_means(source, calib))
        if not pair_weights.pair_sums_within_limit(model):
            raise SystemExit(f"{v.name}: a pair of weight codes over the limit after "
                             "limit_pairs (a bug)")
        onnx.save(model, str(out))
    return out


def avx2_latency_ms(paths: dict[str, Path],
                    sample: np.ndarray) -> tuple[dict[str, float] | None, str]:
    """Interleaved latency of each file on the AVX2 kernels (a child process under
    bench/avx2_kernels.py), and where it was timed; None where they cannot be forced."""
    with tempfile.TemporaryDirectory() as tmp:
        np.save(Path(tmp) / "x.npy", sample)
        out = Path(tmp) / "latency.json"
        timed, reason = json_on_avx2_kernels(
            ["recipes.latency", "--sample", str(Path(tmp) / "x.npy"), "--json", str(out),
             *(f"{name}={path}" for name, path in paths.items())], out, cwd=config.MODELS_DIR)
    if timed is None:
        return None, f"this machine's kernels (AVX2 kernels could not be forced: {reason})"
    return timed, "AVX2 kernels forced on this machine (bench/avx2_kernels.py)"


def reference_session(path: Path) -> ort.InferenceSession:
    """Session without graph optimisations: QDQ runs as float ops between (de)quantizers."""
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.intra_op_num_threads = 2
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    config.add_model_argument(parser)
    spec = config.spec(parser.parse_args().model)
    start = time.perf_counter()
    fp32_path = spec.bundle("model.fp32.onnx")
    spec.build_dir.mkdir(parents=True, exist_ok=True)
    x, y, region = training_slices(spec)
    calib = calibration_subset(x)
    # The int8 files are built from the NHWC rewrite of the fp32 graph (same function);
    # the variant that keeps the outer level in float from one that leaves its Resize as is.
    rewrites: dict[str, dict[str, int]] = {}
    for outer in (False, True):
        rewritten = spec.build(f"model.fp32.nhwc{'_outer' if outer else ''}.onnx")
        try:
            rewrites["float_outer" if outer else "default"] = nhwc.rewrite_file(
                fp32_path, rewritten, calib[:2], float_outer=outer)
        except nhwc.RewriteChangedOutput as exc:
            raise SystemExit(str(exc)) from None
        # ONNX shape inference + graph optimisation. The symbolic pass (meant for
        # transformers) cannot merge the dynamic batch dim through Resize
        # ('floor(1.0*batch)' vs 'batch').
        quant_pre_process(str(rewritten), str(preprocessed_path(spec, outer)),
                          skip_symbolic_shape=True)
    paths = {v.name: build_variant(spec, v, calib) for v in VARIANTS}
    safe = {v.name: v.saturation_safe for v in VARIANTS}

    fp32 = make_session(fp32_path)
    data_range = float(y.max())
    ref_psnr = psnr(predict(fp32, x), y, data_range, region)
    report: dict[str, object] = {"fp32_train_psnr_db": round(ref_psnr, 2),
                                 "nhwc_rewrites": rewrites, "variants": {}}
    sessions = {"fp32": fp32} | {name: make_session(p) for name, p in paths.items()}
    sample = x[len(x) // 2 : len(x) // 2 + 1]
    latency = interleaved_latency_ms(sessions, sample)
    avx2, timed_on = avx2_latency_ms({"fp32": fp32_path} | paths, sample)
    variants: dict[str, dict[str, float | bool]] = {}
    for name, path in paths.items():
        out = predict(sessions[name], x)
        kernel = psnr(out, predict(reference_session(path), x), data_range)
        if kernel < KERNEL_MIN_PSNR_DB:
            print(f"{name}: integer kernels differ from QDQ semantics ({kernel:.1f} dB < "
                  f"{KERNEL_MIN_PSNR_DB}): not eligible", file=sys.stderr)
        variants[name] = {
            "train_psnr_db": round(psnr(out, y, data_range, region), 2),
            "latency_ms": latency[name],
            **({"latency_avx2_ms": avx2[name]} if avx2 else {}),
            "kernel_vs_qdq_reference_db": round(kernel, 1),
            "saturation_safe": safe[name],
        }
    report["variants"] = variants
    report["fp32_latency_ms"] = latency["fp32"]
    if avx2:
        report["fp32_latency_avx2_ms"] = avx2["fp32"]
    report["selection_timing"] = timed_on
    speed = "latency_avx2_ms" if avx2 else "latency_ms"
    report["selection_drop_db"] = SELECTION_DROP_DB

    eligible = [n for n in variants if safe[n]
                and variants[n]["kernel_vs_qdq_reference_db"] >= KERNEL_MIN_PSNR_DB]
    if not eligible:
        raise SystemExit("no saturation-safe variant whose integer kernels match its QDQ "
                         f"semantics (>= {KERNEL_MIN_PSNR_DB} dB): see the variants above")
    ok = [n for n in eligible if ref_psnr - variants[n]["train_psnr_db"] <= SELECTION_DROP_DB]
    if ok:
        chosen = min(ok, key=lambda n: variants[n][speed])
        report["selection"] = (f"the fastest saturation-safe variant within "
                               f"{SELECTION_DROP_DB} dB of fp32 on the training slices")
    else:
        chosen = max(eligible, key=lambda n: variants[n]["train_psnr_db"])
        report["selection"] = (f"no saturation-safe variant within {SELECTION_DROP_DB} dB "
                               "of fp32 on the training slices: the most accurate one "
                               "(the held-out gate of evaluate decides)")
    shutil.copyfile(paths[chosen], spec.bundle("model.int8.onnx"))
    report["chosen"] = chosen
    report["calibration_slices"] = len(calib)
    spec.build("quantize.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(report, indent=2))
    record_timing("quantize", time.perf_counter() - start, spec.name)


if __name__ == "__main__":
    main()
