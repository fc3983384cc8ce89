"""What a bench run produced: its options, one ``Row`` per bundle x runtime x precision,
each bundle's figures and the machine's. Filled in by ``run``, rendered by ``report``."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.backends import RUNTIMES
from agent.bench import measure
from agent.bench.child import RssFigures
from agent.cpu import CpuInfo, PeakEstimate, usable_cpus
from agent.model.bundle import ModelBundle

Progress = Callable[[str], None]


@dataclass(frozen=True)
class BenchOptions:
    runs: int = 40  # timed batch-1 runs per row for the latency
    threads: tuple[int, ...] = ()  # throughput thread counts; () = 1 and every core
    batches: tuple[int, ...] = (1, 4)
    throughput_runs: int = 8  # timed batches per throughput cell
    runtimes: tuple[str, ...] = RUNTIMES
    auto_rounds: int = 3  # choose_runner's rounds over the golden set
    progress: Progress | None = None

    @property
    def thread_counts(self) -> tuple[int, ...]:
        cores = usable_cpus()
        return self.threads or tuple(sorted({1, cores}))

    @property
    def latency_threads(self) -> int:
        return max(self.thread_counts)


@dataclass
class Row:
    """One bundle x runtime x precision."""

    runtime: str
    precision: str  # "fp32", or the bundle's precision for the served file
    role: str  # "reference" (fp32) or "served"
    path: Path | None
    reason: str | None = None  # why it has no figures
    latency: measure.Latency | None = None
    throughput: list[measure.Throughput] = field(default_factory=list)
    rss: RssFigures | None = None
    rss_error: str | None = None
    fidelity: measure.Fidelity | None = None
    fidelity_note: str | None = None
    gmac_per_s: float | None = None
    peak_gmacs: float | None = None  # the CPU's estimated peak for this precision
    notes: list[str] = field(default_factory=list)  # what could not be measured, and why

    @property
    def key(self) -> str:
        return f"{self.runtime} {self.role}"

    @property
    def ok(self) -> bool:
        return self.reason is None

    @property
    def size_bytes(self) -> int | None:
        return self.path.stat().st_size if self.path is not None else None


@dataclass(frozen=True)
class AutoChoice:
    """What ``backend = "auto"`` would serve: runtime and precision (None: nothing), and
    why (the selection's own sentence, or why nothing can serve)."""

    runtime: str | None
    reason: str
    candidates: tuple[dict[str, Any], ...] = ()
    precision: str | None = None


@dataclass
class BundleResult:
    bundle: ModelBundle
    item_shape: tuple[int, int, int]
    inputs: str  # what the timing inputs were
    gmac: float | None
    gmac_source: str
    rows: list[Row]
    auto: AutoChoice | None = None


@dataclass(frozen=True)
class Machine:
    cpu: CpuInfo
    peak: PeakEstimate
    runtimes: dict[str, str]  # runtime -> version (installed ones)


@dataclass
class BenchResult:
    machine: Machine
    options: BenchOptions
    bundles: list[BundleResult]
    created: str
