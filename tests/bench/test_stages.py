"""bench/stages.py runs end to end (one round, decoding through the decoder process) and
reports every stage of every input; no figure is asserted, only that each was measured."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from bench.stages import STAGES

STAGES_PY = Path(__file__).resolve().parents[2] / "bench" / "stages.py"


def test_one_round_reports_every_stage_of_every_input(tmp_path: Path) -> None:
    out = tmp_path / "stages.json"
    run = subprocess.run([sys.executable, str(STAGES_PY), "--rounds", "1", "--isolate",
                          "--json", str(out)], capture_output=True, text=True, timeout=600,
                         check=False)
    assert run.returncode == 0, run.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["isolate"] is True and result["clock"] == "cpu"
    medians = result["medians_ms"]["this tree"]
    assert set(medians) == {"demo-256@1mm", "mr-320@0.8mm", "mr-320@1mm"}
    for row in medians.values():
        assert all(row[s] > 0 for s in STAGES)  # the domain check and the child's share too
        assert row["total"] == sum(row[s] for s in STAGES)
    assert "decode in the decoder process" in run.stdout
