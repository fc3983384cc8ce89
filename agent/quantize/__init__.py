"""``iomt-agent model quantize``: an operator's float ONNX model, calibrated on their DICOMs,
becomes a complete int8 bundle (golden set, report, model card) that the agent's guard
passes. See ``docs/quantize.md``.

| module | job |
|---|---|
| ``run`` | wires the steps |
| ``inputs`` | DICOMs -> model inputs, split into calibration and golden |
| ``graph`` | the model against the contract; GMAC |
| ``cpu`` | saturation-safe weights or not, for the CPUs that will serve it |
| ``pair_weights`` | 8-bit weights with limited pair sums, which cannot saturate |
| ``nhwc`` | the exact NHWC rewrite the int8 graph is quantized from |
| ``qdq`` | onnxruntime's static QDQ quantization |
| ``session`` | options; a candidate judged with the guard |
| ``sensitivity`` | per-layer error; which nodes stay float |
| ``domain`` | the domain reference (domain.json) from the calibration inputs |
| ``writer`` | the staged bundle and its final checks |
| ``report`` | bundle.json, model card, the table |
| ``tflite`` | optional LiteRT export |
| ``progress`` | progress on stderr |
| ``errors`` | what it fails with, by exit status |
"""

from agent.quantize.errors import BadInput, FloorNotReached, QuantizeError

__all__ = ["BadInput", "FloorNotReached", "QuantizeError"]
