"""The ``[model]`` section of the config: the bundle to serve, the runtime (or ``auto``) and
its sessions (``agent.model.serving``). Kept apart from ``agent.config`` only for its size."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

OnnxProvider = Literal["tensorrt", "cuda", "cpu"]
DEFAULT_ONNX_PROVIDERS: tuple[OnnxProvider, ...] = ("tensorrt", "cuda", "cpu")


class ModelSection(BaseModel):
    """What this node serves and how."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    bundle: Path = Field(title="Model bundle", description="Directory holding bundle.json")
    backend: Literal["onnxruntime", "litert", "auto"] = Field(
        "onnxruntime",
        title="Runtime",
        description="Inference runtime: onnxruntime, litert (serving the bundle's int8 file), "
        "or auto (every installed runtime x {int8, fp32} file that passes the guard is timed "
        "at model load; the fastest serves, int8 on a tie; cached per model in the state dir)",
    )
    intra_op_threads: int = Field(
        0, ge=0, le=256, title="Intra-op threads",
        description="Threads per model worker's session (0 = the cores shared out: half of "
        "them to each of two workers, or to the one worker of a model under 5 ms, the rest "
        "left to the agent's own work; else all of them)"
    )
    workers: int = Field(
        0, ge=0, le=8, title="Model workers",
        description="Slices inferred at the same time, each on its own session of the served "
        "file. 0 = 2 where there are two or more cores and the model takes 10 ms or more per "
        "slice (the model is then the slowest stage), else 1 (on half the cores under 5 ms), "
        "and 1 on an accelerator. Every session is guarded; with intra_op_threads = 0 each "
        "gets cores / workers threads",
    )
    inter_op_threads: int = Field(
        1, ge=1, le=64, title="Inter-op threads",
        description="Threads running independent graph branches (onnxruntime); 1 suits a U-Net",
    )
    onnx_providers: list[OnnxProvider] = Field(
        default_factory=lambda: list(DEFAULT_ONNX_PROVIDERS),
        min_length=1,
        title="onnxruntime execution providers",
        description="Tried in this order where the installed onnxruntime has them (TensorRT and "
        "CUDA on a Jetson with onnxruntime-gpu); the CPU provider is always the last fallback",
    )
    graph_optimization: Literal["disable", "basic", "extended", "all"] = Field(
        "all",
        title="onnxruntime graph optimisation",
        description="Graph optimisation level; 'all' fuses int8 QDQ groups into integer kernels",
    )
