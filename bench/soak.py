"""Soak: the agent under a sustained scan rate for a chosen number of minutes, between two
real Mosquitto brokers, with its resident memory, open files, threads and store size sampled
all along. Writes a report (JSON) and a plot (PNG) and prints a table: whether each figure
stays flat (the slope of a straight-line fit over the second half of the run, and the
median of the last quarter against the first), and the throughput.

    python -m bench.soak --minutes 5 --rate 4 --json bench-out/soak.json --png bench-out/soak.png

Not a test: nothing is asserted; read the figures. Scans are fresh series of the MNI slab
that the package ships (new UIDs each series, so every result is distinct).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from agent.config import BrokerConfig
from agent.demo.sample_series import build_series, load_demo_slab
from agent.transport.mqtt import Connection, Verdict
from agent.transport.topics import Topic, Topics
from bench import procs, rounds
from bench.brokers import start_mosquitto
from bench.contestants import configure

REPO = Path(__file__).resolve().parents[1]
SITE = "soak"
FIGURES = ("rss_mib", "open_files", "threads", "store_mib")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--minutes", type=float, default=5.0, help="how long scans keep coming")
    p.add_argument("--rate", type=float, default=4.0, help="scans per second")
    p.add_argument("--sample-s", type=float, default=5.0, help="seconds between samples")
    p.add_argument("--bundle", type=Path, default=REPO / "models" / "t1w-to-t2w-lite")
    p.add_argument("--backend", default="onnxruntime")
    p.add_argument("--threads", type=int, default=1, help="model.intra_op_threads")
    p.add_argument("--json", type=Path, default=Path("bench-out/soak.json"))
    p.add_argument("--png", type=Path, default=Path("bench-out/soak.png"))
    return p.parse_args()


def sample(pid: int, state_dir: Path) -> dict[str, float]:
    """The agent process's figures now (from /proc) and its store files' size."""
    status = dict(line.split(":", 1) for line in
                  Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    store = sum(f.stat().st_size for f in state_dir.glob("agent.db*") if f.is_file())
    return {"rss_mib": int(status["VmRSS"].split()[0]) / 1024,
            "open_files": float(sum(1 for _ in Path(f"/proc/{pid}/fd").iterdir())),
            "threads": float(status["Threads"].strip()),
            "store_mib": store / 2**20}


def slope_per_min(t: list[float], y: list[float]) -> float:
    """Least-squares slope of ``y`` against ``t`` (seconds), per minute."""
    if len(t) < 2:
        return 0.0
    mt, my = statistics.fmean(t), statistics.fmean(y)
    den = sum((a - mt) ** 2 for a in t)
    return 60 * sum((a - mt) * (b - my) for a, b in zip(t, y, strict=True)) / den if den else 0.0


def flatness(samples: list[dict[str, float]]) -> dict[str, dict[str, float]]:
    """Per figure: first/last quarter medians, and the slope over the second half."""
    out = {}
    q = max(1, len(samples) // 4)
    half = samples[len(samples) // 2:]
    for name in FIGURES:
        out[name] = {
            "first_quarter_median": statistics.median(s[name] for s in samples[:q]),
            "last_quarter_median": statistics.median(s[name] for s in samples[-q:]),
            "max": max(s[name] for s in samples),
            "second_half_slope_per_min": slope_per_min([s["t_s"] for s in half],
                                                       [s[name] for s in half]),
        }
    return out


class Feeder:
    """Publishes scans to the edge broker at ``rate`` per second on its own thread."""

    def __init__(self, url: str, topic: Topic, rate: float) -> None:
        self.conn = Connection(BrokerConfig(url=url), "soak-feeder", name="edge")
        self.topic, self.rate = topic, rate
        self.sent = self.acked = 0
        self.stop = threading.Event()
        self._slab = load_demo_slab().t1
        self._pool: list[bytes] = []
        self._lock = threading.Lock()

    def _next(self) -> bytes:
        if not self._pool:  # a fresh series: new study, series and instance UIDs
            self._pool = list(reversed(build_series(self._slab)))
        return self._pool.pop()

    def _acked(self, _verdict: Verdict) -> None:
        with self._lock:
            self.acked += 1

    def run(self, seconds: float) -> None:
        start = time.monotonic()
        while not self.stop.is_set() and time.monotonic() - start < seconds:
            due = start + self.sent / self.rate
            if (wait := due - time.monotonic()) > 0:
                time.sleep(wait)
            self.conn.publish(self.topic, self._next(), qos=1, on_done=self._acked)
            self.sent += 1


def plot(samples: list[dict[str, float]], png: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = [s["t_s"] / 60 for s in samples]
    fig, axes = plt.subplots(5, 1, figsize=(8, 11), sharex=True)
    labels = {"rss_mib": "RSS (MiB)", "open_files": "open files", "threads": "threads",
              "store_mib": "store files (MiB)", "results_per_s": "results / s"}
    for ax, name in zip(axes, (*FIGURES, "results_per_s"), strict=True):
        ax.plot(t, [s[name] for s in samples], marker=".", linewidth=1)
        ax.set_ylabel(labels[name])
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    axes[-1].set_xlabel("minutes")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=90)


def main() -> int:
    args = parse_args()
    work = Path(tempfile.mkdtemp(prefix="iomt-soak-"))
    edge_proc, edge_url = start_mosquitto(work, "edge")
    cloud_proc, cloud_url = start_mosquitto(work, "cloud")
    topics = Topics(SITE, "node-1")
    sink = rounds.Sink(cloud_url)
    sink.stream(str(topics.results), rounds.envelope_id)
    sink.status(str(topics.status))
    sink.start()
    config = configure(work / "node", SITE, edge_url, cloud_url, args.bundle, args.backend,
                       args.threads)
    agent = procs.start_agent(config, work / "agent.log")
    feeder = Feeder(edge_url, topics.scan("soak"), args.rate)
    samples: list[dict[str, float]] = []
    try:
        sink.wait_online(str(topics.status), after=agent.started, timeout=180)
        feeder.conn.start()
        if not feeder.conn.wait_connected(10):
            raise SystemExit("the feeder cannot reach the edge broker")
        seconds = args.minutes * 60
        thread = threading.Thread(target=feeder.run, args=(seconds,), daemon=True)
        t0 = time.monotonic()
        thread.start()
        last_n, last_t = 0, t0
        while thread.is_alive():
            time.sleep(args.sample_s)
            now, n = time.monotonic(), sink.count(str(topics.results))
            samples.append({"t_s": now - t0, **sample(agent.pid, work / "node" / "state"),
                            "sent": feeder.sent, "results": n,
                            "results_per_s": (n - last_n) / (now - last_t)})
            last_n, last_t = n, now
            if not agent.alive():
                raise SystemExit(f"the agent exited: see {work / 'agent.log'}")
        sent = feeder.sent
        drain_start = time.monotonic()
        while sink.count(str(topics.results)) < sent and time.monotonic() - drain_start < 120:
            time.sleep(0.2)
        drained_s = time.monotonic() - drain_start
        received = sink.count(str(topics.results))
        arrivals = sink.arrivals(str(topics.results))
    finally:
        feeder.stop.set()
        code = agent.stop()
        feeder.conn.stop()
        sink.stop()
        for p in (edge_proc, cloud_proc):
            p.terminate()
            p.wait(10)
    steady = arrivals[len(arrivals) // 10:]  # past the first tenth (warm-up)
    throughput = (len(steady) - 1) / (steady[-1] - steady[0]) if len(steady) > 1 else 0.0
    report: dict[str, Any] = {
        "cpu": procs_cpu(), "bundle": str(args.bundle), "backend": args.backend,
        "minutes": args.minutes, "rate_per_s": args.rate, "sent": sent,
        "results_distinct": received, "lost": sent - received,
        "drain_after_stop_s": round(drained_s, 2), "throughput_per_s": round(throughput, 3),
        "agent_exit": code, "slice_processed": len(agent.events("slice_processed")),
        "scans_rejected": len(agent.events("scan_rejected")),
        "flatness": flatness(samples), "samples": samples,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2))
    plot(samples, args.png, f"soak: {args.rate:g} scans/s for {args.minutes:g} min, "
         f"{throughput:.2f} results/s, {sent - received} lost ({report['cpu']})")
    print_table(report)
    print(f"\nreport {args.json}, plot {args.png}, work dir {work}")
    return 0 if received == sent and code == 0 else 1


def procs_cpu() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return f"{line.split(':', 1)[1].strip()} x{os.cpu_count()}"
    return f"{os.cpu_count()} CPUs"


def print_table(r: dict[str, Any]) -> None:
    print(f"sent {r['sent']}, distinct results {r['results_distinct']}, lost {r['lost']}, "
          f"throughput {r['throughput_per_s']}/s (offered {r['rate_per_s']}/s), drained "
          f"{r['drain_after_stop_s']} s after the feed stopped")
    print(f"{'figure':<12}{'first q':>10}{'last q':>10}{'max':>10}{'slope/min (2nd half)':>24}")
    for name, f in r["flatness"].items():
        print(f"{name:<12}{f['first_quarter_median']:>10.2f}{f['last_quarter_median']:>10.2f}"
              f"{f['max']:>10.2f}{f['second_half_slope_per_min']:>24.3f}")


if __name__ == "__main__":
    raise SystemExit(main())
