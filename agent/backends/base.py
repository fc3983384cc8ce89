"""The runtime interface: float32 NCHW in, float32 NCHW out, session built once."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from agent.errors import AgentError

Array = npt.NDArray[np.float32]


class BackendError(AgentError):
    """The runtime cannot load or run the model."""


# onnxruntime execution providers by their config names, in the order they are preferred.
ONNX_PROVIDERS = {
    "tensorrt": "TensorrtExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "cpu": "CPUExecutionProvider",
}
GRAPH_OPTIMIZATION_LEVELS = ("disable", "basic", "extended", "all")


@dataclass(frozen=True)
class RunnerOptions:
    intra_op_threads: int = 0  # 0 = let the runtime choose (one per core)
    inter_op_threads: int = 1
    input_name: str = "input"
    output_name: str = "output"
    # onnxruntime only: providers to use where installed (config names, ONNX_PROVIDERS);
    # the CPU provider is always the last fallback.
    onnx_providers: tuple[str, ...] = ("cpu",)
    graph_optimization: str = "all"  # one of GRAPH_OPTIMIZATION_LEVELS
    cache_dir: Path | None = None  # where a provider may keep compiled engines (TensorRT)


class ModelRunner(ABC):
    """One loaded model on one runtime. Not thread-safe: one caller at a time."""

    runtime: str = "?"

    @abstractmethod
    def run(self, batch: Array) -> Array:
        """Run a batch shaped [N, C, H, W] (float32) and return [N, C', H, W] (float32)."""

    def describe(self) -> dict[str, Any]:
        """What serves the model, for status and logs (runtime, providers, ...)."""
        return {"runtime": self.runtime}

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release the runtime's resources."""
