"""What ``iomt-agent model quantize`` can fail with, by exit status."""

from __future__ import annotations

from agent.errors import AgentError

QUANTIZE_EXTRA_HINT = 'pip install "iomt-edge-agent[quantize]"'
CONVERT_EXTRA_HINT = 'pip install "iomt-edge-agent[convert]"'


class QuantizeError(AgentError):
    """Base class; ``exit_code`` is what the CLI returns."""

    exit_code = 1


class BadInput(QuantizeError):
    """The inputs cannot be used (contract, model, DICOM directory, output directory, a
    missing extra): exit 2. The message says what to fix."""

    exit_code = 2


class FloorNotReached(QuantizeError):
    """No int8 model within the node budget reaches the fidelity floor plus margin: exit 1."""

    exit_code = 1


def require_onnx() -> None:
    """Fail up front, naming the extra, when the quantization tooling is missing."""
    try:
        import onnx  # noqa: F401
        import onnxruntime.quantization  # noqa: F401
    except ImportError as exc:
        raise BadInput(f"model quantize needs the onnx package ({exc.name} is missing): "
                       f"run `{QUANTIZE_EXTRA_HINT}`") from None
