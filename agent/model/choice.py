"""What ``backend = "auto"`` weighed and what it chose: one ``Candidate`` per runtime x
precision, the ranking rule (``pick``) and the sentence that says why (``explain``).

Pure: no runtime is opened here, so the rule and the wording are tested with plain numbers
(``agent.model.candidates`` does the opening, guarding and timing).

The ranking: the lowest median latency wins, except that a candidate within ``TIE_MARGIN``
of the fastest wins when it comes earlier in the preference order: the bundle's served
precision (int8) before fp32, then ``RUNTIMES`` order. So fp32 serves only where it is
faster than every int8 file that passes the guard by more than the margin, and noise
between two near-equal candidates does not flip the choice from one start to the next.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from agent.backends import RUNTIMES

if TYPE_CHECKING:
    from agent.cpu import CpuInfo
    from agent.model.guard import GuardReport

FP32 = "fp32"
TIE_MARGIN = 0.05  # a preferred candidate this much slower than the fastest still wins
Key = tuple[str, str]  # (runtime, precision)


def label(key: Key) -> str:
    """``"litert int8"``: how a candidate is named in reasons and reports."""
    return f"{key[0]} {key[1]}"


@dataclass(frozen=True)
class Candidate:
    """One runtime x precision in a selection: whether it could serve, and its figures."""

    runtime: str
    precision: str
    ok: bool
    reason: str
    median_ms: float | None = None
    worst_psnr_db: float | None = None
    # Median on a session of one model worker's share of the cores, where the choice was
    # made for several workers (``WorkerPlan``): the figure that ranked it then.
    worker_ms: float | None = None

    @property
    def key(self) -> Key:
        return (self.runtime, self.precision)

    def as_dict(self) -> dict[str, Any]:
        db = self.worst_psnr_db
        psnr: float | str | None = db
        if db is not None:
            psnr = round(db, 3) if math.isfinite(db) else (None if math.isnan(db) else "inf")
        out = {"runtime": self.runtime, "precision": self.precision, "ok": self.ok,
               "reason": self.reason, "median_ms": self.median_ms, "worst_psnr_db": psnr}
        if self.worker_ms is not None:
            out["worker_ms"] = self.worker_ms
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Candidate:
        psnr = d.get("worst_psnr_db")
        return cls(runtime=str(d["runtime"]), precision=str(d["precision"]), ok=bool(d["ok"]),
                   reason=str(d["reason"]), median_ms=d.get("median_ms"),
                   worst_psnr_db=math.inf if psnr == "inf" else psnr,
                   worker_ms=d.get("worker_ms"))


@dataclass(frozen=True)
class Choice:
    """What ``choose_runner`` picked and why (for status and logs)."""

    runtime: str
    precision: str  # "int8" (the bundle's served files) or "fp32" (its references)
    digest: str  # sha256 of the served file: the model half of every idempotency key
    model_key: str  # the cache key: digest of the bundle's model files
    threads: int
    cached: bool  # True: taken from the cache, only the guard ran
    candidates: tuple[Candidate, ...]
    reason: str  # one sentence: why this candidate (see ``explain``)
    guard: GuardReport = field(repr=False)  # the chosen runner's guard report
    chosen_at: str = ""
    # Chosen under a ``WorkerPlan``: how many model workers (one for a fast model) and the
    # threads of each one's session. Then the runner handed back is the first worker's.
    workers: int = 1
    worker_threads: int | None = None
    plan_ms: float | None = None  # the all-core median the plan was applied to
    # Why a plan that applied serves one all-core session: no session of a worker's share
    # passed the guard. Serving then opens no further sessions (they would fail the same way).
    unsplit: str = ""

    def summary(self) -> dict[str, Any]:
        """JSON-safe, for the status message and the selection log line."""
        return {
            "mode": "auto",
            "runtime": self.runtime,
            "precision": self.precision,
            "reason": self.reason,
            "cached": self.cached,
            "chosen_at": self.chosen_at,
            "model_key": self.model_key[:16],
            **({"workers": self.workers, "worker_threads": self.worker_threads}
               if self.worker_threads is not None else {}),
            "candidates": [c.as_dict() for c in self.candidates],
        }


@dataclass(frozen=True)
class WorkerPlan:
    """How serving shares out the cores (``model.workers``;
    ``agent.model.serving.worker_plan`` makes it): ``workers`` sessions of ``threads``
    threads each from an all-core median of ``min_ms`` (0: always), and one such session
    below ``share_below_ms`` (the other cores left to the agent's own work); in between,
    one session on all cores. Under a plan that applies, ``auto`` ranks the candidates on
    sessions of ``threads`` threads: a runtime that
    scales well over the cores can tie on all of them and lose on one
    (lite on the AVX2 kernels: onnxruntime and LiteRT int8 57.5 slices/s each on 2
    threads, 47.0 against 33.4 on 1)."""

    workers: int
    threads: int
    min_ms: float = 0.0
    share_below_ms: float = 0.0

    def applies(self, all_core_ms: float) -> bool:
        """Whether the cores are shared out for a model this fast on all of them."""
        return all_core_ms >= self.min_ms or all_core_ms < self.share_below_ms

    def workers_for(self, all_core_ms: float) -> int:
        """How many workers, where the plan applies."""
        return self.workers if all_core_ms >= self.min_ms else 1

    def as_dict(self) -> dict[str, Any]:
        return {"workers": self.workers, "threads": self.threads, "min_ms": self.min_ms,
                "share_below_ms": self.share_below_ms}


def _rank(key: Key, served: str) -> tuple[int, int]:
    runtime, precision = key
    order = RUNTIMES.index(runtime) if runtime in RUNTIMES else len(RUNTIMES)
    return (0 if precision == served else 1, order)


def pick(medians: dict[Key, float], served: str) -> Key:
    """The candidate to serve among timed ones (``medians``: ms, lower is better);
    ``served`` is the bundle's own precision, preferred on a tie (see the module doc)."""
    if not medians:
        raise ValueError("nothing to choose from")
    fastest = min(medians.values())
    for key in sorted(medians, key=lambda k: _rank(k, served)):
        if medians[key] <= fastest * (1 + TIE_MARGIN):
            return key
    return min(medians, key=lambda k: medians[k])  # not reached: the fastest qualifies


def _ms(value: float) -> str:
    return f"{value:.1f} ms" if value >= 10 else f"{value:.2f} ms"


def cpu_why(cpu: CpuInfo | None) -> str:
    """Why int8 may not pay on this CPU, from what ``agent.cpu`` read of it."""
    if cpu is None:
        return "the CPU could not be identified"
    isa = ", ".join(cpu.isa) or cpu.arch or "unknown ISA"
    if cpu.int8_dot is None and cpu.groups and all(g.int8_macs <= g.fp32_macs
                                                   for g in cpu.groups):
        return (f"this CPU has no int8 dot product ({isa}) and one vector integer "
                "multiplier, so int8 MACs run at the fp32 rate at best: int8 gains only "
                "in bytes moved, less than quantize steps cost")
    if cpu.int8_dot is None:
        return (f"this CPU has no int8 dot product ({isa}), so int8 MACs are at best 2x the "
                "fp32 rate, less than quantize steps and memory traffic cost")
    return (f"although this CPU has int8 dot products ({cpu.int8_dot}): the int8 files "
            "lose to memory traffic and float operators here, not to MACs")


def explain(chosen: Key, candidates: list[Candidate], served: str,
            cpu: CpuInfo | None = None, accelerator: str | None = None) -> str:
    """One sentence for the status, the log line and ``iomt-agent bench``: why ``chosen``.

    ``candidates`` are every one considered (timed ones carry ``median_ms``); ``cpu`` is only
    read when fp32 wins over a timed int8 file, to say why int8 did not pay here, unless
    the fp32 file ran on an ``accelerator`` (an onnxruntime GPU provider), which is then
    the why."""
    timed = {c.key: c.median_ms for c in candidates if c.ok and c.median_ms is not None}
    ms = timed.get(chosen)
    if ms is None:
        return f"{label(chosen)}: the only candidate"
    fastest = min(timed, key=lambda k: timed[k])
    others = {k: v for k, v in timed.items() if k != chosen}
    if chosen[1] != served:  # fp32 won
        rivals = {k: v for k, v in others.items() if k[1] == served}
        if not rivals:
            out = [f"{label(c.key)}: {c.reason}" for c in candidates
                   if c.precision == served and not c.ok]
            why = "; ".join(out) or f"the bundle has no {served} file for an installed runtime"
            return (f"{chosen[1]} on {chosen[0]} ({_ms(ms)}): no {served} file can serve "
                    f"here ({why})")
        best = min(rivals, key=lambda k: rivals[k])
        why = (f"it runs on {accelerator}, not on the CPU" if accelerator else cpu_why(cpu))
        return (f"{chosen[1]} on {chosen[0]} is {rivals[best] / ms:.2f}x faster than the best "
                f"{served} ({label(best)} {_ms(rivals[best])} vs {_ms(ms)}): {why}")
    text = f"{chosen[1]} on {chosen[0]} ({_ms(ms)})"
    if fastest != chosen:
        return (f"{text}: within {TIE_MARGIN:.0%} of the fastest ({label(fastest)} "
                f"{_ms(timed[fastest])}), and {served} before fp32, then "
                f"{' before '.join(RUNTIMES)}, is preferred on a tie")
    fp32 = {k: v for k, v in others.items() if k[1] != served}
    if fp32:
        best = min(fp32, key=lambda k: fp32[k])
        return (f"{text}: the fastest; {fp32[best] / ms:.2f}x faster than the best fp32 "
                f"({label(best)} {_ms(fp32[best])})")
    return f"{text}: the fastest" + (f" of {len(timed)} that pass the guard"
                                     if len(timed) > 1 else " that passes the guard")


def explain_for_workers(chosen: Key, candidates: list[Candidate], served: str,
                        plan: WorkerPlan, cpu: CpuInfo | None = None) -> str:
    """``explain`` where the candidates were ranked for ``plan``: on their ``worker_ms``."""
    per_worker = [replace(c, median_ms=c.worker_ms) for c in candidates]
    threads = f"{plan.threads} thread" + ("s" if plan.threads > 1 else "")
    who = ("the model worker runs it" if plan.workers == 1
           else f"each of the {plan.workers} model workers runs it")
    return f"{explain(chosen, per_worker, served, cpu)} (timed on sessions of {threads}, as {who})"
