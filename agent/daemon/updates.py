"""The daemon's side of fleet updates (``agent.fleet``), on the main thread.

Each turn of the main loop: a bundle the update thread prepared goes to the guarded reload
(``Reloader.request_bundle``); rejections become error reports; a changed update state
republishes the status. After an activation the first ``fleet.rollback_window`` scans
are watched: when more than ``fleet.rollback_failure_rate`` of them fail, the previous bundle (the
fleet's ``previous``, else the configured ``model.bundle``) is loaded, guarded and swapped
back the same way, and the status says ``rolled_back``.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from agent.daemon.reload import Loaded, Reloader, update_report
from agent.daemon.store import Store
from agent.fleet.updater import Candidate, FleetUpdater
from agent.log import get_logger
from agent.model.serving import ServedModel
from agent.transport.topics import Topics

log = get_logger("agent.daemon.updates")

@dataclass(frozen=True)
class Rollback:
    """The reload tag of a rollback: back to ``bundle`` from ``failed``."""

    bundle: Path
    failed: Candidate
    detail: str


class UpdateHook:
    """Glue between one ``FleetUpdater`` and the daemon's reload, store and status."""

    def __init__(self, fleet: FleetUpdater, reloader: Reloader, store: Store, topics: Topics,
                 *, configured: Path, kick: threading.Event,
                 publish_status: Callable[[], None]) -> None:
        self.fleet = fleet
        self._reloader = reloader
        self._store = store
        self._topics = topics
        self._configured = configured  # model.bundle: the fallback below every fleet bundle
        self._kick = kick
        self._publish_status = publish_status
        self._watch: tuple[Candidate, int, int] | None = None  # candidate, processed, failed

    def turn(self) -> None:
        fleet = self.fleet
        candidate = fleet.take_candidate()
        if candidate is not None:
            self._reloader.request_bundle(candidate.bundle, candidate)
        for reason, detail in fleet.take_reports():
            self._store.complete(None, [update_report(self._topics, reason, detail)],
                                 "update_rejected")
            self._kick.set()
        if self._watch is not None:
            self._check_rate()
        if fleet.changed.is_set():
            fleet.changed.clear()
            self._publish_status()

    def _counts(self) -> tuple[int, int]:
        counts = self._store.counters()
        return counts.get("processed", 0), counts.get("failed", 0)

    def _check_rate(self) -> None:
        assert self._watch is not None
        candidate, processed0, failed0 = self._watch
        processed, failed = self._counts()
        failed -= failed0
        seen = processed - processed0 + failed
        window, rate = (self.fleet.settings.rollback_window,
                        self.fleet.settings.rollback_failure_rate)
        if failed > window * rate:
            self._watch = None
            back = self.fleet.store.previous or self._configured
            detail = (f"{failed} of the first {seen} scans on {candidate.name} "
                      f"{candidate.version} failed (more than {rate:.0%} of {window})")
            log.error("update_failing", version=candidate.version, detail=detail,
                      back_to=str(back))
            self._reloader.request_bundle(back, Rollback(back, candidate, detail))
        elif seen >= window:
            self._watch = None  # it proved itself

    def finish(self, tag: object, loaded: Loaded, swap: Callable[[ServedModel], None]) -> None:
        """A fleet load finished (``tag``: its Candidate or Rollback)."""
        if isinstance(tag, Rollback):
            if isinstance(loaded, ServedModel):
                self.fleet.rolled_back(tag.failed, tag.detail, to_configured=(
                    tag.bundle == self._configured))
                swap(loaded)
            else:
                log.error("rollback_refused", bundle=str(tag.bundle), reason=str(loaded),
                          note="the new model keeps serving")
            return
        assert isinstance(tag, Candidate)
        if isinstance(loaded, ServedModel):
            self.fleet.activated(tag)
            swap(loaded)
            self._watch = (tag, *self._counts())
        else:
            self.fleet.refused(tag, loaded)
