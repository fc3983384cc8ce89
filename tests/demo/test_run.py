"""agent.demo.run: ``iomt-agent demo`` end to end on its embedded brokers, and what its
summary says about the agent's own work per slice."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
OWN_STAGES = {"decode", "preprocess", "domain", "derive", "seal"}

pytestmark = pytest.mark.integration


def test_the_summary_gives_wall_and_cpu_per_stage_and_the_agents_own_work(
        tmp_path: Path) -> None:
    """Each stage's median wall time with the agent's CPU time beside it (the decoder
    process's included), the model's wall time alone, and the agent's own work per slice:
    the median over slices of the CPU of every stage but the model's."""
    work = tmp_path / "demo"
    r = subprocess.run([sys.executable, "-m", "agent", "demo", "--workdir", str(work),
                        "--slices", "4"], cwd=REPO, capture_output=True, text=True,
                       timeout=240, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "demo OK" in r.stdout
    rows = dict(re.split(r"\s{2,}", line.strip(), maxsplit=1) for line in r.stdout.splitlines()
                if line.startswith(("  median", "  agent's own")))
    for stage in OWN_STAGES:  # each "wall / CPU"
        assert len([float(v) for v in rows[f"median {stage} (ms, wall / CPU)"].split(" / ")]) == 2
    assert float(rows["median infer (ms, wall)"]) > 0
    own = float(rows["agent's own work per slice (CPU ms)"])

    events = [json.loads(line) for line in (work / "agent.log").read_text().splitlines()
              if '"slice_processed"' in line]
    assert len(events) == 4
    for event in events:
        assert set(event["cpu_ms"]) == OWN_STAGES  # the runtime's threads are not ours
        assert set(event["stages_ms"]) == OWN_STAGES | {"infer"}
    sums = sorted(sum(e["cpu_ms"].values()) for e in events)
    assert sums[0] - 0.05 <= own <= sums[-1] + 0.05
