"""agent.cloud.export + agent.cloud.stow against a real Orthanc (DICOMweb plugin): refused
results are kept and recorded, stored ones are never sent twice, an archive that is away
leaves them pending for the next run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pydicom
import pytest
from structlog.testing import capture_logs

from agent.cloud.export import Exporter
from agent.cloud.stow import StowClient, StowSettings
from tests.integration.harness import cli
from tests.integration.orthanc import PASSWORD, USER, free_port, start_orthanc

pytestmark = pytest.mark.integration


def _results(tmp: Path, n: int) -> Path:
    """n instances filed as receive files them: OUT/<Study>/<Series>/<SOP>.dcm."""
    assert cli("sample", str(tmp / "scans"), "--count", str(n)).returncode == 0
    out = tmp / "out"
    for f in sorted((tmp / "scans").glob("*.dcm")):
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        dest = out / ds.StudyInstanceUID / ds.SeriesInstanceUID / f"{ds.SOPInstanceUID}.dcm"
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(f, dest)
    return out


def _exporter(out: Path, url: str, password: Path, attempts: int = 3) -> Exporter:
    settings = StowSettings(url=url, user=USER, password_file=password, timeout_s=5,
                            attempts=attempts)
    assert settings.problems() == []
    return Exporter(StowClient(settings), out, attempts=attempts, sleep=lambda _s: None)


def _run(exporter: Exporter) -> None:
    exporter.start()
    assert exporter.drain(60)
    exporter.stop()


def test_refused_kept_stored_once_unreachable_pending(tmp_path: Path) -> None:
    orthanc = start_orthanc(tmp_path)
    try:
        out = _results(tmp_path, 3)
        wrong, right = tmp_path / "wrong.pw", tmp_path / "right.pw"
        wrong.write_text("not-the-password\n")
        right.write_text(PASSWORD + "\n")

        # 1. wrong password: HTTP 401 is a refusal; each result is kept, with its record
        refused = _exporter(out, orthanc.dicomweb, wrong)
        with capture_logs() as logs:
            _run(refused)
        assert (refused.tally.refused, refused.tally.stored) == (3, 0)
        assert len(list(out.glob("*/*/*.dcm"))) == 3
        records = [json.loads(p.read_text()) for p in refused.refused()]
        assert [r["http_status"] for r in records] == [401] * 3
        assert {e["reason"] for e in logs if e["event"] == "stow_kept"} == {"archive_refused"}

        # 2. fixed: the next run sends every result without a stored mark, refused ones too
        fixed = _exporter(out, orthanc.dicomweb, right)
        _run(fixed)
        assert (fixed.tally.pending_at_start, fixed.tally.stored) == (3, 3)
        assert fixed.refused() == [] and fixed.pending() == []
        assert len(orthanc.get("/instances")) == 3  # type: ignore[arg-type]

        # 3. nothing pending: a further run sends nothing; a lost mark is sent again and the
        # archive still holds each instance once
        again = _exporter(out, orthanc.dicomweb, right)
        _run(again)
        assert again.tally.pending_at_start == 0 and again.tally.stored == 0
        mark = next((out / "stow" / "stored").iterdir())
        mark.unlink()
        resend = _exporter(out, orthanc.dicomweb, right)
        _run(resend)
        assert resend.tally.stored + resend.tally.duplicates == 1
        assert len(orthanc.get("/instances")) == 3  # type: ignore[arg-type]
    finally:
        orthanc.stop()

    # 4. the archive away: tried, backed off, left pending (no stored mark) for the next run
    mark.unlink()
    away = _exporter(out, f"http://127.0.0.1:{free_port()}/dicom-web", right, attempts=2)
    with capture_logs() as logs:
        _run(away)
    assert (away.tally.unreachable, away.tally.stored, away.tally.refused) == (1, 0, 0)
    assert len(away.pending()) == 1
    assert [e["attempt"] for e in logs if e["event"] == "stow_retry"] == [1, 2]
    assert {e["reason"] for e in logs if e["event"] == "stow_kept"} == {"archive_unreachable"}
