"""The runtime interface: float32 NCHW in, float32 NCHW out, session built once."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

Array = npt.NDArray[np.float32]


class BackendError(Exception):
    """The runtime cannot load or run the model."""


@dataclass(frozen=True)
class RunnerOptions:
    intra_op_threads: int = 0  # 0 = let the runtime choose (one per core)
    inter_op_threads: int = 1
    input_name: str = "input"
    output_name: str = "output"


class ModelRunner(ABC):
    """One loaded model on one runtime. Not thread-safe: one caller at a time."""

    runtime: str = "?"

    @abstractmethod
    def run(self, batch: Array) -> Array:
        """Run a batch shaped [N, C, H, W] (float32) and return [N, C', H, W] (float32)."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release the runtime's resources."""
