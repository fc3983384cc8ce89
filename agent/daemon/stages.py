"""The processing stages between the inbox and the outbox, on three threads.

* the caller's thread (the daemon's main loop) runs ``process_pending``: decode, validate and
  preprocess each pending scan (for a 2.5D model, series assembly first,
  ``agent.daemon.stacking``) and hand it to the model thread;
* the model thread runs the model on each staged input, in order: the runtime releases the
  GIL, so the model works while the main thread decodes the next scan and the finisher
  writes the previous one. With several model workers (``model.workers``: one runtime
  session each) it hands each input to the next free worker instead and passes the pending
  result on in order, so two slices are inferred at once (on 2 cores, two 1-thread sessions
  keep both cores busier than one 2-thread session does);
* the finisher thread derives, seals and commits each result, in order: the inbox row is
  marked done and the outbox row written in one transaction.

When the outbox is at its cap, decoding waits for room (``storage.outbox_full =
"backpressure"``) or the oldest results are dropped, each replaced by an error report
(``"drop_oldest"``). A commit that finds the disk full is retried every second until it
succeeds (the scan stays pending meanwhile; nothing is lost or committed twice).

``drain`` waits until everything handed over is committed (before a model swap, so results
of the old model are committed under its identity).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

from agent.backends import ModelRunner
from agent.config import SeriesSection
from agent.config_budgets import StorageSection
from agent.daemon.pipeline import Inferred, ModelInput, Outcome, Translator
from agent.daemon.pressure import Pressure
from agent.daemon.stacking import SeriesStage
from agent.daemon.store import DiskFull, OutboxItem, Store
from agent.errors import AgentError
from agent.log import get_logger
from agent.thread_names import name_thread

log = get_logger("agent.daemon.stages")

MODEL_QUEUE = 2  # staged scans waiting for the model (each holds its input tensor)
FINISH_QUEUE = 2  # scans between the model and the finisher
FETCH_BATCH = 8  # inbox rows read per turn of the processing loop
DISK_RETRY_S = 1.0  # a commit that found the disk full is tried again after this


class StageDied(AgentError):
    """A stage thread ended with an uncaught error: nothing more gets processed, so the
    daemon stops (systemd restarts it; what was not committed stays pending)."""


@dataclass
class _Job:
    """One item for the model thread and then the finisher thread, which handle them in
    order."""

    inbox_id: int | None = None
    # ModelInput: for the model thread; Inferred: for the finisher; Outcome: a rejection;
    # None with an inbox id: a duplicate, no output.
    first: ModelInput | Inferred | Outcome | None = None
    started: float = 0.0
    received_at: float = 0.0
    sha256: str = ""
    hold: bool = False  # keep the payload: a neighbour for slices still to come (2.5D)
    release: list[int] = field(default_factory=list)  # held rows nobody needs any more
    barrier: threading.Event | None = None  # set once every earlier job is committed
    inferring: Future[Inferred | Outcome] | None = None  # on a model worker: ``first`` then


class _Workers:
    """Model workers: one thread per runner, each bound to its runner for its life."""

    def __init__(self, runners: tuple[ModelRunner, ...]) -> None:
        self.runners = runners
        unbound: queue.Queue[ModelRunner] = queue.Queue()
        for runner in runners:
            unbound.put(runner)
        self._mine = threading.local()

        def bind() -> None:  # each pool thread, once: as many threads as runners
            name_thread(threading.current_thread().name)
            self._mine.runner = unbound.get_nowait()

        self._pool = ThreadPoolExecutor(len(runners), thread_name_prefix="infer",
                                        initializer=bind)

    def submit(self, translator: Translator, staged: ModelInput) -> Future[Inferred | Outcome]:
        return self._pool.submit(self._run, translator, staged)

    def _run(self, translator: Translator, staged: ModelInput) -> Inferred | Outcome:
        return translator.run_model(staged, self._mine.runner)

    def close(self) -> None:
        self._pool.shutdown(wait=True)


class Stages:
    """Decode | model | finish. ``space`` is notified whenever inbox or outbox bytes are
    freed; ``committed`` runs on the finisher thread after each commit (the daemon kicks
    the outbox and publishes its status there)."""

    def __init__(self, store: Store, series: SeriesSection, translator: Translator, *,
                 stop: threading.Event, space: threading.Condition,
                 beat: Callable[[], None], committed: Callable[[], None],
                 storage: StorageSection | None = None,
                 pressure: Pressure | None = None) -> None:
        self.store = store
        self.translator = translator
        self.series: SeriesStage | None = None
        self.last_latency_ms: float | None = None
        self._series_settings = series
        self._stop = stop
        self._space = space
        self._beat = beat
        self._committed = committed
        self._storage = storage or StorageSection()
        self._pressure = pressure or Pressure()
        self._last_fetched = 0  # inbox rows up to here are in the later stages' hands
        self._to_model: queue.Queue[_Job | None] = queue.Queue(maxsize=MODEL_QUEUE)
        self._finishing: queue.Queue[_Job | None] = queue.Queue(maxsize=FINISH_QUEUE)
        self._threads = [threading.Thread(target=self._modeller, name="model", daemon=True),
                         threading.Thread(target=self._finisher, name="finisher", daemon=True)]

    # -- lifecycle -----------------------------------------------------------------------
    def serve(self, translator: Translator, context_slices: int) -> None:
        """Serve through ``translator`` from now on (at start, and after a swap once
        ``drain`` has returned). A 2.5D model gets its series assembly, rebuilt from the
        inbox (held rows are the neighbours already processed)."""
        self.translator = translator
        self._last_fetched = 0  # pending rows are (re)admitted under the current model
        if context_slices == 0:
            self.series = None
            self.store.release_held()  # held for an earlier 2.5D model: nobody's neighbours
            return
        s = self._series_settings
        self.series = SeriesStage(translator, self.store, s)
        reloaded = self.series.reload(time.monotonic(), self._beat)
        log.info("series_assembly", context_slices=context_slices, held_reloaded=reloaded,
                 idle_timeout_s=s.idle_timeout_s, max_open=s.max_open, max_slices=s.max_slices)

    def start(self) -> None:
        """Start the model and finisher threads."""
        for thread in self._threads:
            thread.start()

    def drain(self) -> None:
        """Wait until every job handed to the model thread so far is committed. Raises
        ``StageDied`` instead of waiting for a thread that has ended."""
        done = threading.Event()
        self._hand_over(_Job(barrier=done))  # through the model thread, then the finisher
        while not done.wait(1.0):
            self.check_alive()
            self._beat()

    def check_alive(self) -> None:
        """Raise ``StageDied`` when a started stage thread has ended (before ``stop``)."""
        dead = [t.name for t in self._threads if t.ident is not None and not t.is_alive()]
        if dead:
            raise StageDied(f"the {' and '.join(dead)} thread ended with an error (logged "
                            "above): nothing more can be processed")

    @property
    def idle(self) -> bool:
        """Nothing is queued between the stages."""
        return self._to_model.empty() and self._finishing.empty()

    def stop(self, timeout: float | None = None) -> None:
        """Finish the jobs already handed over (at most MODEL_QUEUE + 1 are run, finished
        and committed; the rest stay pending in the inbox for the next start)."""
        with contextlib.suppress(queue.Full):  # a dead model thread takes nothing more
            self._to_model.put(None, timeout=timeout)
        for thread in self._threads:
            if thread.is_alive():
                thread.join(timeout)

    # -- the caller's thread -------------------------------------------------------------
    def process_pending(self) -> bool:
        """Decode, validate and preprocess every pending scan and hand each to the model
        thread. Returns whether there was anything to do."""
        items = self.store.pending(after_id=self._last_fetched, limit=FETCH_BATCH)
        for item in items:
            self._beat()
            if self._stop.is_set():
                return True
            self._wait_for_outbox_room()
            job = _Job(item.id, None, time.perf_counter(), item.received_at, item.sha256)
            if self.series is None:
                job.first = self.translator.stage(item.payload, item.topic, item.sha256)
                self._hand_over(job)  # blocks when the model lags
            else:
                admitted = self.series.admit(item, time.monotonic())
                if admitted.outcome is not None or admitted.duplicate:
                    job.first = admitted.outcome
                    self._hand_over(job)
            self._last_fetched = item.id
        busy = bool(items)
        if self.series is not None:
            # A full batch means more rows wait unread: no series may close for idleness
            # while its next slice may be among them.
            busy = self._process_series(allow_idle=len(items) < FETCH_BATCH) or busy
        return busy

    def _hand_over(self, job: _Job) -> None:
        """To the model thread; beats while it waits (a finisher waiting for disk space
        holds up the queues: a wait, not a hang), unless a stage thread has died
        (``StageDied``: then it would wait for ever)."""
        while True:
            try:
                self._to_model.put(job, timeout=1.0)
                return
            except queue.Full:
                self.check_alive()
                self._beat()

    def _wait_for_outbox_room(self) -> None:
        drop = self._storage.outbox_full == "drop_oldest"
        if drop:
            self._drop_oldest()
        if not self.store.outbox_full():
            return
        self._pressure.set("processing", "outbox_full")
        log.warning("outbox_full", detail="results the cloud broker has not taken fill "
                    "limits.outbox_max_bytes: scans wait in the inbox, none is lost",
                    fix="check that the cloud broker is up and reachable (`iomt-agent "
                    "doctor`); for longer outages raise limits.outbox_max_bytes, or set "
                    'storage.outbox_full = "drop_oldest"')
        since = told = time.monotonic()
        while self.store.outbox_full() and not self._stop.is_set():
            self._beat()  # waiting for the cloud is not a hang
            if time.monotonic() - told >= 60.0:
                told = time.monotonic()
                log.warning("outbox_still_full", waited_s=round(told - since))
            with self._space:
                self._space.wait(5.0)
            if drop:  # the finisher may have filled it again after the first drop
                self._drop_oldest()
        self._pressure.clear("processing")

    def _drop_oldest(self) -> None:
        """``drop_oldest``: make room by replacing the oldest results with error reports
        (when only reports are left, there is nothing to drop: wait like backpressure)."""
        if not self.store.outbox_full():
            return
        dropped = self.store.drop_oldest(self._overflow_report)
        if dropped:
            log.error("outbox_overflow", dropped=len(dropped),
                      message_ids=[d.message_id for d in dropped[:8]],
                      fix="the cloud broker is not taking results: the oldest were dropped "
                      "(storage.outbox_full = drop_oldest); each has an error report")
            self._committed()  # kick the outbox: the reports go out

    def _process_series(self, *, allow_idle: bool) -> bool:
        """2.5D: stage every slice whose neighbours are present (or whose series closed)."""
        assert self.series is not None
        busy = False
        for result in self.series.ready(time.monotonic(), allow_idle=allow_idle):
            self._beat()
            self._wait_for_outbox_room()
            item = result.item
            self._hand_over(_Job(item.id, result.first, result.started, item.received_at,
                                 item.sha256, hold=True))
            busy = True
        released = self.series.finished()
        if released:  # behind the results of those slices, so released once they are stored
            self._hand_over(_Job(release=released))
        return busy

    # -- the model thread ----------------------------------------------------------------
    def _modeller(self) -> None:
        """The model on each staged scan, in order (or handed to the next free model
        worker); every job goes on to the finisher in order (the stop marker too, after the
        jobs before it)."""
        name_thread("model")
        workers: _Workers | None = None
        try:
            while True:
                job = self._to_model.get()
                if job is not None and isinstance(job.first, ModelInput):
                    translator = self.translator
                    if workers is not None and workers.runners != translator.runners:
                        workers.close()  # a swapped model: drained, so idle
                        workers = None
                    if len(translator.runners) == 1:
                        job.first = translator.run_model(job.first)
                    else:
                        if workers is None:
                            workers = _Workers(translator.runners)
                        job.inferring = workers.submit(translator, job.first)
                self._finishing.put(job)  # blocks when the finisher lags
                if job is None:
                    return
        finally:
            if workers is not None:
                workers.close()

    # -- the finisher thread -------------------------------------------------------------
    def _finisher(self) -> None:
        """Derive, seal and commit, one scan at a time, in order."""
        name_thread("finisher")
        while True:
            job = self._finishing.get()
            if job is None:
                return
            if job.inferring is not None:  # on a model worker; an unexpected error ends here
                job.first = job.inferring.result()
            if job.barrier is not None:
                job.barrier.set()
            elif job.release:
                self._while_disk_full(functools.partial(self.store.release, job.release))
                self._freed()
            elif job.first is None:  # the same instance is already being assembled
                self._complete(job.inbox_id, [], "duplicates")
            else:
                self._commit(job)

    def _overflow_report(self, item: OutboxItem) -> tuple[str, str, str, bytes]:
        """The outbox row replacing a dropped result: an error report naming it."""
        outcome = self.translator.error(
            "outbox_overflow",
            f"result {item.message_id} dropped: the outbox was at limits.outbox_max_bytes "
            f"{self.store.outbox_max_bytes} (storage.outbox_full = drop_oldest)",
            hashlib.sha256(item.payload).hexdigest(), "outbox")
        return outcome.kind, outcome.message_id, outcome.topic, outcome.payload

    def _complete(self, inbox_id: int | None, outputs: list[tuple[str, str, str, bytes]],
                  counter: str, *, hold: bool = False) -> None:
        """``store.complete``, retried while the disk is full (the job stays here)."""
        self._while_disk_full(functools.partial(self.store.complete, inbox_id, outputs,
                                                counter, hold=hold))

    def _while_disk_full(self, write: Callable[[], object]) -> None:
        """Run one store write, again every DISK_RETRY_S while the disk is full."""
        while True:
            try:
                write()
                break
            except DiskFull:
                self._pressure.set("finisher", "disk_full")
                time.sleep(DISK_RETRY_S)
        self._pressure.clear("finisher")

    def _freed(self) -> None:
        with self._space:
            self._space.notify_all()

    def _commit(self, job: _Job) -> None:
        first = job.first
        assert first is not None and not isinstance(first, ModelInput), "the model ran it"
        outcome = first if isinstance(first, Outcome) else self.translator.finish(first)
        self._complete(job.inbox_id,
                       [(outcome.kind, outcome.message_id, outcome.topic, outcome.payload)],
                       outcome.counter, hold=job.hold)
        self._freed()
        total_ms = round((time.perf_counter() - job.started) * 1000, 3)
        queued_ms = round((time.time() - job.received_at) * 1000, 1)
        if outcome.ok:
            self.last_latency_ms = total_ms
            log.info("slice_processed", message_id=outcome.message_id,
                     series=outcome.series_key, stages_ms=outcome.timings_ms,
                     cpu_ms=outcome.cpu_ms, total_ms=total_ms, since_received_ms=queued_ms,
                     bytes_out=len(outcome.payload))
        else:
            log.warning("scan_rejected", reason=outcome.reason, detail=outcome.detail,
                        payload_sha256=job.sha256, message_id=outcome.message_id)
        self._committed()
