"""The two contestants as subprocesses (the agent daemon and the naive script), and what the
benchmark reads about them from /proc: resident memory and CPU time, per process and per
thread."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
NAIVE_SCRIPT = Path(__file__).resolve().parent / "naive_script.py"


def rss_mb(pid: int) -> tuple[float, float]:
    """(resident now, peak resident) in MiB."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


def _stat_cpu_s(path: Path) -> float:
    # The command name (field 2) may hold spaces; the fields after its ')' are fixed.
    rest = path.read_text().rsplit(")", 1)[1].split()
    return (int(rest[11]) + int(rest[12])) / CLOCK_TICKS  # utime + stime


def cpu_s(pid: int) -> float:
    """User + system CPU seconds the process has used so far (all threads)."""
    return _stat_cpu_s(Path(f"/proc/{pid}/stat"))


def tree_cpu_s(pid: int) -> float:
    """CPU seconds of the process, its children that ended and were waited for (a decoder
    child replaced after a budget was exceeded) and its live children (the agent's decoder
    process): what the contestant itself costs."""
    rest = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    total = cpu_s(pid) + (int(rest[13]) + int(rest[14])) / CLOCK_TICKS  # cutime + cstime
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError, ValueError):
            for child in (task / "children").read_text().split():
                total += tree_cpu_s(int(child))
    return total


def machine_busy_s() -> float:
    """CPU seconds every process of this machine has used so far (/proc/stat: user, nice,
    system, irq, softirq; not idle, iowait or steal): the brokers, the benchmark's own
    publisher and subscriber and the contestant, together."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq = (int(f) for f in fields[:7])
    return (user + nice + system + irq + softirq) / CLOCK_TICKS


def thread_cpu_s(pid: int) -> dict[str, float]:
    """CPU seconds per thread, keyed ``name:tid`` (the agent names its own threads; the
    main thread's id is the pid, the runtimes' and paho's threads keep the process name)."""
    out = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError, IndexError, ValueError):
            tid = int(task.name)
            name = "main" if tid == pid else (task / "comm").read_text().strip()
            out[f"{name}:{tid}"] = _stat_cpu_s(task / "stat")
    return out


@dataclass
class Child:
    """A started subprocess with its log file."""

    proc: subprocess.Popen[bytes]
    log: Path
    started: float  # perf_counter just before it was started
    started_wall: float  # the same moment on the wall clock (log lines carry wall time)
    _log_offset: int = field(default=0)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def mark_log(self, offset: int | None = None) -> None:
        """Later ``events`` calls only see lines written after this point (or ``offset``)."""
        self._log_offset = self.log.stat().st_size if offset is None else offset

    def events(self, name: str) -> list[dict[str, Any]]:
        """JSON log lines with ``"event": name`` written since ``mark_log``."""
        with self.log.open("rb") as f:
            f.seek(self._log_offset)
            text = f.read().decode(errors="replace")
        out = []
        for line in text.splitlines():
            if f'"{name}"' in line:
                with contextlib.suppress(json.JSONDecodeError):
                    event = json.loads(line)
                    if event.get("event") == name:
                        out.append(event)
        return out

    def stop(self, timeout: float = 30) -> int:
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(5)


def _start(argv: list[str], log: Path, env: dict[str, str] | None = None) -> Child:
    with log.open("ab") as out:
        started, started_wall = time.perf_counter(), time.time()
        # Not in the checkout: ``python -m`` puts the working directory first on sys.path.
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env,
                                cwd=log.parent)
    return Child(proc, log, started, started_wall)


def start_agent(config: Path, log: Path, code: Path | None = None) -> Child:
    """``iomt-agent run`` (JSON log lines to ``log``). ``code``: a directory holding another
    ``agent`` package to run instead of the installed one (e.g. an earlier commit's)."""
    env = None
    if code is not None:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            p for p in (str(code), os.environ.get("PYTHONPATH", "")) if p)}
    return _start([sys.executable, "-m", "agent", "run", "--config", str(config)], log, env)


def start_naive(edge_url: str, cloud_url: str, bundle: Path, scans: str, results: str,
                log: Path, timeout: float = 60) -> Child:
    """The naive script; returns once it has subscribed (it prints ``ready``)."""
    child = _start([sys.executable, str(NAIVE_SCRIPT), "--edge", edge_url, "--cloud", cloud_url,
                    "--bundle", str(bundle), "--scans", scans, "--results", results], log)
    deadline = time.monotonic() + timeout
    while "ready" not in log.read_text(errors="replace"):
        if not child.alive() or time.monotonic() > deadline:
            raise SystemExit(f"the naive script did not start:\n{log.read_text()[-2000:]}")
        time.sleep(0.05)
    return child
