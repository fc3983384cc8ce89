"""Summaries of the end-to-end benchmark: medians over the alternating rounds, the ratios the
issue's targets are stated in, the table it prints and the JSON it writes."""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import Any

from bench.rounds import Flood


@dataclass
class Contestant:
    """What the rounds measured for one contestant (agent, naive script or raw backend)."""

    rounds: list[Flood] = field(default_factory=list)
    cpu_s: list[float] = field(default_factory=list)  # process CPU seconds per round
    tree_cpu_s: list[float] = field(default_factory=list)  # with its child processes
    machine_cpu_s: list[float] = field(default_factory=list)  # every process on the machine

    def rates(self) -> list[float]:
        return [r.rate for r in self.rounds]

    def median_rate(self) -> float:
        return statistics.median(self.rates())

    def cpu_ms_per_slice(self) -> float | None:
        if not self.cpu_s:
            return None
        return 1000 * sum(self.cpu_s) / sum(r.n for r in self.rounds)

    def ms_per_slice(self, seconds: list[float]) -> float | None:
        if not seconds:
            return None
        return 1000 * sum(seconds) / sum(r.n for r in self.rounds)

    def cores_busy(self) -> float | None:
        """Average cores the process kept busy during its rounds (CPU time / wall time)."""
        if not self.cpu_s:
            return None
        return sum(self.cpu_s) / sum(r.seconds for r in self.rounds)

    def summary(self) -> dict[str, Any]:
        return {"slices_per_s": {"median": self.median_rate(), "rounds": self.rates()},
                "slices_per_round": [r.n for r in self.rounds],
                "cpu_ms_per_slice": self.cpu_ms_per_slice(), "cores_busy": self.cores_busy(),
                "tree_cpu_ms_per_slice": self.ms_per_slice(self.tree_cpu_s),
                "machine_cpu_ms_per_slice": self.ms_per_slice(self.machine_cpu_s),
                "machine_cores_busy": (sum(self.machine_cpu_s) / sum(r.seconds for r in
                                       self.rounds)) if self.machine_cpu_s else None}


def pairwise_ratio(a: Contestant, b: Contestant) -> dict[str, float]:
    """a / b per round (round i of each ran back to back) and its median, min and max."""
    ratios = [x / y for x, y in zip(a.rates(), b.rates(), strict=True)]
    return {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios)}


def cpu_bound_ratio(a: Contestant, b: Contestant) -> float | None:
    """b's whole-machine CPU per slice over a's: the throughput ratio a / b when both keep
    every core busy (what a could reach at best while it costs the machine that much)."""
    x, y = a.ms_per_slice(a.machine_cpu_s), b.ms_per_slice(b.machine_cpu_s)
    return None if not x or not y else y / x


def stage_medians(events: list[dict[str, Any]]) -> dict[str, float]:
    """Median per stage of the agent's ``slice_processed`` log lines, plus their sum, the
    median ``total_ms`` (infer start .. committed) and the inbox-to-commit time, and
    ``own_cpu_ms``: the median over slices of the agent's CPU in every stage but the
    model's (their ``cpu_ms``)."""
    stages: dict[str, list[float]] = {}
    for e in events:
        for name, ms in (e.get("stages_ms") or {}).items():
            stages.setdefault(name, []).append(float(ms))
    out = {name: statistics.median(v) for name, v in stages.items()}
    out["sum_of_stages"] = sum(out.values())
    own = [sum(float(ms) for ms in e["cpu_ms"].values()) for e in events if e.get("cpu_ms")]
    if own:
        out["own_cpu_ms"] = statistics.median(own)
    for key in ("total_ms", "since_received_ms"):
        values = [float(e[key]) for e in events if key in e]
        if values:
            out[key] = statistics.median(values)
    return out


def thread_ms_per_slice(before: dict[str, float], after: dict[str, float],
                        slices: int) -> dict[str, float]:
    """CPU milliseconds per slice of each thread that did real work (>= 0.2 ms), busiest
    first."""
    out = {}
    for key, t in sorted(after.items(), key=lambda kv: before.get(kv[0], 0) - kv[1]):
        ms = 1000 * (t - before.get(key, 0.0)) / slices
        if ms >= 0.2:
            out[key] = round(ms, 2)
    return out


def print_table(result: dict[str, Any]) -> None:
    """The human summary of ``result`` (the JSON the benchmark writes)."""
    cs = result["contestants"]
    agents = [name for name, c in cs.items() if "stages_ms" in c]
    first = next(iter(cs.values()))
    rows = [
        ("model / agent runtime", f"{result['model']['name']} / {result['agent_runtime']} "
                                  f"(backend = {result['backend']}, intra_op_threads = "
                                  f"{result['agent_intra_op_threads']})"),
        ("rounds x slices per contestant",
         f"{len(first['slices_per_round'])} x {first['slices_per_round'][0]}"),
    ]
    for name, c in cs.items():
        rows += [
            (f"{name}: slices/s (median of rounds)", f"{c['slices_per_s']['median']:.1f}"),
            (f"{name}: CPU ms per slice, cores busy",
             f"{c['cpu_ms_per_slice']:.1f}, {c['cores_busy']:.2f}"),
            (f"{name}: CPU ms per slice with its child processes; whole machine, cores busy",
             f"{c['tree_cpu_ms_per_slice']:.1f}; {c['machine_cpu_ms_per_slice']:.1f}, "
             f"{c['machine_cores_busy']:.2f}"),
            (f"{name}: CPU ms per slice by thread",
             ", ".join(f"{k} {v:.1f}" for k, v in c["threads_cpu_ms_per_slice"].items())),
            (f"{name}: RSS after {c['rss_mb']['after_slices']} slices / peak (MB)",
             f"{c['rss_mb']['now']:.0f} / {c['rss_mb']['peak']:.0f}"),
        ]
    for name in agents:
        c = cs[name]
        rows += [
            (f"{name}: stages (median ms)", ", ".join(
                f"{k} {v:.1f}" for k, v in c["stages_ms"].items())),
            (f"{name}: READY first / second start (s)",
             f"{c['ready_s']['first']:.2f} / {c['ready_s']['second']:.2f} (model guarded "
             f"after {c['ready_s']['first_to_model_guarded']:.2f} / "
             f"{c['ready_s']['second_to_model_guarded']:.2f}; choice cached: "
             f"{c['ready_s']['second_cached']})"),
        ]
    raw = result["raw_backend"]
    rows += [
        ("raw backend: slices/s (median of rounds), CPU ms per slice; whole machine",
         f"{raw['slices_per_s']['median']:.1f}, {raw['cpu_ms_per_slice']:.1f}; "
         f"{raw['machine_cpu_ms_per_slice']:.1f}"),
        ("agent / script (median of round ratios; min-max)", _ratio(result["agent_over_script"])),
        ("end to end / raw (median of round ratios; min-max)", _ratio(result["e2e_over_raw"])),
        ("end to end / raw if CPU-bound (raw's machine CPU per slice / the agent round's)",
         f"{result['e2e_over_raw_cpu_bound']:.2f}"
         if result.get("e2e_over_raw_cpu_bound") else "-"),
    ]
    if "agent_over_compare" in result:
        rows.append(("agent / agent (--compare)", _ratio(result["agent_over_compare"])))
    lat = result.get("latency_ms")
    if lat:
        rows.append((f"agent latency p50 / p95 at {lat['paced_at_slices_per_s']:.1f} slices/s "
                     "(ms)", f"{lat['p50']:.0f} / {lat['p95']:.0f}"))
    width = max(len(k) for k, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")


def _ratio(r: dict[str, float]) -> str:
    return f"{r['median']:.2f} ({r['min']:.2f}-{r['max']:.2f})"
