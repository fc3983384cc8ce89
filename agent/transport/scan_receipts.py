"""The ``accepted`` receipt: the agent's word that a scan is durable in its inbox.

The agent publishes ``{"v": 1, "sha256": ...}`` on ``iomt/{site}/{device}/accepted`` once a
scan is committed to its inbox (``accepted_body``). A publisher that keeps each scan until
then (the DICOM gateway with ``gateway.keep_until_accepted``, ``iomt-agent send --confirm``)
reads the receipt with ``accepted_digest`` and publishes an unconfirmed scan again
``resend_delay`` after its last try: the first wait is the publisher's timeout, each later
one twice the one before, up to ``MAX_RESEND_WAIT_S``. The doubling keeps an agent that is
only slow (backpressure: it holds scans unacked) from being flooded with copies.
"""

from __future__ import annotations

import hashlib
import json
import re

VERSION = 1
MAX_RESEND_WAIT_S = 3600.0
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def accepted_body(payload: bytes) -> bytes:
    """The receipt for one scan's payload."""
    return accepted_body_for(hashlib.sha256(payload).hexdigest())


def accepted_body_for(sha256: str) -> bytes:
    """The receipt for a scan whose payload's SHA-256 (hex) is already known."""
    return json.dumps({"v": VERSION, "sha256": sha256}).encode()


def accepted_digest(body: bytes) -> str | None:
    """The SHA-256 (hex) a receipt names; None when it is not a readable receipt."""
    try:
        digest = json.loads(body)["sha256"]
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        return None
    return digest if isinstance(digest, str) and _SHA256.fullmatch(digest) else None


def resend_delay(timeout_s: float, tries: int) -> float:
    """Seconds after try ``tries`` (1, 2, ...) before an unconfirmed scan goes out again."""
    return min(MAX_RESEND_WAIT_S, timeout_s * 2.0 ** max(0, tries - 1))
