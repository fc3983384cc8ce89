"""The time a node trusts before it evaluates TUF expiry: a floor under the system clock.

TUF's freshness rests on the node's clock: metadata whose ``expires`` lies in the past is
refused. A node without a real-time clock boots at its last saved time or at 1970, and until
NTP sets the clock an attacker can show it metadata that expired long ago (a freeze: the
node would accept it). So the node never evaluates expiry while its clock reads earlier than
a floor it already trusts:

* the time the newest timestamp it verified was signed: ``fleet publish`` and ``refresh``
  sign it into the timestamp metadata (``x-iomt-issued``), so it is covered by the
  timestamp role's signatures, and the node keeps that metadata in
  ``{state_dir}/fleet/tuf/timestamp.json`` across restarts;
* ``BUILD_FLOOR``, the date this code was written, before any metadata was verified.

Below the floor (less ``SLACK``, for publisher clocks a little ahead) the update thread
waits (status ``waiting_for_clock``, reason ``clock_behind``) and checks again every few
seconds; the model that serves keeps serving. The clock is passed in, so tests set it.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

ISSUED_FIELD = "x-iomt-issued"  # in the timestamp's "signed": when the publisher signed it
# No clock reading before this can be right on a node running this code.
BUILD_FLOOR = datetime(2026, 12, 1, tzinfo=UTC)
# A publisher's clock a little ahead of the node's must not stall the node's updates.
SLACK = timedelta(hours=1)

Clock = Callable[[], datetime]


def system_clock() -> datetime:
    return datetime.now(UTC)


def issued_now(now: datetime | None = None) -> dict[str, str]:
    """The publisher's side: the field to sign into a timestamp (``now``: the signing time
    the expiry is counted from)."""
    at = (now or datetime.now(UTC)).replace(microsecond=0)
    return {ISSUED_FIELD: at.isoformat().replace("+00:00", "Z")}


def signed_issued(metadata: Path) -> datetime | None:
    """When the stored (verified) timestamp at ``metadata`` was signed, if it says."""
    try:
        signed = json.loads(metadata.read_bytes())["signed"]
        at = datetime.fromisoformat(str(signed[ISSUED_FIELD]).replace("Z", "+00:00"))
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return at if at.tzinfo is not None else at.replace(tzinfo=UTC)


def clock_floor(metadata_dir: Path) -> datetime:
    """The earliest time this node can be at: the newest signing time it verified, or the
    build floor."""
    issued = signed_issued(metadata_dir / "timestamp.json")
    return max(BUILD_FLOOR, issued) if issued else BUILD_FLOOR


def clock_behind(metadata_dir: Path, now: datetime) -> str | None:
    """None when ``now`` can be trusted for expiry; else why not (one sentence)."""
    floor = clock_floor(metadata_dir)
    if now >= floor - SLACK:
        return None
    return (f"the system clock reads {now.isoformat(timespec='seconds')}, before "
            f"{floor.isoformat(timespec='seconds')} (the newest signed time this node has "
            "verified, or its build date): no update check runs before NTP or an RTC "
            "corrects the clock")
