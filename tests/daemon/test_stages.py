"""agent.daemon.stages.Stages when a stage thread dies: the wait for it ends with
``StageDied`` instead of going on for ever (while the watchdog is still fed)."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path
from typing import cast

import pytest

from agent.config import SeriesSection
from agent.daemon.pipeline import Translator
from agent.daemon.stages import StageDied, Stages, _Job
from agent.daemon.store import Store


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
