"""Tests for agent.log: the PHI scrubber and the console / JSON renderers."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest
import structlog
from structlog.testing import capture_logs

from agent.log import REDACTED, configure, get_logger, scrub_phi


def _scrub(**event: object) -> dict[str, object]:
    return dict(scrub_phi(None, "info", dict(event)))


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture
def restore_logging() -> Iterator[None]:
    """configure() changes process-wide state: put structlog and the root logger back."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    structlog.reset_defaults()
    for h in list(root.handlers):
        if h not in handlers:
            root.removeHandler(h)
    root.setLevel(level)


@pytest.mark.parametrize(
    "key",
    ["patient_name", "PatientName", "PATIENT_ID", "patientid", "patient_birth_date",
     "accession_number", "AccessionNumber", "other_patient_ids", "institution_name",
     "referring_physician_name", "study_description"],
)
def test_phi_keys_are_redacted(key: str) -> None:
    out = _scrub(**{key: "12345", "event": "scan_received"})
    assert out[key] == REDACTED
    assert out["event"] == "scan_received"


def test_phi_keys_redacted_whatever_the_value_type() -> None:
    assert _scrub(patient_id=12345)["patient_id"] == REDACTED
    assert _scrub(patient_name=None)["patient_name"] == REDACTED


@pytest.mark.parametrize(
    ("value", "leaked"),
    [
        ("DOE^JOHN", ["DOE", "JOHN"]),
        ("DOE^JOHN^Q^DR^JR", ["DOE", "JOHN"]),
        ("^JOHN", ["JOHN"]),  # given name only
        ("DOE^", ["DOE"]),
        ("rejected scan of DOE^JANE from ct-1", ["DOE", "JANE"]),
        ("Yamada^Tarou=山田^太郎=やまだ^たろう", ["Yamada", "Tarou", "山田", "太郎"]),
    ],
)
def test_person_names_are_redacted(value: str, leaked: list[str]) -> None:
    out = str(_scrub(detail=value)["detail"])
    assert REDACTED in out
    for part in leaked:
        assert part not in out, out


def test_a_value_holding_a_caret_is_dropped_whole() -> None:
    # Names with spaces cannot be delimited reliably, so the whole value goes.
    out = _scrub(detail="rejected scan of VAN DER BERG^ANNA MARIE from ct-1")
    assert out["detail"] == REDACTED


def test_traceback_keeps_its_shape_but_not_names() -> None:
    tb = "  File x.py, line 1\n    f(DOE^JANE)\n      ^^^^^^\nValueError: boom"
    out = str(_scrub(exception=tb)["exception"])
    assert "ValueError: boom" in out and "DOE" not in out and "JANE" not in out


def test_harmless_values_pass_through() -> None:
    event = {"event": "result_published", "message_id": "ab12", "bytes": 42,
             "topic": "iomt/site-1/edge-1/results", "path": "1.2.3/4.5.6/7.8.9.dcm"}
    assert _scrub(**event) == event


def test_json_lines_on_a_non_tty(restore_logging: None) -> None:
    stream = io.StringIO()
    configure(level="info", fmt="auto", stream=stream)
    log = get_logger("agent.test")
    log.info("scan_received", topic="iomt/s/scans/gw", patient_name="DOE^JOHN",
             detail="for SMITH^ANNA", bytes=10)
    log.debug("too_chatty")
    log.warning("outbox_full", fix="check the cloud broker")
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2, lines
    first, second = (json.loads(line) for line in lines)
    assert first["event"] == "scan_received" and first["level"] == "info"
    assert first["topic"] == "iomt/s/scans/gw" and first["bytes"] == 10
    assert first["patient_name"] == REDACTED and first["detail"] == REDACTED
    assert first["timestamp"].endswith("Z")
    assert second["event"] == "outbox_full" and second["level"] == "warning"
    assert "DOE" not in stream.getvalue() and "SMITH" not in stream.getvalue()


def test_exceptions_are_rendered_and_scrubbed(restore_logging: None) -> None:
    stream = io.StringIO()
    configure(fmt="json", stream=stream)
    try:
        raise ValueError("cannot parse DOE^JOHN")
    except ValueError:
        get_logger("agent.test").exception("decode_failed")
    [record] = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert record["event"] == "decode_failed" and record["level"] == "error"
    assert "ValueError" in record["exception"]
    assert "DOE" not in stream.getvalue()


def test_level_filter(restore_logging: None) -> None:
    stream = io.StringIO()
    configure(level="debug", fmt="json", stream=stream)
    get_logger("x").debug("detail_event")
    assert json.loads(stream.getvalue())["event"] == "detail_event"
    stream = io.StringIO()
    configure(level="error", fmt="json", stream=stream)
    get_logger("x").warning("not_shown")
    assert stream.getvalue() == ""


def test_console_on_request(restore_logging: None) -> None:
    stream = io.StringIO()
    configure(fmt="console", stream=stream)
    get_logger("x").info("agent_started", device_id="edge-1", patient_id="P-77")
    out = stream.getvalue()
    assert "agent_started" in out and "device_id=edge-1" in out
    assert "P-77" not in out and REDACTED in out
    assert "\x1b[" not in out  # no colours on a non-TTY
    with pytest.raises(json.JSONDecodeError):
        json.loads(out)


def test_console_on_a_tty(restore_logging: None) -> None:
    stream = _Tty()
    configure(fmt="auto", stream=stream)
    get_logger("x").info("agent_started")
    out = stream.getvalue()
    assert "agent_started" in out
    with pytest.raises(json.JSONDecodeError):
        json.loads(out)


def test_json_forced_on_a_tty(restore_logging: None) -> None:
    stream = _Tty()
    configure(fmt="json", stream=stream)
    get_logger("x").info("agent_started")
    assert json.loads(stream.getvalue())["event"] == "agent_started"


def test_stdlib_logging_goes_to_the_same_stream(restore_logging: None) -> None:
    root = logging.getLogger()
    for h in list(root.handlers):  # basicConfig only acts on a bare root logger
        root.removeHandler(h)
    stream = io.StringIO()
    configure(fmt="json", stream=stream)
    logging.getLogger("paho.test").warning("socket error")
    logging.getLogger("amqtt.test").warning("broker noise")  # quietened to ERROR
    out = stream.getvalue()
    assert "WARNING paho.test: socket error" in out
    assert "broker noise" not in out


def test_get_logger_events_are_capturable() -> None:
    with capture_logs() as logs:
        get_logger("agent.test").info("hello", n=1)
    assert logs == [{"event": "hello", "n": 1, "log_level": "info"}]
