"""agent.gateway.intake with a real spool and an edge connection that is not up: what each
instance is answered with, what is kept, and that no log line carries a header value."""

from __future__ import annotations

import io
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file
from structlog.testing import capture_logs

from agent.config import BrokerConfig
from agent.config_gateway import STORAGE_CLASSES
from agent.errors import EXPORT_REASONS, GATEWAY_REASONS
from agent.gateway.forwarder import Forwarder, Outcome
from agent.gateway.intake import (
    CANNOT_UNDERSTAND,
    DATASET_MISMATCH,
    OUT_OF_RESOURCES,
    SOP_CLASS_NOT_SUPPORTED,
    SUCCESS,
    Intake,
    Request,
    decodable_syntaxes,
)
from agent.gateway.spool import Spool
from agent.transport.mqtt import Connection
from agent.transport.topics import Topics

REPO = Path(__file__).resolve().parents[2]
SECRET = "SECRET^PATIENT^PHI"
MR = STORAGE_CLASSES["MRImageStorage"]


def _instance() -> tuple[bytes, pydicom.Dataset]:
    ds = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    ds.PatientName = SECRET
    ds.PatientID = "PHI-12345"
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue(), ds


def _request(ds: pydicom.Dataset, **change: str) -> Request:
    fields = {"sop_class_uid": str(ds.SOPClassUID), "sop_instance_uid": str(ds.SOPInstanceUID),
              "calling_ae": "MRI-1", "transfer_syntax": str(ds.file_meta.TransferSyntaxUID)}
    fields.update(change)
    return Request(**fields)


def _intake(tmp: Path, *, spool_bytes: int = 10**8, max_bytes: int = 10**7) -> Intake:
    # Never started: not connected, so every instance goes to the spool.
    conn = Connection(BrokerConfig(url="mqtt://127.0.0.1:1"), "test-gateway", name="edge")
    spool = Spool(tmp / "spool.sqlite", max_bytes=spool_bytes)
    forwarder = Forwarder(conn, Topics("site-a", "node-1").scan("gateway"), spool,
                          ack_timeout_s=0.1)
    return Intake(forwarder, sop_classes=[MR], max_instance_bytes=max_bytes)


def test_broker_away_the_instance_is_spooled_durably_then_success(tmp_path: Path) -> None:
    part10, ds = _instance()
    intake = _intake(tmp_path)
    answer = intake.take(_request(ds), part10)
    assert (answer.status, answer.outcome) == (SUCCESS, Outcome.SPOOLED)
    intake.forwarder.spool.close()
    again = Spool(tmp_path / "spool.sqlite", max_bytes=10**8)  # as after a SIGKILL
    rows = again.oldest(set(), 10)
    assert [r.payload for r in rows] == [part10]
    assert rows[0].sop_uid == str(ds.SOPInstanceUID)
    again.delivered(rows[0].id)
    assert again.count == 0 and again.size == 0


@pytest.mark.parametrize(("change", "payload", "status", "reason"), [
    ({"sop_class_uid": STORAGE_CLASSES["CTImageStorage"]}, None, SOP_CLASS_NOT_SUPPORTED,
     "sop_class_not_supported"),
    ({"sop_instance_uid": "1.2.3.4"}, None, DATASET_MISMATCH, "dataset_mismatch"),
    ({}, b"\x00" * 128 + b"DICM" + b"\xff" * 64, CANNOT_UNDERSTAND, "not_dicom"),
    ({}, b"x" * 20000, OUT_OF_RESOURCES, "instance_too_large"),
])
def test_refusals_get_their_dimse_status_and_a_phi_free_line(
    tmp_path: Path, change: dict[str, str], payload: bytes | None, status: int, reason: str,
) -> None:
    part10, ds = _instance()
    intake = _intake(tmp_path, max_bytes=15000)
    with capture_logs() as logs:
        answer = intake.take(_request(ds, **change), payload or part10)
    assert (answer.status, answer.reason) == (status, reason)
    assert intake.forwarder.spool.count == 0
    (line,) = [e for e in logs if e["event"] == "cstore_refused"]
    assert line["reason"] == reason and line["status"] == f"0x{status:04X}"
    assert SECRET not in repr(logs) and "PHI-12345" not in repr(logs)
    assert str(ds.SOPInstanceUID) not in repr(logs)


def test_full_spool_is_out_of_resources_and_keeps_what_it_has(tmp_path: Path) -> None:
    part10, ds = _instance()
    intake = _intake(tmp_path, spool_bytes=len(part10) + 10)
    assert intake.take(_request(ds), part10).status == SUCCESS
    with capture_logs() as logs:
        answer = intake.take(_request(ds), part10)
    assert (answer.status, answer.reason) == (OUT_OF_RESOURCES, "spool_full")
    assert intake.forwarder.spool.count == 1
    assert "spool holds" in next(e for e in logs if e["event"] == "cstore_refused")["detail"]


def test_every_gateway_and_export_reason_is_documented() -> None:
    for name in ("integration.md", "protocol.md"):
        doc = (REPO / "docs" / name).read_text(encoding="utf-8")
        missing = [r for r in GATEWAY_REASONS + EXPORT_REASONS if f"`{r}`" not in doc]
        assert not missing, f"document in docs/{name}: {missing}"


def test_accepted_syntaxes_are_what_the_decoder_takes() -> None:
    syntaxes = decodable_syntaxes()
    assert "1.2.840.10008.1.2" in syntaxes and "1.2.840.10008.1.2.1" in syntaxes
    assert "1.2.840.10008.1.2.1.99" not in syntaxes  # Deflated: never
    assert "1.2.840.10008.1.2.4.90" in syntaxes  # JPEG 2000 lossless: the jpeg extra (dev)
