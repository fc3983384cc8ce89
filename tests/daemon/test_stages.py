"""agent.daemon.stages.Stages: several model workers keep the order of the results; when a
stage thread dies, the wait for it ends with ``StageDied`` instead of going on for ever
(while the watchdog is still fed)."""

from __future__ import annotations

import hashlib
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any, cast

import numpy as np
import pytest

from agent.backends import ModelRunner, RunnerOptions, open_runner
from agent.backends.base import Array
from agent.config import LimitsSection, SeriesSection
from agent.daemon.pipeline import Translator
from agent.daemon.stages import StageDied, Stages, _Job
from agent.daemon.store import Store
from agent.demo.sample_series import build_series
from agent.model.bundle import load_bundle
from agent.transport.topics import Topics
from tests.bundles import make_scale_bundle


class Watched(ModelRunner):
    """A real runner that records which thread ran each slice and how many ran at once;
    it holds each call a little so that two workers overlap where they can."""

    runtime = "onnxruntime"
    lock = threading.Lock()
    running = 0
    most_at_once = 0

    def __init__(self, inner: ModelRunner, hold_s: float) -> None:
        self.inner, self.hold_s, self.threads = inner, hold_s, set[str]()
        self.calls = 0

    def run(self, batch: Array) -> Array:
        cls = type(self)
        with cls.lock:
            cls.running += 1
            cls.most_at_once = max(cls.most_at_once, cls.running)
        self.threads.add(threading.current_thread().name)
        self.calls += 1
        time.sleep(self.hold_s)
        try:
            return self.inner.run(batch)
        finally:
            with cls.lock:
                cls.running -= 1

    def close(self) -> None:
        self.inner.close()


def _translator(root: Path, workers: int, factor: float = 0.5,
                ) -> tuple[Translator, list[Watched]]:
    """A scale model served by ``workers`` watched sessions; the identity as the sealer."""
    bundle = load_bundle(make_scale_bundle(root, factor=factor, name=f"scale-{factor}"))
    path = str(bundle.backend_file("onnxruntime").path)
    runners = [Watched(open_runner("onnxruntime", path, RunnerOptions(intra_op_threads=1)),
                       0.03 * (1 + i % 2)) for i in range(workers)]  # unequal: out of step
    return Translator(bundle, runners[0], lambda data, _mid: data, limits=LimitsSection(),
                      topics=Topics("site-1", "edge-1"), extra_runners=runners[1:]), runners


def _payloads() -> list[bytes]:
    vol = (np.arange(12 * 32 * 32, dtype=np.uint16).reshape(12, 32, 32) % 900) + 100
    return build_series(vol, spacing_mm=(1.0, 1.0, 1.0), patient_name="A^B", patient_id="P1",
                        series_description="T1w axial")


def _accept(store: Store, payloads: list[bytes]) -> list[int]:
    return [store.accept("iomt/site-1/scans/gw", hashlib.sha256(p).hexdigest(), p)
            for p in payloads]


def _results_in_order(tmp_path: Path, workers: int, payloads: list[bytes]) -> dict[str, Any]:
    Watched.running = Watched.most_at_once = 0
    translator, runners = _translator(tmp_path / f"scale-{workers}", workers)
    store = Store(tmp_path / f"agent-{workers}.db", inbox_max_bytes=1 << 26,
                  outbox_max_bytes=1 << 26)
    inbox = _accept(store, payloads)
    stages = Stages(store, SeriesSection(), translator, stop=threading.Event(),
                    space=threading.Condition(), beat=lambda: None, committed=lambda: None)
    stages.start()
    while stages.process_pending():
        pass
    stages.drain()
    stages.stop(timeout=5.0)
    rows = store.outbox(limit=len(payloads) + 1)
    out = {"inbox": inbox, "pending": store.pending(), "kinds": [r.kind for r in rows],
           "message_ids": [r.message_id for r in rows], "payloads": [r.payload for r in rows],
           "threads": [r.threads for r in runners], "most_at_once": Watched.most_at_once}
    for runner in runners:
        runner.close()
    store.close()
    return out


def test_two_model_workers_overlap_and_keep_the_order_of_results(tmp_path: Path) -> None:
    payloads = _payloads()
    one = _results_in_order(tmp_path, 1, payloads)
    two = _results_in_order(tmp_path, 2, payloads)
    assert one["most_at_once"] == 1 and two["most_at_once"] == 2
    assert all(two["threads"]) and not set.intersection(*two["threads"])  # one thread each
    assert two["pending"] == [] and two["kinds"] == ["result"] * len(payloads)
    # In the order the scans arrived, byte for byte what one worker gives (the sealer here is
    # the identity, so the derived instances themselves are compared).
    assert two["message_ids"] == one["message_ids"] and len(set(one["message_ids"])) == 12
    assert two["payloads"] == one["payloads"]


@pytest.mark.parametrize("new_workers", [2, 1])
def test_a_swapped_model_gets_its_own_workers_after_the_drain(tmp_path: Path,
                                                              new_workers: int) -> None:
    """The reload's order: drain, then serve the new translator; the scans handed over
    before the swap run on the old sessions, the rest on the new ones, all in order. The old
    sessions' worker threads end (also when the new model has one session)."""
    payloads = _payloads()
    before = set(threading.enumerate())  # other tests' threads are not this test's
    old, old_runners = _translator(tmp_path / "a", 2, factor=0.5)
    new, new_runners = _translator(tmp_path / "b", new_workers, factor=0.25)
    store = Store(tmp_path / "agent.db", inbox_max_bytes=1 << 26, outbox_max_bytes=1 << 26)
    stages = Stages(store, SeriesSection(), old, stop=threading.Event(),
                    space=threading.Condition(), beat=lambda: None, committed=lambda: None)
    stages.start()
    _accept(store, payloads[:6])
    while stages.process_pending():
        pass
    stages.drain()
    stages.serve(new, 0)
    _accept(store, payloads[6:])
    while stages.process_pending():
        pass
    stages.drain()
    infer_threads = {t.name for t in set(threading.enumerate()) - before
                     if t.name.startswith("infer")}
    assert len(infer_threads) == new_workers if new_workers > 1 else not infer_threads
    stages.stop(timeout=5.0)
    rows = store.outbox(limit=20)
    assert [r.kind for r in rows] == ["result"] * 12
    assert sum(r.calls for r in old_runners) == 6 and sum(r.calls for r in new_runners) == 6
    assert all(r.calls for r in old_runners + new_runners)  # both sessions of each served
    served_by = ["old" if old.identity.digest.encode() in row.payload else
                 "new" if new.identity.digest.encode() in row.payload else "?" for row in rows]
    assert served_by == ["old"] * 6 + ["new"] * 6
    for runner in old_runners + new_runners:
        runner.close()
    store.close()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_finisher_that_dies_ends_drain_with_stage_died(tmp_path: Path) -> None:
    db = tmp_path / "agent.db"
    store = Store(db, inbox_max_bytes=1 << 20, outbox_max_bytes=1 << 20)
    rid = store.accept("t", "0" * 64, b"scan")
    con = sqlite3.connect(db)  # the finisher's commit fails with an error it does not expect
    con.executescript("CREATE TRIGGER broken BEFORE UPDATE ON inbox "
                      "BEGIN SELECT RAISE(ABORT, 'broken'); END;")
    con.close()
    beats: list[int] = []
    stages = Stages(store, SeriesSection(), cast(Translator, None), stop=threading.Event(),
                    space=threading.Condition(), beat=lambda: beats.append(1),
                    committed=lambda: None)
    stages.check_alive()  # not started yet: nothing has died
    stages.start()
    stages.check_alive()
    stages._to_model.put(_Job(inbox_id=rid))  # a duplicate: the finisher only commits it
    with pytest.raises(StageDied) as died:
        stages.drain()
    assert str(died.value) == ("the finisher thread ended with an error (logged above): "
                               "nothing more can be processed")
    stages.stop(timeout=1.0)
    assert [r.id for r in store.pending()] == [rid]  # not committed: processed next start
    store.close()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_handing_over_to_full_queues_behind_a_dead_finisher_raises(tmp_path: Path) -> None:
    """The queues fill up behind a dead finisher; the caller's thread, which beats while it
    waits for room, gets ``StageDied`` instead of waiting (and feeding the watchdog) for
    ever."""
    db = tmp_path / "agent.db"
    store = Store(db, inbox_max_bytes=1 << 20, outbox_max_bytes=1 << 20)
    rids = [store.accept("t", f"{i:064x}", b"scan") for i in range(8)]
    con = sqlite3.connect(db)
    con.executescript("CREATE TRIGGER broken BEFORE UPDATE ON inbox "
                      "BEGIN SELECT RAISE(ABORT, 'broken'); END;")
    con.close()
    stages = Stages(store, SeriesSection(), cast(Translator, None), stop=threading.Event(),
                    space=threading.Condition(), beat=lambda: None, committed=lambda: None)
    stages.start()
    with pytest.raises(StageDied, match="finisher"):
        for rid in rids:  # duplicates: the first kills the finisher, the rest fill the queues
            stages._hand_over(_Job(inbox_id=rid))
    stages.stop(timeout=1.0)
    store.close()
