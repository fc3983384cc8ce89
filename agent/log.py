"""structlog setup: console renderer on a TTY, JSON lines otherwise, and a PHI scrubber.

The pipeline never passes patient data to the logger on purpose; ``scrub_phi`` is the belt
to those braces. It drops keys that name patient attributes and redacts any value that looks
like a DICOM person name (``FAMILY^GIVEN``).
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import MutableMapping
from typing import Any, TextIO

import structlog

from agent.daemon.sdnotify import syslog_prefix_processors

PHI_KEYS = frozenset(
    {
        "patient_name",
        "patient_id",
        "patient_birth_date",
        "patientname",
        "patientid",
        "patientbirthdate",
        "other_patient_ids",
        "accession_number",
        "institution_name",
        "referring_physician_name",
        "study_description",
    }
)
# Compare keys case- and separator-insensitively: patient_name, PatientName, AccessionNumber.
_PHI_FOLDED = frozenset(k.replace("_", "") for k in PHI_KEYS)
_PERSON_NAME = re.compile(r"[^\s^=\\]*\^[^\s=\\]*")  # also "^GIVEN" (no family name)
REDACTED = "[redacted]"

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
           "error": logging.ERROR}


def scrub_phi(
    _logger: Any, _method: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """structlog processor: remove patient keys, redact person-name-shaped strings."""
    for key in list(event_dict):
        if isinstance(key, str) and key.lower().replace("_", "").replace("-", "") in _PHI_FOLDED:
            event_dict[key] = REDACTED
            continue
        value = event_dict[key]
        if isinstance(value, str) and "^" in value:
            # A rendered traceback marks columns with carets: keep its shape, scrub names.
            # Anything else holding a caret may be a person name (with spaces): drop it all.
            is_traceback = key in ("exception", "exc_info", "stack")
            event_dict[key] = _PERSON_NAME.sub(REDACTED, value) if is_traceback else REDACTED
    return event_dict


_json_lines = False  # what configure() chose: JSON lines (True) or the console renderer


def json_lines() -> bool:
    """Whether the log is JSON lines, so anything else written to stderr would break it
    (``agent.backends.native_stderr`` keeps the runtimes' native output off it)."""
    return _json_lines


def configure(level: str = "info", fmt: str = "auto", stream: TextIO | None = None) -> None:
    """Configure structlog for the process. ``fmt``: auto | console | json."""
    global _json_lines
    stream = stream or sys.stderr
    use_console = fmt == "console" or (fmt == "auto" and stream.isatty())
    _json_lines = not use_console and stream is sys.stderr
    renderer: Any = (
        structlog.dev.ConsoleRenderer(colors=stream.isatty())
        if use_console
        else structlog.processors.JSONRenderer(sort_keys=False)
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            scrub_phi,
            renderer,
            *syslog_prefix_processors(stream),  # "<4>..." = warning, for journald
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        # One write per line (message and newline together): a flush by another thread, as
        # agent.native_stderr does before it swaps fd 2, can then never split a line.
        logger_factory=structlog.WriteLoggerFactory(file=stream),
        cache_logger_on_first_use=False,
    )
    # paho and amqtt log through the standard library; keep them quiet and on the same stream.
    logging.basicConfig(
        stream=stream, level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    for noisy in ("amqtt", "transitions", "asyncio"):
        logging.getLogger(noisy).setLevel(logging.ERROR)


def ensure_configured() -> None:
    """``configure()``'s defaults, unless the process has configured logging already."""
    if not structlog.is_configured():
        configure()


def get_logger(name: str) -> Any:
    return structlog.get_logger(name)
