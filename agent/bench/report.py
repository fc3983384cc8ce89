"""What ``iomt-agent bench`` prints (aligned text, under 100 columns) and writes (JSON).

JSON schema (``schema_version`` 1): ``machine`` (cpu, peak estimate with its assumptions,
runtime versions), ``options``, and per bundle its ``rows`` (one per runtime x precision:
``status`` ok or skipped with ``reason``; ``latency_ms`` median/p95/min; ``throughput``
items/s per threads x batch; ``rss_mib``; ``fidelity``; ``gmac_per_s``) and ``summary``
(served/fp32 latency ratio per runtime, best of each, ``auto``'s choice). Infinite PSNR is
the string "inf", as in ``iomt-agent model verify --json``.
"""

from __future__ import annotations

import math
import platform
import textwrap
from dataclasses import asdict, dataclass
from typing import Any

from agent import __version__
from agent.bench.results import BenchResult, BundleResult, Row

SCHEMA_VERSION = 1
WIDTH = 100


@dataclass(frozen=True)
class Summary:
    served_over_fp32: dict[str, float]  # runtime -> served median / fp32 median
    best_served: Row | None
    best_fp32: Row | None

    @property
    def best_ratio(self) -> float | None:
        if self.best_served is None or self.best_fp32 is None:
            return None
        assert self.best_served.latency and self.best_fp32.latency
        return self.best_served.latency.median_ms / self.best_fp32.latency.median_ms


def summarise(result: BundleResult) -> Summary:
    """Latency ratios of one bundle's rows (medians of the same alternating run)."""
    timed = [r for r in result.rows if r.latency is not None]
    ratios = {}
    for rt in dict.fromkeys(r.runtime for r in timed):
        pair = {r.role: r.latency.median_ms for r in timed if r.runtime == rt and r.latency}
        if "served" in pair and "reference" in pair:
            ratios[rt] = pair["served"] / pair["reference"]

    def best(role: str) -> Row | None:
        rows = [r for r in timed if r.role == role and r.latency]
        return min(rows, key=lambda r: r.latency.median_ms if r.latency else 0, default=None)

    return Summary(ratios, best("served"), best("reference"))


def _num(value: float | None) -> Any:
    """JSON-safe, 6 significant digits; infinities as "inf" / "-inf"."""
    if value is None or math.isnan(value):
        return None
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return float(f"{value:.6g}")


def _db(value: float | None) -> str:
    if value is None:
        return "-"
    return "inf" if math.isinf(value) and value > 0 else f"{value:.2f}"


def _wrap(text: str, indent: str = "  ") -> list[str]:
    return textwrap.wrap(text, WIDTH, subsequent_indent=indent, break_on_hyphens=False)


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


# -- text -------------------------------------------------------------------------------
def machine_lines(result: BenchResult) -> list[str]:
    m = result.machine
    cpu = m.cpu
    runtimes = ", ".join(f"{k} {v}" for k, v in m.runtimes.items()) or "none installed"
    peak = m.peak
    lines = [
        *_wrap(f"machine: {cpu.model}, {cpu.arch}, {cpu.cores} cores ({cpu.logical_cpus} "
               f"logical); {', '.join(cpu.isa)}"),
        *_wrap(f"runtimes: {runtimes}; Python {platform.python_version()}"),
    ]
    if peak.fp32_gmacs is None:
        lines.append("estimated peak: unknown (no clock found)")
    else:
        lines += _wrap(f"estimated peak: fp32 {peak.fp32_gmacs:.0f} GMAC/s, int8 "
                       f"{peak.int8_gmacs:.0f} GMAC/s = {peak.formula} (see below)")
    return lines


def _row_line(row: Row, file_w: int, floor: float | None) -> str:
    name = row.path.name if row.path else "-"
    if len(name) > file_w:
        name = name[: file_w - 1] + "~"
    head = f"{row.runtime:<11} {row.precision:<4}  {name:<{file_w}}"
    if row.latency is None:  # the reason instead of figures, at most 3 lines
        reason = " ".join((row.reason or "not measured").split())
        lines = textwrap.wrap(reason, WIDTH - len(head) - 2, break_on_hyphens=False)
        if len(lines) > 3:
            lines = [*lines[:2], lines[2][: WIDTH - len(head) - 5] + "..."]
        pad = " " * (len(head) + 2)
        return "\n".join([f"{head}  {lines[0]}", *(pad + line for line in lines[1:])])
    size = f"{(row.size_bytes or 0) / 1024:.0f}"
    pct = (f"{100 * row.gmac_per_s / row.peak_gmacs:.0f}%"
           if row.gmac_per_s and row.peak_gmacs else "-")
    worst = row.fidelity.worst_psnr_db if row.fidelity else None
    psnr = _db(worst) + ("*" if floor is not None and worst is not None and worst < floor
                         else "")
    err = _fmt(row.fidelity.max_abs_error if row.fidelity else None, ".2g")
    rss = _fmt(row.rss.batch1_mib if row.rss else None, ".0f")
    return (f"{head} {size:>6} {row.latency.median_ms:>7.2f} {row.latency.p95_ms:>7.2f} "
            f"{_fmt(row.gmac_per_s, '.1f'):>7} {pct:>5} {rss:>5} {psnr:>6} {err:>8}")


def bundle_lines(result: BenchResult, b: BundleResult) -> list[str]:
    opts = result.options
    bundle = b.bundle
    shape = " x ".join(str(d) for d in b.item_shape)
    gmac = f"{b.gmac:.3g} GMAC ({b.gmac_source})" if b.gmac is not None else b.gmac_source
    lines = [
        *_wrap(f"== {bundle.name} {bundle.version} ({bundle.precision}): {shape} per item, "
               f"{gmac}"),
        *_wrap(f"latency: batch 1, {opts.latency_threads} thread(s), {opts.runs} runs per "
               f"row, rows taking turns; inputs: {b.inputs}"),
        "",
    ]
    file_w = min(22, max([4, *(len(r.path.name) for r in b.rows if r.path)]))
    lines.append(f"{'runtime':<11} {'prec':<4}  {'file':<{file_w}} {'size':>6} {'median':>7} "
                 f"{'p95':>7} {'GMAC/s':>7} {'%of':>5} {'RSS':>5} {'PSNR':>6} "
                 f"{'max err':>8}")
    lines.append(f"{'':<17} {'':<{file_w}} {'KiB':>6} {'ms':>7} {'ms':>7} {'':>7} "
                 f"{'peak':>5} {'MiB':>5} {'dB':>6}")
    floor = bundle.golden.min_psnr_db if bundle.golden else None
    lines += [_row_line(r, file_w, floor) for r in b.rows]
    timed = [r for r in b.rows if r.latency is not None]
    cells = list(dict.fromkeys((t.threads, t.batch) for r in timed for t in r.throughput))
    if cells:
        lines += ["", f"{'items/s, threads x batch:':<28}" + "".join(
            f"{f'{t}x{n}':>9}" for t, n in cells)]
        for r in timed:
            got = {(t.threads, t.batch): t.items_per_s for t in r.throughput}
            lines.append(f"{r.runtime:<11} {r.precision:<16}" + "".join(
                f"{_fmt(got.get(c), '.1f'):>9}" for c in cells))
    for r in timed:
        extra = [f"memory probe failed: {r.rss_error}"] if r.rss_error else []
        extra += [f"no fidelity: {r.fidelity_note}"] if r.fidelity_note else []
        for note in [*r.notes, *extra]:
            text = " ".join(f"{r.runtime} {r.precision}: {note}".split())
            lines += _wrap(text if len(text) <= 2 * WIDTH else text[: 2 * WIDTH - 3] + "...")
    lines += ["", *summary_lines(result, b)]
    return lines


def summary_lines(result: BenchResult, b: BundleResult) -> list[str]:
    s = summarise(b)
    served = b.bundle.precision
    ratios = ", ".join(f"{rt} {v:.2f}x" for rt, v in s.served_over_fp32.items())
    lines = _wrap(f"{served} / fp32 latency (median over median): "
                  f"{ratios or 'no runtime has both rows measured'}")
    if s.best_served and s.best_served.latency:
        text = (f"best {served}: {s.best_served.runtime} "
                f"{s.best_served.latency.median_ms:.2f} ms")
        if s.best_fp32 and s.best_fp32.latency and s.best_ratio is not None:
            text += (f"; best fp32: {s.best_fp32.runtime} {s.best_fp32.latency.median_ms:.2f}"
                     f" ms; ratio {s.best_ratio:.2f}x")
        dot = result.machine.cpu.int8_dot
        text += f" (int8 dot product on this CPU: {dot or 'none'})"
        lines += _wrap(text)
    auto = b.auto
    if auto is not None:
        if auto.runtime is None:
            lines += _wrap(f'backend = "auto" would serve nothing: {auto.reason}')
        else:
            seen = ", ".join(
                f"{c['runtime']} {c['precision']} {c['median_ms']:.2f} ms"
                + (f" ({c['worker_ms']:.2f} ms per worker)" if c.get("worker_ms") else "")
                if c.get("median_ms") is not None
                else f"{c['runtime']} {c['precision']} out ({c['reason'][:40]})"
                for c in auto.candidates)
            lines += _wrap(f'backend = "auto" would choose: {auto.runtime} {auto.precision} '
                           f"(its own timing: {seen})")
            lines += _wrap(f"  why: {auto.reason}", "    ")
    return lines


def footnotes(result: BenchResult) -> list[str]:
    cpu = result.machine.cpu
    floors = {b.bundle.golden.min_psnr_db for b in result.bundles if b.bundle.golden}
    rss_sources = {r.rss.source for b in result.bundles for r in b.rows if r.rss}
    before = [r.rss.before_load_mib for b in result.bundles for r in b.rows if r.rss]
    floor_note = (f" A * marks a file below the bundle's fidelity floor "
                  f"({', '.join(f'{f:g}' for f in sorted(floors))} dB): the guard would refuse "
                  "it." if floors else "")
    base = f" (Python, numpy and the agent alone: {min(before):.0f} MiB)" if before else ""
    above = [r for b in result.bundles for r in b.rows
             if r.gmac_per_s and r.peak_gmacs and r.gmac_per_s > r.peak_gmacs]
    above_note = (" Some rows exceed it: the estimate is too low here (a clock under what the "
                  "cores reach, or fewer MACs per cycle assumed than the cores do); read the "
                  "percentages as relative." if above else "")
    return [
        *_wrap("Columns: median and p95 of the batch-1 latency; GMAC/s = GMAC per item / "
               "median; % of the estimated peak for the row's precision; RSS = peak resident "
               "memory of a fresh process that loads the file and runs batch 1, from "
               f"{'/'.join(sorted(rss_sources)) or 'VmHWM'}{base}; PSNR (worst of pooled and "
               "per-input) and max err against the fp32 reference outputs, as the guard "
               f"computes them.{floor_note}"),
        *_wrap("Peak estimate: an estimate from the ISA, not a measurement; real kernels lose "
               "to memory bandwidth, non-MAC operators and clocks that drop under all-core "
               f"load. Clock: {cpu.clock_source}.{above_note}"),
        *(line for a in cpu.assumptions for line in _wrap(f"  - {a}", "    ")),
        *_wrap("Timings on a busy machine are noisy: compare rows of one run (they took "
               "turns), not separate runs."),
    ]


def render(result: BenchResult) -> str:
    """The whole report as text."""
    lines = machine_lines(result)
    for b in result.bundles:
        lines += ["", *bundle_lines(result, b)]
    if len(result.bundles) > 1:
        best = []
        for b in result.bundles:
            s = summarise(b)
            if s.best_served and s.best_served.latency:
                best.append(f"{b.bundle.name} {s.best_served.latency.median_ms:.2f} ms "
                            f"({s.best_served.runtime})")
        if best:
            lines += ["", *_wrap("best served file per bundle (each bundle timed in its "
                                 "own turns): " + ", ".join(best))]
    lines += ["", *footnotes(result)]
    return "\n".join(lines) + "\n"


# -- JSON -------------------------------------------------------------------------------
def _row_json(row: Row) -> dict[str, Any]:
    out: dict[str, Any] = {
        "runtime": row.runtime, "precision": row.precision, "role": row.role,
        "file": row.path.name if row.path else None, "size_bytes": row.size_bytes,
        "status": "ok" if row.latency is not None else "skipped", "reason": row.reason,
    }
    if row.latency is not None:
        lat = row.latency
        out["latency_ms"] = {"median": _num(lat.median_ms), "p95": _num(lat.p95_ms),
                             "min": _num(lat.min_ms), "runs": lat.runs,
                             "threads": lat.threads, "batch": 1}
        out["throughput"] = [{**asdict(t), "items_per_s": _num(t.items_per_s)}
                             for t in row.throughput]
        out["gmac_per_s"] = _num(row.gmac_per_s)
        out["peak_gmac_per_s"] = row.peak_gmacs
        out["rss_mib"] = (None if row.rss is None else
                          {k: _num(v) if isinstance(v, float) else v
                           for k, v in asdict(row.rss).items()})
        out["rss_error"] = row.rss_error
        out["fidelity"] = (None if row.fidelity is None else
                           {k: _num(v) if isinstance(v, float) else v
                            for k, v in asdict(row.fidelity).items()})
        out["fidelity_note"] = row.fidelity_note
        out["notes"] = list(row.notes)
    return out


def _bundle_json(b: BundleResult) -> dict[str, Any]:
    s = summarise(b)
    bundle = b.bundle
    auto = None if b.auto is None else {"runtime": b.auto.runtime,
                                        "precision": b.auto.precision,
                                        "reason": b.auto.reason,
                                        "candidates": list(b.auto.candidates)}
    return {
        "name": bundle.name, "version": bundle.version, "path": str(bundle.root),
        "precision": bundle.precision, "item_shape": list(b.item_shape), "inputs": b.inputs,
        "gmac": b.gmac, "gmac_source": b.gmac_source,
        "min_psnr_db": bundle.golden.min_psnr_db if bundle.golden else None,
        "rows": [_row_json(r) for r in b.rows],
        "summary": {
            "served_over_fp32_latency": {k: _num(v) for k, v in s.served_over_fp32.items()},
            "best_served": None if s.best_served is None else s.best_served.runtime,
            "best_fp32": None if s.best_fp32 is None else s.best_fp32.runtime,
            "best_served_over_best_fp32": _num(s.best_ratio),
            "auto": auto,
        },
    }


def to_json(result: BenchResult) -> dict[str, Any]:
    """Everything, JSON-safe."""
    m = result.machine
    o = result.options
    return {
        "schema": "iomt-agent-bench",
        "schema_version": SCHEMA_VERSION,
        "agent_version": __version__,
        "created": result.created,
        "machine": {
            "cpu": {**{k: v for k, v in asdict(m.cpu).items() if k != "groups"},
                    "groups": [asdict(g) for g in m.cpu.groups]},
            "peak_gmac_per_s": {"fp32": m.peak.fp32_gmacs, "int8": m.peak.int8_gmacs,
                                "formula": m.peak.formula, "estimate": True},
            "runtimes": m.runtimes,
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
        "options": {"runs": o.runs, "latency_threads": o.latency_threads,
                    "threads": list(o.thread_counts), "batches": list(o.batches),
                    "throughput_runs": o.throughput_runs, "runtimes": list(o.runtimes)},
        "bundles": [_bundle_json(b) for b in result.bundles],
    }
