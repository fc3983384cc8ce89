"""``iomt-agent model quantize``: an operator's float ONNX model, calibrated on their DICOMs,
becomes a complete int8 bundle (golden set, report, model card) that the agent's guard
passes. ``run.py`` wires the steps; see ``docs/quantize.md``.

Modules: ``inputs`` (DICOMs -> model inputs, split), ``graph`` (model vs contract, GMAC),
``cpu`` (reduce_range), ``qdq`` (onnxruntime quantization), ``session`` (options, judging a
candidate with the guard), ``sensitivity`` (per-layer error), ``writer`` (staged bundle,
final checks), ``report`` (bundle.json, model card, table), ``tflite`` (optional LiteRT
export), ``progress`` (stderr progress).
"""

from agent.quantize.errors import BadInput, FloorNotReached, QuantizeError

__all__ = ["BadInput", "FloorNotReached", "QuantizeError"]
