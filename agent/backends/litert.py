"""LiteRT (TensorFlow Lite) on the CPU, through the XNNPACK delegate.

The interpreter comes from ``ai_edge_litert`` (the current LiteRT wheel) or, failing that,
from ``tflite_runtime`` (the older package; no wheels past Python 3.11). ``ai-edge-litert``
is a dependency of the agent wherever it has a wheel; on 32-bit ARM, where it has none, an
installed ``tflite_runtime`` serves instead.

Callers see the same interface as every runner: float32 [N, C, H, W] in, float32
[N, C', H, W] out. The runner hides what a ``.tflite`` file may differ in:

* **Quantized input/output tensors** (a full-integer int8 model has int8 I/O): inputs are
  quantized with the tensor's scale and zero point, outputs dequantized with theirs.
* **Channels-last models** ([N, H, W, C], the layout TFLite kernels use): the batch is
  transposed in and the output back. The layout is found by matching the batch's shape
  against the model's input shape, channels-first winning a tie.
* **Batch size**: a model exported with a fixed batch (usually 1) is resized to the
  batch's size when its graph allows it; when it does not (a graph with fixed reshapes),
  the batch runs item by item.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from agent.backends.base import Array, BackendError, ModelRunner, RunnerOptions

INSTALL_HINT = "pip install ai-edge-litert"
NCHW, NHWC = "NCHW", "NHWC"


def _interpreter_class() -> tuple[Any, str]:
    """(Interpreter class, package name): ai_edge_litert first, then tflite_runtime."""
    for package in ("ai_edge_litert", "tflite_runtime"):
        try:
            module = importlib.import_module(f"{package}.interpreter")
        except ImportError:
            continue
        return module.Interpreter, package
    raise BackendError(
        "the litert runtime needs LiteRT, which is not installed (it is a dependency of "
        f"the agent: the install is incomplete): run `{INSTALL_HINT}`, or where it has no "
        "wheel (32-bit ARM) `pip install tflite-runtime`"
    )


@dataclass(frozen=True)
class _Quant:
    """How one I/O tensor is stored: dtype, and scale/zero point when it is an integer."""

    dtype: np.dtype[Any]
    scale: float = 0.0
    zero_point: int = 0

    @property
    def quantized(self) -> bool:
        return bool(np.issubdtype(self.dtype, np.integer))


def _quant(details: dict[str, Any], where: str) -> _Quant:
    dtype = np.dtype(details["dtype"])
    if np.issubdtype(dtype, np.floating):
        return _Quant(dtype)
    if not np.issubdtype(dtype, np.integer):
        raise BackendError(f"{where} tensor {details['name']!r} is {dtype}: not supported")
    params = details.get("quantization_parameters") or {}
    scales = np.asarray(params.get("scales", []), dtype=np.float64)
    zeros = np.asarray(params.get("zero_points", []), dtype=np.int64)
    if scales.size == 0:  # older interpreters: only the per-tensor (scale, zero point) pair
        scale, zero = details.get("quantization", (0.0, 0))
        scales, zeros = np.array([scale], dtype=np.float64), np.array([zero], dtype=np.int64)
    if scales.size != 1 or not np.isfinite(scales[0]) or scales[0] <= 0:
        raise BackendError(
            f"{where} tensor {details['name']!r} is {dtype} without one positive "
            f"per-tensor scale (scales {scales.tolist()}): cannot convert to float32"
        )
    zero = int(zeros[0]) if zeros.size else 0
    return _Quant(dtype, float(scales[0]), zero)


def _signature_index(interpreter: Any, kind: str, name: str) -> int | None:
    """The tensor index of input/output ``name`` in the model's signatures, if any."""
    try:
        signatures = interpreter.get_signature_list()
    except Exception:  # old interpreters have no signatures
        return None
    for key, sig in signatures.items():
        if name in sig.get(kind, ()):
            runner = interpreter.get_signature_runner(key)
            details = runner.get_input_details() if kind == "inputs" else (
                runner.get_output_details())
            return int(details[name]["index"])
    return None


def _pick(interpreter: Any, kind: str, name: str, path: str) -> dict[str, Any]:
    """The details of the model's input/output called ``name``: by signature name, then by
    tensor name, then the only one there is."""
    tensors = (interpreter.get_input_details() if kind == "inputs"
               else interpreter.get_output_details())
    index = _signature_index(interpreter, kind, name)
    for t in tensors:
        if index is not None and t["index"] == index:
            return dict(t)
    for t in tensors:
        tensor_name = str(t["name"])
        if tensor_name == name or tensor_name.split(":")[0].endswith(f"_{name}"):
            return dict(t)
    if len(tensors) == 1:
        return dict(tensors[0])
    names = [str(t["name"]) for t in tensors]
    raise BackendError(f"{path}: no {kind[:-1]} tensor {name!r} (the model has {names})")


class LiteRTRunner(ModelRunner):
    runtime = "litert"

    def __init__(self, model_path: str, options: RunnerOptions) -> None:
        interpreter_cls, self.package = _interpreter_class()
        self.threads = options.intra_op_threads or os.cpu_count() or 1
        self._path = model_path
        try:
            # XNNPACK is the interpreter's default delegate for float and int8 graphs;
            # num_threads reaches it too.
            self._interp = interpreter_cls(model_path=model_path, num_threads=self.threads)
            self._interp.allocate_tensors()
        except (ValueError, RuntimeError, OSError) as exc:
            raise BackendError(f"LiteRT cannot load {model_path}: {exc}") from exc
        inp = _pick(self._interp, "inputs", options.input_name, model_path)
        out = _pick(self._interp, "outputs", options.output_name, model_path)
        if len(inp["shape"]) != 4 or len(out["shape"]) != 4:
            raise BackendError(
                f"{model_path}: expected 4-D input and output, the model has "
                f"{list(inp['shape'])} -> {list(out['shape'])}"
            )
        self._in_index, self._out_index = int(inp["index"]), int(out["index"])
        self._in_quant = _quant(inp, "input")
        self._out_quant = _quant(out, "output")
        self._signature = tuple(int(d) for d in inp.get("shape_signature", inp["shape"]))
        self._batch = int(inp["shape"][0])  # the batch the interpreter is allocated for
        self._fixed_batch = self._batch  # what the file says
        self._resizable = True  # until a resize fails
        self._layouts: dict[tuple[int, ...], str] = {}

    @property
    def input_quantized(self) -> bool:
        return self._in_quant.quantized

    def layout(self, item_shape: tuple[int, ...]) -> str:
        """NCHW or NHWC: how the model takes an item shaped [C, H, W]."""
        found = self._layouts.get(item_shape)
        if found is not None:
            return found
        c, h, w = item_shape
        model = self._signature[1:]

        def fits(want: tuple[int, ...]) -> bool:
            return all(m in (-1, v) for m, v in zip(model, want, strict=True))

        if fits((c, h, w)):
            found = NCHW
        elif fits((h, w, c)):
            found = NHWC
        else:
            raise BackendError(
                f"{self._path}: the model takes {list(self._signature)}, which fits neither "
                f"[N, {c}, {h}, {w}] nor [N, {h}, {w}, {c}]"
            )
        self._layouts[item_shape] = found
        return found

    def _quantize(self, x: Array) -> npt.NDArray[Any]:
        q = self._in_quant
        if not q.quantized:
            return np.ascontiguousarray(x, dtype=q.dtype)
        info = np.iinfo(q.dtype)
        scaled = np.round(x / np.float32(q.scale)) + np.float32(q.zero_point)
        clipped: npt.NDArray[np.float32] = np.clip(scaled, info.min, info.max)
        return clipped.astype(q.dtype)

    def _dequantize(self, y: npt.NDArray[Any]) -> Array:
        q = self._out_quant
        if not q.quantized:
            return np.asarray(y, dtype=np.float32)
        return ((y.astype(np.float32) - np.float32(q.zero_point)) * np.float32(q.scale)).astype(
            np.float32, copy=False)

    def _resize(self, batch: int, item: tuple[int, ...]) -> None:
        shape = [batch, *item]
        self._interp.resize_tensor_input(self._in_index, shape, strict=False)
        self._interp.allocate_tensors()
        self._batch = batch

    def _invoke(self, x: npt.NDArray[Any]) -> npt.NDArray[Any]:
        self._interp.set_tensor(self._in_index, x)
        self._interp.invoke()
        out: npt.NDArray[Any] = self._interp.get_tensor(self._out_index)
        return out

    def _run_native(self, x: npt.NDArray[Any]) -> npt.NDArray[Any]:
        """Run x, already in the model's layout and dtype, of any batch size."""
        n, item = x.shape[0], tuple(int(d) for d in x.shape[1:])
        if n != self._batch and self._resizable:
            try:
                self._resize(n, item)
                out = self._invoke(x)
                if out.shape[0] == n:
                    return out
            except (ValueError, RuntimeError):
                pass
            # The graph does not take another batch size (fixed reshapes): item by item.
            self._resizable = False
            self._resize(self._fixed_batch, item)
        if n == self._batch:
            return self._invoke(x)
        step = self._batch
        outs = []
        for i in range(0, n, step):
            chunk = x[i : i + step]
            if len(chunk) < step:  # pad the last chunk to the fixed batch
                pad = np.zeros((step - len(chunk), *chunk.shape[1:]), dtype=chunk.dtype)
                outs.append(self._invoke(np.concatenate([chunk, pad]))[: len(chunk)])
            else:
                outs.append(self._invoke(chunk))
        return np.concatenate(outs)

    def run(self, batch: Array) -> Array:
        if batch.ndim != 4:
            raise BackendError(f"expected a batch [N, C, H, W], got shape {list(batch.shape)}")
        layout = self.layout(tuple(int(d) for d in batch.shape[1:]))
        x = batch if layout == NCHW else batch.transpose(0, 2, 3, 1)
        y = self._run_native(np.ascontiguousarray(self._quantize(x)))
        out = self._dequantize(y)
        if layout == NHWC:
            out = out.transpose(0, 3, 1, 2)
        return np.ascontiguousarray(out)

    def close(self) -> None:
        self._interp = None
