"""Backpressure: why the agent is not taking scans right now, for the retained status.

Several places can stop the flow: ingest (the inbox at its cap, the outbox full under
``storage.outbox_full = "backpressure"``, the disk below its reserve) and the finisher (a
commit that found the disk full). Each reports its own cause under its own key; the status
shows the first active one, with when it began. The main loop publishes the status at once
when the answer changes (``changed``), not only every 15 s.
"""

from __future__ import annotations

import threading
from datetime import UTC, datetime
from typing import Any

from agent.log import get_logger

log = get_logger("agent.daemon.pressure")

# The status's backpressure.reason and what each one asks of the operator.
FIXES = {
    "inbox_full": "scans arrive faster than the model serves them; raise limits.inbox_max_bytes"
                  " or add agents (shared subscription)",
    "outbox_full": "the cloud broker is not taking results (down, or no consumer subscribed);"
                   " results wait in the outbox and scans with the edge broker",
    "disk_full": "the state directory's filesystem is (nearly) full: free space there; the "
                 "agent resumes by itself",
}


def _now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


class Pressure:
    """Thread-safe record of active backpressure causes, one per source."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._active: dict[str, tuple[str, str]] = {}  # source -> (reason, since)
        self._reported: dict[str, Any] | None = None

    def set(self, source: str, reason: str) -> None:
        """``source`` ("ingest", "finisher") is stopped by ``reason`` (a key of FIXES)."""
        with self._lock:
            if self._active.get(source, ("",))[0] == reason:
                return
            self._active[source] = (reason, _now_iso())
        log.warning("backpressure", source=source, reason=reason, fix=FIXES[reason])

    def clear(self, source: str) -> None:
        with self._lock:
            gone = self._active.pop(source, None)
        if gone is not None:
            log.info("backpressure_over", source=source, reason=gone[0], since=gone[1])

    def summary(self) -> dict[str, Any] | None:
        """The status's ``backpressure``: null when scans flow."""
        with self._lock:
            if not self._active:
                return None
            # disk_full first: it is the one that needs a person
            source, (reason, since) = min(self._active.items(),
                                          key=lambda kv: kv[1][0] != "disk_full")
            return {"reason": reason, "source": source, "since": since}

    def changed(self) -> bool:
        """Whether ``summary`` differs from what the last call here saw."""
        now = self.summary()
        with self._lock:
            if now == self._reported:
                return False
            self._reported = now
            return True
