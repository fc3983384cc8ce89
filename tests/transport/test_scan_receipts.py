"""agent.transport.scan_receipts: the `accepted` body, reading it back, the resend schedule."""

from __future__ import annotations

import hashlib
import json

import pytest

from agent.transport.scan_receipts import (
    MAX_RESEND_WAIT_S,
    accepted_body,
    accepted_digest,
    resend_delay,
)


def test_a_body_names_the_payloads_digest_and_reads_back() -> None:
    body = accepted_body(b"scan-1")
    assert json.loads(body) == {"v": 1, "sha256": hashlib.sha256(b"scan-1").hexdigest()}
    assert accepted_digest(body) == hashlib.sha256(b"scan-1").hexdigest()


@pytest.mark.parametrize("body", [
    b"", b"\xff\xfe", b"[]", b'{"v": 1}', b'{"sha256": 7}', b'{"sha256": "abc"}',
    json.dumps({"sha256": "A" * 64}).encode(),  # upper case: not what the agent writes
])
def test_an_unreadable_receipt_names_nothing(body: bytes) -> None:
    assert accepted_digest(body) is None


def test_the_wait_doubles_per_try_up_to_an_hour() -> None:
    assert [resend_delay(60, t) for t in (1, 2, 3, 4)] == [60, 120, 240, 480]
    assert resend_delay(60, 0) == 60
    assert resend_delay(60, 40) == MAX_RESEND_WAIT_S
