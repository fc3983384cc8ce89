"""agent.gateway.spool: queued and awaiting rows, receipts by digest, requeues, and the
migration of a spool written before receipts existed."""

from __future__ import annotations

import hashlib
import sqlite3
import time
from pathlib import Path

import pytest

from agent.gateway.spool import Spool
from tests.sqlite_files import checkpointed_bytes, without_secure_delete


def _sha(payload: bytes) -> str:
    return hashlib.sha256(payload).hexdigest()


def test_a_puback_makes_a_row_await_its_receipt_and_the_receipt_deletes_it(
        tmp_path: Path) -> None:
    spool = Spool(tmp_path / "s.sqlite", max_bytes=10**6)
    a, b = spool.put("1.1", b"aaaa"), spool.put("1.2", b"bb")
    assert (spool.count, spool.queued, spool.size) == (2, 2, 6)
    spool.acked(a, 60)
    assert (spool.count, spool.queued) == (2, 1)
    assert [r.id for r in spool.oldest(set(), 10)] == [b]  # awaiting rows are not drained
    assert spool.confirmed(_sha(b"zz")) == 0
    assert spool.confirmed(_sha(b"aaaa")) == 1
    assert (spool.count, spool.queued, spool.size) == (1, 1, 2)
    spool.acked(a, 60)  # a late PUBACK of a row already confirmed: nothing comes back
    assert spool.count == 1
    spool.close()


def test_one_receipt_deletes_every_row_of_its_digest_only(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "s.sqlite", max_bytes=10**6)
    for uid, payload in [("1", b"same"), ("2", b"same"), ("3", b"other")]:
        spool.put(uid, payload)
    assert spool.confirmed(_sha(b"same")) == 2
    assert [r.sop_uid for r in spool.oldest(set(), 10)] == ["3"]
    spool.close()


def test_overdue_rows_are_queued_again_and_the_wait_doubles(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "s.sqlite", max_bytes=10**6)
    row = spool.put("1", b"x")
    t0 = time.time()
    spool.acked(row, 100)  # try 1: due after 100 s
    assert spool.requeue_overdue(t0 + 90) == 0
    assert spool.requeue_overdue(t0 + 110) == 1 and spool.queued == 1
    spool.acked(row, 100)  # try 2: due after 200 s
    t1 = time.time()
    assert spool.requeue_overdue(t1 + 190) == 0
    assert spool.requeue_overdue(t1 + 210) == 1
    assert spool.oldest(set(), 1)[0].tries == 2
    spool.acked(row, 100)
    assert spool.requeue_all() == 1 and spool.queued == 1
    spool.close()


def test_rows_survive_a_reopen_in_their_state(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite"
    spool = Spool(path, max_bytes=10**6)
    spool.acked(spool.put("1", b"kept"), 60)
    spool.put("2", b"queued")
    spool.close()
    again = Spool(path, max_bytes=10**6)
    assert (again.count, again.queued, again.size) == (2, 1, 10)
    assert again.confirmed(_sha(b"kept")) == 1
    again.close()


def test_a_spool_of_an_older_gateway_is_migrated(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite"
    db = sqlite3.connect(path)
    db.executescript("CREATE TABLE spool (id INTEGER PRIMARY KEY AUTOINCREMENT, "
                     "received_at REAL NOT NULL, sop_uid TEXT NOT NULL, payload BLOB NOT NULL);")
    db.execute("INSERT INTO spool(received_at, sop_uid, payload) VALUES (1, '1.9', x'0102')")
    db.commit()
    db.close()
    spool = Spool(path, max_bytes=10**6)
    assert (spool.count, spool.queued) == (1, 1)
    assert spool.oldest(set(), 1)[0].tries == 0
    assert spool.confirmed(_sha(b"\x01\x02")) == 1 and spool.count == 0
    spool.close()


def test_a_delivered_instance_s_phi_is_overwritten_in_the_file(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Even where SQLite is built without secure_delete (every connection starts with it
    off here), a delivered row's pages are zeroed; the row still queued stays whole."""
    without_secure_delete(monkeypatch)
    db = tmp_path / "s.sqlite"
    spool = Spool(db, max_bytes=10**6)
    # At the end of a 10 KB payload: in its overflow pages, which a delete frees whole.
    sent = spool.put("1.1", bytes(range(256)) * 40 + b"DOE^JANE^SENT")
    spool.put("1.2", bytes(range(256)) * 40 + b"ROE^RICHARD^QUEUED")
    spool.delivered(sent)
    spool.close()
    on_disk = checkpointed_bytes(db)
    assert b"DOE^JANE^SENT" not in on_disk and b"ROE^RICHARD^QUEUED" in on_disk
