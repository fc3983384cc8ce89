"""bench/seal.py runs end to end (two turns of a few envelopes) and reports every suite on
every CPU path; no figure is asserted, only that each was measured and written."""

from __future__ import annotations

import json
import platform
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_two_turns_report_every_suite(tmp_path: Path) -> None:
    out = tmp_path / "seal.json"
    run = subprocess.run([sys.executable, "-m", "bench.seal", "--rounds", "2", "--slices", "3",
                          "--bytes", "4096", "--json", str(out)], cwd=ROOT,
                         capture_output=True, text=True, timeout=300, check=False)
    assert run.returncode == 0, run.stderr[-2000:]
    result = json.loads(out.read_text())
    paths = {"AES instructions"} | ({"no AES-NI"} if platform.machine() == "x86_64" else set())
    assert set(result["medians_ms"]) == paths
    for by_suite in result["medians_ms"].values():
        assert set(by_suite) == {f"{kem} {aead}" for kem in ("mlkem768-x25519", "x25519")
                                 for aead in ("aes-256-gcm", "chacha20-poly1305")}
        for row in by_suite.values():
            assert row["seal"] > 0 and row["hpke"] > 0 and row["sign"] > 0
            assert row["seal_v2"] > 0
    assert len(result["ratios"]) == 4 * len(paths)
    assert "AES instructions:" in run.stdout.splitlines()[0]
