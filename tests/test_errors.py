"""One error tree, one registry of reason codes: every code the source can emit is in the
registry and documented in docs/protocol.md, and every error kind derives from AgentError."""

from __future__ import annotations

import ast
import re
import typing
from pathlib import Path

import pytest

from agent import errors
from agent.backends.base import BackendError
from agent.bench.macs import MacCountError
from agent.config import ConfigError
from agent.crypto import seal
from agent.crypto.keys import KeyFileError
from agent.daemon.store import StoreFull
from agent.dicom.codestream import CodestreamError
from agent.dicom.decode import ScanRejected
from agent.dicom.series import SliceRefused
from agent.model.bundle import BundleError
from agent.model.contract import ContractError
from agent.model.guard import GuardFailed
from agent.quantize.errors import QuantizeError
from agent.transport.mqtt import MqttError
from agent.transport.topics import TopicError

REPO = Path(__file__).resolve().parents[1]
# Calls whose first argument (or ``reason=``) is a reason code.
REASON_CALLS = {"ScanRejected", "SliceRefused", "ReasonedError", "EnvelopeError", "error",
                "error_report", "_reject"}


def _is_translator(func: ast.expr) -> bool:
    """``self.error(...)`` in the Translator, or ``<...>.translator.error(...)``."""
    value = getattr(func, "value", None)
    return (isinstance(value, ast.Name) and value.id == "self") or (
        isinstance(value, ast.Attribute) and value.attr == "translator")


def _emitted_codes() -> dict[str, str]:
    """Every string literal passed as a reason in agent/, with where it was seen."""
    found: dict[str, str] = {}
    for path in sorted((REPO / "agent").rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            name = getattr(node.func, "id", None) or getattr(node.func, "attr", None)
            if name not in REASON_CALLS:
                continue
            if name == "error" and not _is_translator(node.func):
                continue  # log.error("event", ...): an event name, not a reason
            args = [kw.value for kw in node.keywords if kw.arg == "reason"]
            if name != "error_report" and node.args:
                args.append(node.args[0])
            for arg in args:
                if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                    found.setdefault(arg.value, f"{path.relative_to(REPO)}:{node.lineno}")
    return found


def test_the_scan_is_a_real_one() -> None:
    codes = _emitted_codes()
    assert {"not_dicom", "inference_failed", "model_refused", "decrypt_failed"} <= set(codes)


def test_every_emitted_code_is_registered() -> None:
    unknown = {code: where for code, where in _emitted_codes().items()
               if code not in errors.REASONS}
    assert not unknown, f"add these to agent/errors.py: {unknown}"


def test_every_registered_code_is_documented() -> None:
    doc = (REPO / "docs" / "protocol.md").read_text(encoding="utf-8")
    table_codes = set(re.findall(r"^\| `([a-z_]+)` \|", doc, re.M))
    prose_codes = set(re.findall(r"`([a-z_]+)`", doc))
    missing = sorted(c for c in errors.ERROR_TOPIC_REASONS if c not in table_codes)
    assert not missing, f"document in docs/protocol.md's reason table: {missing}"
    assert not sorted(c for c in errors.ENVELOPE_REASONS if c not in prose_codes)


def test_the_envelope_reason_type_is_the_registry() -> None:
    assert set(typing.get_args(seal.Reason)) == set(errors.ENVELOPE_REASONS)


@pytest.mark.parametrize("kind", [
    ConfigError, ContractError, BundleError, GuardFailed, BackendError, ScanRejected,
    SliceRefused, StoreFull, MqttError, TopicError, KeyFileError, seal.EnvelopeError,
    CodestreamError, QuantizeError, MacCountError,
])
def test_every_error_kind_is_an_agent_error(kind: type[Exception]) -> None:
    assert issubclass(kind, errors.AgentError)


def test_a_reasoned_error_refuses_an_unregistered_code() -> None:
    with pytest.raises(ValueError, match=r"agent/errors\.py"):
        SliceRefused("no_such_reason", "x")
    refused = SliceRefused("series_too_large", "the series holds 512 slices")
    assert refused.reason == "series_too_large" and str(refused) == refused.message
