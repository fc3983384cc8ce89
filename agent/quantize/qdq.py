"""Static int8 QDQ quantization with onnxruntime's tooling.

First ``nhwc``'s exact rewrite (nearest x2 Resize, space-to-depth and depth-to-space spelt in
NHWC), then ``quant_pre_process`` (ONNX shape inference and graph optimisation, as
onnxruntime advises), then ``quantize_static``: QDQ format, u8 activations calibrated with
MinMax over the calibration inputs, s8 weights per output channel. When the target CPU may
lack int8 dot-product, the weights must not saturate its 16-bit pair sums: 8-bit codes with
limited pair sums (``pair_weights``) where every int8 weight is a Conv's, else
``reduce_range`` (7-bit weights). The sensitivity pass re-quantizes with
some nodes excluded; float tensor ranges do not depend on which nodes are quantized, so the
ranges of the first calibration are reused from onnxruntime's calibration cache
(onnxruntime >= 1.23: ``calibration_cache_path``; older ones calibrate again each time).
"""

from __future__ import annotations

import contextlib
import inspect
import logging
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from agent.quantize.errors import BadInput

Floats = npt.NDArray[np.float32]
SETTINGS = {"format": "QDQ", "activations": "uint8 (asymmetric, MinMax calibration)",
            "weights": "int8 per output channel (symmetric)"}


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """onnxruntime.quantization logs advice at WARNING through the root logger."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def _reader(input_name: str, inputs: Sequence[Floats], tick: Callable[[], None] | None) -> Any:
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(CalibrationDataReader):  # type: ignore[misc]
        """Feeds the calibration inputs one at a time (batch of one, as the agent runs)."""

        def __init__(self) -> None:
            self._items = iter(inputs)

        def get_next(self) -> dict[str, Floats] | None:
            x = next(self._items, None)
            if x is None:
                return None
            if tick is not None:
                tick()
            return {input_name: np.ascontiguousarray(x[None], dtype=np.float32)}

    return Reader()


class Quantizer:
    """One float model, its calibration inputs and the settings; ``quantize`` makes an int8
    model with the given nodes left in float."""

    def __init__(self, fp32: Path, workdir: Path, input_name: str, calibration: Sequence[Floats],
                 *, saturation_safe: bool) -> None:
        self.fp32, self.workdir, self.input_name = fp32, workdir, input_name
        self.calibration = calibration
        # Saturation-safe weights wanted: pair-limited 8-bit codes, unless the model has
        # int8 weights outside Conv (then reduce_range; decided on the first quantize).
        self.safe_weights = saturation_safe
        self.pair_limited: bool | None = None if saturation_safe else False
        self.model = fp32  # what quantize_static reads: the pre-processed model when it worked
        self.pre_process_note = "not run"
        self._cache = workdir / "calibration-ranges.json"
        self.cache_supported = "calibration_cache_path" in inspect.signature(
            self._quantize_static()).parameters
        self.calibrations = 0

    @staticmethod
    def _quantize_static() -> Callable[..., Any]:
        from onnxruntime.quantization import quantize_static

        return quantize_static  # type: ignore[no-any-return]

    def _nhwc_rewrite(self) -> tuple[Path, str]:
        """``nhwc``'s exact rewrite (checked on two calibration inputs) when it applies:
        the graph to pre-process, and what was done."""
        from agent.quantize import nhwc

        out = self.workdir / "model.fp32.nhwc.onnx"
        try:
            counts = nhwc.rewrite_file(self.fp32, out, np.stack(list(self.calibration[:2])))
        except Exception as exc:  # a graph it cannot handle is quantized as given
            return self.fp32, f"NHWC rewrite not applied ({type(exc).__name__}: {exc})"
        if not any(counts.values()):
            return self.fp32, "NHWC rewrite: nothing to rewrite"
        done = ", ".join(f"{n} {kind}" for kind, n in counts.items() if n)
        return out, f"NHWC rewrite ({done}; the same output, checked)"

    def pre_process(self) -> str:
        """``nhwc``'s rewrite, then ``quant_pre_process``; where either fails, the model is
        quantized without it (noted)."""
        from onnxruntime.quantization.shape_inference import quant_pre_process

        source, rewrite_note = self._nhwc_rewrite()
        pre = self.workdir / "model.fp32.pre.onnx"
        try:
            with _quiet():
                # The symbolic pass is for transformer graphs; it chokes on Resize's batch dim.
                quant_pre_process(str(source), str(pre), skip_symbolic_shape=True)
        except Exception as exc:  # its failures are of many types
            self.model = source
            self.pre_process_note = (f"{rewrite_note}; quant_pre_process failed "
                                     f"({type(exc).__name__}: {exc}), quantized without it")
        else:
            self.model = pre
            self.pre_process_note = (f"{rewrite_note}; quant_pre_process (ONNX shape "
                                     "inference, optimisation)")
        return self.pre_process_note

    def quantize(self, out: Path, exclude: Sequence[str] = (),
                 tick: Callable[[], None] | None = None) -> Path:
        """Write the int8 QDQ model to ``out`` with ``exclude`` (node names) in float."""
        from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType

        cached = self.cache_supported and self._cache.is_file()
        pairs = self.pair_limited is not False
        kwargs: dict[str, Any] = {}
        if self.cache_supported:
            kwargs["calibration_cache_path"] = str(self._cache)
        reader = None if cached else _reader(self.input_name, self.calibration, tick)
        try:
            with _quiet():
                self._quantize_static()(
                    str(self.model), str(out), reader,
                    quant_format=QuantFormat.QDQ,
                    per_channel=True,
                    reduce_range=self.safe_weights and not pairs,
                    activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8,
                    calibrate_method=CalibrationMethod.MinMax,
                    nodes_to_exclude=list(exclude),
                    **kwargs,
                )
        except Exception as exc:
            raise BadInput(f"onnxruntime cannot quantize {self.fp32.name}: "
                           f"{type(exc).__name__}: {exc}") from exc
        if not cached:
            self.calibrations += 1
        if pairs:
            return self._limit_pairs(out, exclude, tick)
        return out

    @property
    def reduce_range(self) -> bool:
        """Whether the weights are 7-bit (``reduce_range``)."""
        return self.safe_weights and self.pair_limited is False

    def _limit_pairs(self, out: Path, exclude: Sequence[str],
                     tick: Callable[[], None] | None) -> Path:
        """``pair_weights.limit_pairs`` on the file just written; a model it does not cover
        (int8 weights outside Conv, asymmetric weights, a Conv it cannot match to the float
        model) is quantized again with ``reduce_range``, and stays so."""
        import onnx

        from agent.quantize import pair_weights

        model = onnx.load(str(out))
        try:
            if pair_weights.weights_outside_conv(model):
                raise ValueError("int8 weights outside Conv")
            # No bias correction here: on the reference full model it brought int8 2.3 dB
            # closer to fp32, on the quantize tests' small net it cost 7 dB.
            pair_weights.limit_pairs(model, onnx.load(str(self.model)))
        except (ValueError, KeyError):  # a graph limit_pairs does not cover: 7-bit weights
            self.pair_limited = False
            return self.quantize(out, exclude, tick)
        if not pair_weights.pair_sums_within_limit(model):  # limit_pairs guarantees it
            raise RuntimeError(f"{self.fp32.name}: weights over the pair limit (a bug)")
        onnx.save(model, str(out))
        self.pair_limited = True
        return out

    def weights_note(self) -> str:
        """What the weights are, for the report."""
        if not self.safe_weights:
            return "8-bit"
        if self.pair_limited:
            return ("8-bit with limited pair sums (|w_a| + |w_b| <= 128 for each two that a "
                    "16-bit lane adds), which cannot saturate")
        return "7-bit (reduce_range), which cannot saturate"
