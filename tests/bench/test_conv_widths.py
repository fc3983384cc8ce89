"""bench/conv_widths.py builds, quantizes and times each layer it is given; no figure is
asserted, only that both precisions of each were measured."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

CONV_WIDTHS_PY = Path(__file__).resolve().parents[2] / "bench" / "conv_widths.py"


def test_each_shape_is_timed_in_both_precisions(tmp_path: Path) -> None:
    out = tmp_path / "widths.json"
    run = subprocess.run([sys.executable, str(CONV_WIDTHS_PY), "--size", "16", "--rounds", "3",
                          "--threads", "1", "8x8", "16x24", "--json", str(out)],
                         capture_output=True, text=True, timeout=300, check=False)
    assert run.returncode == 0, run.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    assert [(r["c_in"], r["c_out"]) for r in rows] == [(8, 8), (16, 24)]
    for r in rows:
        assert r["fp32_ms"] > 0 and r["int8_ms"] > 0
        assert r["mmac"] == r["c_in"] * r["c_out"] * 9 * 16 * 16 / 1e6
    assert "16->24" in run.stdout
