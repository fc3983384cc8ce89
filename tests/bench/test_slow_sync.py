"""bench/slow_sync.py: the preloaded wrapper delays every fsync / fdatasync of the command
and its children, SQLite's commits included, and counts them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SLOW_SYNC_PY = Path(__file__).resolve().parents[2] / "bench" / "slow_sync.py"

CHILD = """
import json, os, sqlite3, sys, time
path = sys.argv[1]
fd = os.open(path + ".bin", os.O_CREAT | os.O_WRONLY)
os.write(fd, b"x")
t = time.perf_counter(); os.fsync(fd); fsync_s = time.perf_counter() - t
t = time.perf_counter(); os.fdatasync(fd); fdatasync_s = time.perf_counter() - t
os.close(fd)
con = sqlite3.connect(path, isolation_level=None)
con.execute("PRAGMA journal_mode=WAL"); con.execute("PRAGMA synchronous=FULL")
con.execute("CREATE TABLE t (v BLOB)")
t = time.perf_counter(); con.execute("INSERT INTO t VALUES (x'00')")
commit_s = time.perf_counter() - t
con.close()
print(json.dumps({"fsync": fsync_s, "fdatasync": fdatasync_s, "commit": commit_s}))
"""


def _run(tmp_path: Path, ms: float) -> tuple[dict[str, float], list[int]]:
    counts = tmp_path / f"counts-{ms}.txt"
    run = subprocess.run(
        [sys.executable, str(SLOW_SYNC_PY), "--ms", str(ms), "--dir", str(tmp_path / "lib"),
         "--count-file", str(counts), "--", sys.executable, "-c", CHILD,
         str(tmp_path / f"db-{ms}.sqlite")],
        capture_output=True, text=True, timeout=120, check=False)
    assert run.returncode == 0, run.stderr[-2000:]
    assert f"every fsync / fdatasync waits {ms:g} ms" in run.stderr
    calls = [int(line.split()[1]) for line in counts.read_text().splitlines()]
    return json.loads(run.stdout), calls


def test_each_sync_of_the_command_waits_and_is_counted(tmp_path: Path) -> None:
    times, calls = _run(tmp_path, 60)
    # nanosleep sleeps at least as long as asked: lower bounds, not timings
    assert times["fsync"] >= 0.060 and times["fdatasync"] >= 0.060
    assert times["commit"] >= 0.060  # SQLite's synced commit goes through the wrapper
    assert len(calls) == 1 and calls[0] >= 3  # one process: fsync, fdatasync, the commit


def test_no_delay_still_counts(tmp_path: Path) -> None:
    _, calls = _run(tmp_path, 0)
    assert calls and calls[0] >= 3
    assert list((tmp_path / "lib").glob("slow_sync-*.so"))  # compiled once, cached
