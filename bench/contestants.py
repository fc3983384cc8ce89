"""The contestants of the end-to-end benchmark, each on its own scan and result topics of the
same two brokers: the agent (and optionally the agent of another checkout, for before/after
comparisons in one run) and the naive script."""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from agent.ops.scaffold import InitOptions, write_directory
from agent.transport.mqtt import Connection
from agent.transport.topics import Topics
from bench import procs, report, rounds


@dataclass
class Entrant:
    """One contestant: its process, its topics and what its rounds measured."""

    name: str
    child: procs.Child
    scan_topic: str
    result_topic: str
    stats: report.Contestant = field(default_factory=report.Contestant)
    events: list[dict[str, Any]] = field(default_factory=list)  # agent slice_processed lines
    threads: dict[str, float] = field(default_factory=dict)  # CPU ms per slice per thread
    ready_s: dict[str, Any] = field(default_factory=dict)
    runtime: str = "naive"
    config: Path | None = None  # an agent's agent.toml
    done: int = 0  # slices it has processed, warm-up included

    def round(self, source: Connection, payloads: list[bytes], sink: rounds.Sink,
              *, timed: bool = True) -> rounds.Flood:
        """One flood; a timed one is recorded with its CPU time and the agent's log lines."""
        self.child.mark_log()
        c0, t0, m0 = (procs.cpu_s(self.child.pid), procs.tree_cpu_s(self.child.pid),
                      procs.machine_busy_s())
        result = rounds.flood(source, self.scan_topic, payloads, sink, self.result_topic)
        cpu, tree, machine = (procs.cpu_s(self.child.pid) - c0,
                              procs.tree_cpu_s(self.child.pid) - t0,
                              procs.machine_busy_s() - m0)
        self.done += len(payloads)
        if timed:
            self.stats.rounds.append(result)
            self.stats.cpu_s.append(cpu)
            self.stats.tree_cpu_s.append(tree)
            self.stats.machine_cpu_s.append(machine)
            time.sleep(0.2)  # the log line of the last slice is written after its commit
            self.events += self.child.events("slice_processed")
        return result


def configure(node: Path, site: str, edge_url: str, cloud_url: str, bundle: Path | None,
              backend: str | None, threads: int, workers: int | None = None,
              code: Path | None = None) -> Path:
    """An ``iomt-agent init`` directory, logging JSON, with the benchmark's model settings
    (``code``: another checkout's agent, whose config may predate ``model.workers``)."""
    knows_workers = code is None or "workers: int" in (code / "agent" / "config.py").read_text()
    config = write_directory(InitOptions(node, edge_url, cloud_url, site=site,
                                         device_id="node-1", bundle=bundle))
    lines = []
    for line in config.read_text().splitlines():
        if line.startswith("format = "):
            line = 'format = "json"'
        elif line.startswith("intra_op_threads = "):
            line = f"intra_op_threads = {threads}"
        elif line.startswith("workers = "):
            if not knows_workers:
                if workers is not None:
                    print(f"bench: {code} predates model.workers: its agent runs without it "
                          f"(workers = {workers} not applied)", flush=True)
                continue
            if workers is not None:
                line = f"workers = {workers}"
        elif backend and line.startswith("backend = "):
            line = f'backend = "{backend}"'
        lines.append(line)
    config.write_text("\n".join(lines) + "\n")
    return config


def launch_agent(name: str, work: Path, site: str, edge_url: str, cloud_url: str,
                 sink: rounds.Sink, *, bundle: Path | None, backend: str | None, threads: int,
                 workers: int | None = None, code: Path | None = None) -> Entrant:
    """Configure an agent and start it twice with the same state dir, timing READY (process
    start -> retained status ``online``, which follows the model's guard) both times; the
    second one serves the rounds. The sink must already watch ``status_topic(site)``."""
    topics = Topics(site, "node-1")
    config = configure(work / f"node-{site}", site, edge_url, cloud_url, bundle, backend, threads,
                       workers, code)
    log = work / f"agent-{site}.log"
    ready: dict[str, Any] = {}
    child = None
    for start in ("first", "second"):
        if child is not None:
            child.stop()
        offset = log.stat().st_size if log.exists() else 0
        child = procs.start_agent(config, log, code)
        child.mark_log(offset)  # this start's lines only
        online = sink.wait_online(str(topics.status), after=child.started, timeout=180)
        ready[start] = online - child.started
        # Of which: start -> the model guarded (imports, bundle digests, auto's choice, guard).
        guarded = child.events("agent_starting")[0]["timestamp"]
        ready[f"{start}_to_model_guarded"] = (
            datetime.fromisoformat(guarded.replace("Z", "+00:00")).timestamp()
            - child.started_wall)
    assert child is not None
    starting = child.events("agent_starting")[0]
    ready["second_cached"] = starting.get("runtime_cached")
    return Entrant(name, child, str(topics.scan("bench")), str(topics.results), ready_s=ready,
                   runtime=str(starting["runtime"]), config=config)


def status_topic(site: str) -> str:
    return str(Topics(site, "node-1").status)


def result_topic(site: str) -> str:
    return str(Topics(site, "node-1").results)


NAIVE_SCANS, NAIVE_RESULTS = "bench/naive/scans/x", "bench/naive/results"


def watch_naive(sink: rounds.Sink) -> None:
    numbers = itertools.count()  # every raw array is a new result: nothing to tell apart
    sink.stream(NAIVE_RESULTS, lambda _m: str(next(numbers)))


def launch_naive(work: Path, edge_url: str, cloud_url: str, bundle: Path) -> Entrant:
    child = procs.start_naive(edge_url, cloud_url, bundle, "bench/naive/scans/#", NAIVE_RESULTS,
                              work / "naive.log")
    return Entrant("naive script", child, NAIVE_SCANS, NAIVE_RESULTS)
