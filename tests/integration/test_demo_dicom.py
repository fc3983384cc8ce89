"""`iomt-agent demo --dicom`: the scanner -> archive chain on one machine prints each step
and ends with the derived series in Orthanc."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.integration.harness import cli

pytestmark = pytest.mark.integration


def test_demo_dicom_prints_the_chain(tmp_path: Path) -> None:
    (tmp_path / "keep.txt").write_text("not the demo's")
    r = cli("demo", "--dicom", "--workdir", str(tmp_path), "--slices", "4", timeout=280)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "[5/6] storescu sent 4 T1w slices: 4 C-STORE successes" in r.stdout
    assert "stored 4 in Orthanc (refused 0, unreachable 0)" in r.stdout
    assert "NOT FOR DIAGNOSTIC USE': 4 instances, modality MR" in r.stdout
    assert (tmp_path / "keep.txt").exists()  # only WORKDIR/dicom-chain is cleared
    assert len(list((tmp_path / "dicom-chain" / "results").rglob("*.dcm"))) == 4
