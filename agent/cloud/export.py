"""``receive --stow-url``: every filed result stored in a DICOMweb archive too, once.

The filed result (``OUT/<Study>/<Series>/<SOP>.dcm``) is the durable copy, so the export
runs beside the MQTT loop on its own thread and never holds up an ack. Its ledger lives in
``OUT/stow/``: ``stored/<SOP>`` once the archive has the instance (stored now, or it said it
had it already), ``refused/<SOP>.json`` (the HTTP status, the DICOM failure reason) when it
refused it. A result without a ``stored`` mark is pending: each run of ``receive`` sends the
pending ones first, refused ones included (the archive may have been fixed), so a refused
result is kept and reported, never dropped, and a stored one is never sent twice.

Retries: a transient failure (network, timeout, HTTP 408/429/5xx) is tried again after
1, 2, 4, ... s (at most ``MAX_BACKOFF_S``) up to ``attempts`` times in one run; before
another try, a QIDO-RS look-up asks whether the archive stored it after all.
"""

from __future__ import annotations

import json
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from agent.cloud.receiver import QUARANTINE_DIR
from agent.cloud.stow import Stored, StowClient
from agent.errors import EXPORT_REASONS
from agent.log import get_logger

log = get_logger("agent.receive")

LEDGER_DIR = "stow"
MAX_BACKOFF_S = 30.0


@dataclass
class ExportTally:
    stored: int = 0
    duplicates: int = 0  # the archive had it already
    refused: int = 0  # kept in OUT with a refused/ record
    unreachable: int = 0  # every try failed for want of the archive: pending for next run
    pending_at_start: int = 0


@dataclass
class _State:
    queue: queue.Queue[Path] = field(default_factory=queue.Queue)
    busy: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)
    idle: threading.Condition = field(init=False)

    def __post_init__(self) -> None:
        self.idle = threading.Condition(self.lock)


STOP_DRAIN_S = 5.0  # after a stop signal: how long the stores in flight may still take


class Exporter:
    def __init__(self, client: StowClient, out_dir: Path, *, attempts: int,
                 sleep: Callable[[float], None] | None = None) -> None:
        self.client = client
        self.out_dir = out_dir
        self.ledger = out_dir / LEDGER_DIR
        self.attempts = attempts
        self.tally = ExportTally()
        self._state = _State()
        self._stop = threading.Event()
        self._sleep = sleep or self._stop.wait  # a retry's backoff ends early on stop
        self._thread = threading.Thread(target=self._work, name="stow-export", daemon=True)

    # -- the ledger ----------------------------------------------------------------------
    def _stored_mark(self, sop: str) -> Path:
        return self.ledger / "stored" / sop

    def _refused_mark(self, sop: str) -> Path:
        return self.ledger / "refused" / f"{sop}.json"

    def pending(self) -> list[Path]:
        """Filed results the archive does not have yet (refused ones included)."""
        found = []
        for path in sorted(self.out_dir.glob("*/*/*.dcm")):
            if path.parts[-3] in (QUARANTINE_DIR, LEDGER_DIR):
                continue
            if not self._stored_mark(path.stem).exists():
                found.append(path)
        return found

    def refused(self) -> list[Path]:
        """The refusal records of this output directory."""
        return sorted((self.ledger / "refused").glob("*.json"))

    # -- the queue -----------------------------------------------------------------------
    def start(self) -> None:
        backlog = self.pending()
        self.tally.pending_at_start = len(backlog)
        for path in backlog:
            self.submit(path)
        self._thread.start()

    def submit(self, path: Path) -> None:
        """A result just filed (or found pending): store it in the archive."""
        with self._state.lock:
            self._state.busy += 1
        self._state.queue.put(path)

    def drain(self, timeout: float | None, stop: threading.Event | None = None) -> bool:
        """Wait until every submitted result is stored, refused or given up on; once
        ``stop`` is set (a signal), at most ``STOP_DRAIN_S`` more: what is left stays
        pending in the ledger for the next run."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._state.idle:
            while self._state.busy:
                if stop is not None and stop.is_set():
                    cut = time.monotonic() + STOP_DRAIN_S
                    deadline = cut if deadline is None else min(deadline, cut)
                    stop = None
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._state.idle.wait(left if left is not None else 1.0)
        return True

    def stop(self) -> None:
        self._stop.set()
        self._state.queue.put(Path())  # wakes the worker
        self._thread.join(5.0)

    def _work(self) -> None:
        while not self._stop.is_set():
            path = self._state.queue.get()
            if self._stop.is_set():
                return
            try:
                self._export(path)
            except Exception as exc:  # a file that vanished, a full disk: say so, go on
                log.error("stow_failed", file=path.name, error=f"{type(exc).__name__}: {exc}")
            finally:
                with self._state.idle:
                    self._state.busy -= 1
                    self._state.idle.notify_all()

    # -- one result ----------------------------------------------------------------------
    def _export(self, path: Path) -> None:
        sop, series, study = path.stem, path.parent.name, path.parent.parent.name
        if self._stored_mark(sop).exists():
            return
        part10 = path.read_bytes()
        got: Stored = Stored("transient")
        for attempt in range(1, self.attempts + 1):
            if attempt > 1:
                self._sleep(min(MAX_BACKOFF_S, 2.0 ** (attempt - 2)))
                if self._stop.is_set():
                    return
                if self.client.exists(study, series, sop):  # the last try got through
                    got = Stored("duplicate", detail="found by QIDO-RS after a failed try")
                    break
            got = self.client.store(part10)
            if got.kind == "refused" and got.http_status == 409 and self.client.exists(
                    study, series, sop):
                got = Stored("duplicate", 409, got.failure_reason, "the archive has it already")
            if got.kind != "transient":
                break
            log.warning("stow_retry", file=path.name, attempt=attempt, of=self.attempts,
                        detail=got.detail)
        self._record(path, got)

    def _record(self, path: Path, got: Stored) -> None:
        sop = path.stem
        rel = str(path.relative_to(self.out_dir))
        if got.kind in ("stored", "duplicate"):
            mark = self._stored_mark(sop)
            mark.parent.mkdir(parents=True, exist_ok=True)
            mark.write_text(got.kind + "\n", encoding="utf-8")
            self._refused_mark(sop).unlink(missing_ok=True)
            if got.kind == "stored":
                self.tally.stored += 1
            else:
                self.tally.duplicates += 1
            log.info("stow_stored", path=rel, duplicate=got.kind == "duplicate",
                     n=self.tally.stored + self.tally.duplicates)
            return
        reason = "archive_refused" if got.kind == "refused" else "archive_unreachable"
        assert reason in EXPORT_REASONS
        if got.kind == "refused":
            self.tally.refused += 1
            record = self._refused_mark(sop)
            record.parent.mkdir(parents=True, exist_ok=True)
            record.write_text(json.dumps({
                "path": rel, "http_status": got.http_status,
                "failure_reason": got.failure_reason, "detail": got.detail,
                "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}) + "\n",
                encoding="utf-8")
            fix = ("the archive refused it: the result stays in the output directory (its "
                   "record in stow/refused/); fix the archive or the auth flags and run "
                   "receive --stow-url again: it sends every result not yet stored")
        else:
            self.tally.unreachable += 1
            fix = ("kept in the output directory: the next receive --stow-url sends it; "
                   "check the URL, the network and the archive")
        log.warning("stow_kept", reason=reason, path=rel, http_status=got.http_status,
                    detail=got.detail, fix=fix)
