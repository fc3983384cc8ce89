"""The 2.5D path between the inbox and the model: admit scans into series, build the
neighbour stacks of the slices that are ready, and say which inbox rows can be released.

The payloads stay in the inbox (durable, bounded by ``limits.inbox_max_bytes``); memory
holds the series geometry (``agent.dicom.series``) and a small cache of decoded slices on the
model grid, so a slice is decoded about once however many stacks it appears in when slices
arrive roughly in order, and at most once per stack when they do not.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from agent.config import SeriesSection
from agent.daemon.pipeline import ModelInput, Outcome, Prepared, StageTimer, Translator
from agent.daemon.store import InboxItem, Store
from agent.dicom.decode import ScanRejected
from agent.dicom.series import SeriesAssembler, SliceRefused, StackJob, slice_info
from agent.log import get_logger

log = get_logger("agent.daemon.stacking")
SPACING_TOLERANCE = 0.25  # a series this far off the model's slice spacing is warned about


@dataclass(frozen=True)
class Admitted:
    """What became of one inbox row offered to the series stage."""

    outcome: Outcome | None = None  # a rejection to report (the row is done)
    duplicate: bool = False  # the same instance is already here (the row is done)


@dataclass(frozen=True)
class StackResult:
    """One ready slice, decoded and stacked with its neighbours for the model."""

    item: InboxItem  # the centre slice's row (payload not kept)
    job: StackJob
    first: ModelInput | Outcome
    started: float  # perf_counter when its stack began


class SeriesStage:
    """Series assembly wired to the store and the translator (main thread only)."""

    def __init__(self, translator: Translator, store: Store, settings: SeriesSection) -> None:
        self.translator = translator
        self.store = store
        self.context = translator.bundle.input.context_slices
        self.assembler = SeriesAssembler(
            self.context,
            max_open=settings.max_open,
            max_slices=settings.max_slices,
            idle_timeout_s=settings.idle_timeout_s,
        )
        self._cache: OrderedDict[int, Prepared] = OrderedDict()
        self._cache_size = 4 * (2 * self.context + 1)
        self._waiting: dict[int, InboxItem] = {}  # admitted, not yet sent (payload dropped)
        # Decode time at admission (wall ms, CPU ms), for its timings.
        self._decode_ms: dict[int, tuple[float, float]] = {}
        self._spacing_checked: set[str] = set()
        # (open series, waiting slices) as of the last change: other threads (the status
        # message) read this tuple instead of walking the assembler while it changes.
        self.counts = (0, 0)

    def _count(self) -> None:
        self.counts = (self.assembler.open_groups, self.assembler.waiting)

    def _remember(self, inbox_id: int, prepared: Prepared) -> None:
        self._cache[inbox_id] = prepared
        self._cache.move_to_end(inbox_id)
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)

    def _prepared(self, inbox_id: int, decoded: list[Prepared]) -> Prepared:
        """The prepared slice of an inbox row, from the cache or decoded now (then also
        appended to ``decoded``)."""
        hit = self._cache.get(inbox_id)
        if hit is not None:
            self._cache.move_to_end(inbox_id)
            return hit
        payload = self.store.payload(inbox_id)
        if payload is None:
            raise ScanRejected("pixel_decode_failed", "a neighbour slice is no longer stored")
        prepared = self.translator.prepare(payload)
        self._remember(inbox_id, prepared)
        decoded.append(prepared)
        return prepared

    def admit(self, item: InboxItem, now: float, *, sent: bool = False) -> Admitted:
        """Decode one inbox row and place it in its series. ``sent``: a held row reloaded
        after a restart (already processed; only a neighbour now)."""
        started, started_cpu = time.perf_counter(), time.thread_time()
        try:
            prepared = self.translator.prepare(item.payload, item.sha256)
            added = self.assembler.add(slice_info(prepared.scan), item.id, now, sent=sent)
        except (ScanRejected, SliceRefused) as exc:
            if sent:  # it passed before; a changed model contract now refuses it
                self.store.release([item.id])
                return Admitted()
            return Admitted(outcome=self.translator.error(
                exc.reason, str(exc), item.sha256, item.topic))
        if not added:
            return Admitted(duplicate=True)
        self._remember(item.id, prepared)
        if not sent:
            self._waiting[item.id] = InboxItem(item.id, item.topic, item.sha256, b"",
                                               item.received_at)
            self._decode_ms[item.id] = (
                (time.perf_counter() - started) * 1000,
                (time.thread_time() - started_cpu) * 1000 + prepared.scan.decoder_cpu_ms)
        self._count()
        return Admitted()

    def reload(self, now: float, beat: Callable[[], None] = lambda: None) -> int:
        """Admit every held row (after a start or a model change); ``beat`` is called
        between rows (the watchdog). Returns how many were admitted."""
        count, last = 0, 0
        while batch := self.store.held(after_id=last, limit=16):
            for item in batch:
                beat()
                if self.admit(item, now, sent=True).duplicate:
                    # A redelivery that was processed before its twin's series closed: the
                    # twin serves as the neighbour, this copy is nobody's.
                    self.store.release([item.id])
                last = item.id
                count += 1
        self._count()
        return count

    def ready(self, now: float, *, allow_idle: bool = True) -> Iterator[StackResult]:
        """Stack every slice whose neighbours are present (or whose series has closed, with
        padding) for the model. ``allow_idle``: False while received scans are still unread
        (a series must not close for idleness with its next slice among them)."""
        for job in self.assembler.take_ready(now, allow_idle=allow_idle):
            item = self._waiting.pop(job.centre)
            started = time.perf_counter()
            timer = StageTimer()
            decoded: list[Prepared] = []
            try:
                slots = [self._prepared(i, decoded) for i in job.slots]
            except ScanRejected as exc:
                yield StackResult(item, job, self.translator.error(
                    exc.reason, str(exc), item.sha256, item.topic, timer.timings), started)
                continue
            # Neighbours not in the cache, plus the slice at admission.
            timer.lap("decode", extra_cpu_ms=sum(p.scan.decoder_cpu_ms for p in decoded))
            wall_ms, cpu_ms = self._decode_ms.pop(item.id, (0.0, 0.0))
            timer.timings["decode"] = round(timer.timings["decode"] + wall_ms, 3)
            timer.cpu["decode"] = round(timer.cpu["decode"] + cpu_ms, 3)
            centre = slots[len(slots) // 2]
            first = self.translator.stack(centre, [s.grid for s in slots], item.topic,
                                          item.sha256, timer)
            if job.padded:
                log.info("slice_padded", series=job.group, padded_slots=job.padded,
                         why=job.why)
            self._check_spacing(job.group)
            yield StackResult(item, job, first, started)
        self._count()

    def _check_spacing(self, group: str) -> None:
        """Warn once per series whose slice spacing is far from the model's (it still goes
        through: the model then sees neighbours at distances it was not trained on)."""
        want = self.translator.bundle.input.slice_spacing_mm
        if want is None or group in self._spacing_checked:
            return
        got = self.assembler.spacing(group)
        if got is None:
            return
        self._spacing_checked.add(group)
        if abs(got - want) > SPACING_TOLERANCE * want:
            log.warning("slice_spacing_differs", series=group, spacing_mm=round(got, 3),
                        model_spacing_mm=want,
                        fix="this 2.5D model was trained on another slice spacing; its "
                        "output for this series may be poorer: use a model for this protocol")

    def finished(self) -> list[int]:
        """Inbox rows nobody needs any more (release them): those of series that are closed
        and fully processed, and interior slices of open series whose neighbours are all
        processed."""
        released: list[int] = self.assembler.releasable()
        for inbox_id in released:
            self._cache.pop(inbox_id, None)
        for group, why, ids in self.assembler.finished():
            log.info("series_closed", series=group, slices=len(ids), why=why)
            self._spacing_checked.discard(group)
            if why == "evicted":
                log.warning("series_limit", series=group, max_open=self.assembler.max_open,
                            fix="more series arrive at once than series.max_open: raise it; "
                            "this one was closed early (edge padding where neighbours were "
                            "still to come)")
            for inbox_id in ids:
                self._cache.pop(inbox_id, None)
            released += ids
        self._count()
        return released
