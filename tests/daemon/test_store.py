"""Tests for agent.store: the durable inbox/outbox in a real SQLite file."""

from __future__ import annotations

import hashlib
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.daemon.store import DiskFull, InboxItem, OutboxItem, Store, StoreFull
from tests.sqlite_files import checkpointed_bytes, without_secure_delete

MIB = 1024 * 1024


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _open(path: Path, inbox: int = MIB, outbox: int = MIB) -> Store:
    return Store(path, inbox_max_bytes=inbox, outbox_max_bytes=outbox)


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "state" / "agent.db"  # the parent is created by Store


@pytest.fixture
def store(db: Path) -> Iterator[Store]:
    s = _open(db)
    yield s
    s.close()


def _rows(path: Path, sql: str) -> list[tuple[object, ...]]:
    """Read the file through a separate connection, as another process would."""
    con = sqlite3.connect(path)
    try:
        return list(con.execute(sql).fetchall())
    finally:
        con.close()


def test_file_uses_wal(store: Store, db: Path) -> None:
    assert db.is_file()
    assert _rows(db, "PRAGMA journal_mode") == [("wal",)]


def test_accept_pending_complete_delivered(store: Store, db: Path) -> None:
    payload = b"DICM" * 100
    inbox_id = store.accept("iomt/s/scans/gw", _sha(payload), payload)
    assert inbox_id > 0
    assert store.depths() == (1, 0)
    [item] = store.pending()
    assert item == InboxItem(inbox_id, "iomt/s/scans/gw", _sha(payload), payload,
                             item.received_at)
    assert item.received_at > 0

    ids = store.complete(
        inbox_id,
        [("result", "m-1", "iomt/s/d/results", b"sealed-1"),
         ("error", "m-2", "iomt/s/d/errors", b'{"reason":"x"}')],
        "processed",
    )
    assert len(ids) == 2 and ids[0] < ids[1]
    assert store.pending() == []
    assert store.depths() == (0, 2)
    assert store.outbox() == [
        OutboxItem(ids[0], "result", "m-1", "iomt/s/d/results", b"sealed-1"),
        OutboxItem(ids[1], "error", "m-2", "iomt/s/d/errors", b'{"reason":"x"}'),
    ]
    assert store.counters() == {"processed": 1}
    # The inbox row is marked done and its payload dropped at once.
    assert _rows(db, "SELECT state, LENGTH(payload) FROM inbox") == [("done", 0)]

    store.delivered(ids[0])
    assert [o.id for o in store.outbox()] == [ids[1]]
    store.delivered(ids[0])  # a second PUBACK for the same row is harmless
    store.delivered(999_999)
    store.delivered(ids[1])
    assert store.outbox() == [] and store.depths() == (0, 0)


def test_counters_accumulate(store: Store) -> None:
    for i in range(3):
        rid = store.accept("t", "s", bytes([i]))
        store.complete(rid, [("result", f"m{i}", "r", b"x")], "processed")
    rid = store.accept("t", "s", b"bad")
    store.complete(rid, [("error", "e", "err", b"{}")], "failed")
    assert store.counters() == {"processed": 3, "failed": 1}


def test_complete_without_inbox_row(store: Store) -> None:
    """An error found before the scan was stored (e.g. oversized) goes straight out."""
    kept = store.accept("t", "s", b"keep me")
    ids = store.complete(None, [("error", "e-1", "iomt/s/d/errors", b'{"v":1}')], "failed")
    assert [o.message_id for o in store.outbox()] == ["e-1"] and len(ids) == 1
    assert [p.id for p in store.pending()] == [kept]  # untouched
    assert store.counters() == {"failed": 1}
    assert store.depths() == (1, 1)


def test_complete_is_atomic(store: Store, db: Path) -> None:
    """A failure half way leaves no outbox row, the scan pending and no counter bump."""
    rid = store.accept("t", "s", b"scan")
    bad = [("result", "m-1", "r", b"ok"), (None, "m-2", "r", b"no")]  # kind NOT NULL fails
    with pytest.raises(sqlite3.IntegrityError):
        store.complete(rid, bad, "processed")  # type: ignore[arg-type]
    assert store.outbox() == []
    assert [p.id for p in store.pending()] == [rid]
    assert store.counters() == {}
    assert _rows(db, "SELECT COUNT(*) FROM outbox") == [(0,)]
    # The store is still usable and its byte accounting was not disturbed.
    assert not store.outbox_full()
    store.complete(rid, [("result", "m-1", "r", b"ok")], "processed")
    assert store.depths() == (0, 1)


def test_pending_order_after_id_and_limit(store: Store) -> None:
    ids = [store.accept("t", str(i), f"p{i}".encode()) for i in range(5)]
    assert [p.id for p in store.pending()] == ids
    assert [p.id for p in store.pending(limit=2)] == ids[:2]
    assert [p.id for p in store.pending(after_id=ids[1], limit=2)] == ids[2:4]
    store.complete(ids[2], [], "processed")
    assert [p.id for p in store.pending(after_id=ids[1])] == [ids[3], ids[4]]


def test_outbox_order_after_id_and_limit(store: Store) -> None:
    ids = store.complete(None, [("result", f"m{i}", "r", b"x") for i in range(4)], "n")
    assert [o.id for o in store.outbox(after_id=ids[0], limit=2)] == ids[1:3]


def test_inbox_cap_raises_store_full(db: Path) -> None:
    store = _open(db, inbox=MIB)
    try:
        half = bytes(MIB // 2)
        first = store.accept("t", "a", half)
        store.accept("t", "b", half)  # exactly at the cap: allowed
        with pytest.raises(StoreFull, match="inbox"):
            store.accept("t", "c", b"x")
        assert store.depths() == (2, 0)  # the refused scan was not stored
        store.complete(first, [("result", "m", "r", b"tiny")], "processed")
        store.accept("t", "c", b"x" * 1000)  # the completed scan freed its bytes
        with pytest.raises(StoreFull):
            store.accept("t", "d", bytes(MIB // 2))
    finally:
        store.close()


def test_outbox_cap(db: Path) -> None:
    store = _open(db, outbox=MIB)
    try:
        ids = store.complete(None, [("result", "m1", "r", bytes(MIB - 10))], "processed")
        assert not store.outbox_full()
        more = store.complete(None, [("result", "m2", "r", bytes(10))], "processed")
        assert store.outbox_full()
        store.delivered(ids[0])
        assert not store.outbox_full()
        store.delivered(more[0])
    finally:
        store.close()


def test_data_survives_reopen(db: Path) -> None:
    store = _open(db)
    done_id = store.accept("t", "s0", b"done scan")
    pending_id = store.accept("t", "s1", b"pending scan")
    out = store.complete(done_id, [("result", "m-1", "iomt/s/d/results", b"sealed")],
                         "processed")
    store.close()
    assert _rows(db, "SELECT id, state FROM inbox ORDER BY id") == [
        (done_id, "done"), (pending_id, "pending")]

    store = _open(db)
    try:
        [item] = store.pending()
        assert (item.id, item.sha256, item.payload) == (pending_id, "s1", b"pending scan")
        assert store.outbox() == [OutboxItem(out[0], "result", "m-1", "iomt/s/d/results",
                                             b"sealed")]
        assert store.counters() == {"processed": 1}
        assert store.depths() == (1, 1)
        # Done rows are purged on start; new ids never reuse old ones.
        assert _rows(db, "SELECT id FROM inbox") == [(pending_id,)]
        assert store.accept("t", "s2", b"new") > pending_id
    finally:
        store.close()


def test_byte_accounting_survives_reopen(db: Path) -> None:
    store = _open(db, inbox=MIB, outbox=MIB)
    store.accept("t", "a", bytes(MIB - 100))
    store.complete(None, [("result", "m", "r", bytes(MIB))], "processed")
    store.close()
    store = _open(db, inbox=MIB, outbox=MIB)
    try:
        assert store.outbox_full()
        with pytest.raises(StoreFull):
            store.accept("t", "b", bytes(200))
        store.accept("t", "c", bytes(100))
    finally:
        store.close()


def test_concurrent_accept_and_complete(store: Store) -> None:
    """One connection shared by threads: every row lands exactly once."""
    errors: list[BaseException] = []

    def worker(n: int) -> None:
        try:
            for i in range(25):
                rid = store.accept("t", f"{n}-{i}", f"{n}-{i}".encode())
                store.complete(rid, [("result", f"{n}-{i}", "r", b"x")], "processed")
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors
    assert store.depths() == (0, 100)
    assert store.counters() == {"processed": 100}
    assert len({o.message_id for o in store.outbox(limit=1000)}) == 100


def test_a_puback_deletes_its_own_row_only(store: Store) -> None:
    """A PUBACK for a later row says nothing about the earlier ones (they may be waiting
    for a retry): they stay, in order."""
    ids = [store.complete(None, [("result", f"m-{i}", "r", b"x" * 10)], "processed")[0]
           for i in range(4)]
    store.delivered(ids[2])
    assert [o.id for o in store.outbox()] == [ids[0], ids[1], ids[3]]
    store.delivered(ids[3])
    assert [o.id for o in store.outbox()] == [ids[0], ids[1]]


def test_deletes_of_delivered_rows_skip_the_sync(store: Store, db: Path) -> None:
    """A delivered row's delete commits without its own fsync; the connection is back to
    FULL for the writes after it (the inbox commit before an ack, an orphan report), and
    the delete is durable: another connection sees it, and it survives a reopen."""
    assert store.pragma("synchronous") == 2  # FULL
    a = store.complete(None, [("result", "m-a", "r", b"1")], "processed")[0]
    b = store.complete(None, [("result", "m-b", "r", b"2")], "processed")[0]
    store.delivered(a)
    assert store.pragma("synchronous") == 2
    store.receipted("m-b")
    assert store.pragma("synchronous") == 2
    store.accept("t", "s", b"p")
    assert _rows(db, "SELECT COUNT(*) FROM outbox") == [(0,)]
    store.close()
    again = _open(db)
    assert again.depths() == (1, 0) and b not in [o.id for o in again.outbox()]
    again.close()


def test_a_done_scan_s_phi_is_overwritten_in_the_file(
        db: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """secure_delete is on whatever SQLite's build default (Debian's is on; here every new
    connection starts with it off): the pages a done scan's payload freed are zeroed, so
    the patient's name is nowhere in the store's files."""
    without_secure_delete(monkeypatch)
    store = _open(db)
    phi = b"DOE^JANE^PHI-MARKER"
    payload = phi + bytes(range(256)) * 40 + phi  # in the row's page and its overflow pages
    rid = store.accept("t", _sha(payload), payload)
    store.complete(rid, [("result", "m-1", "r", b"sealed")], "processed")
    assert store.pragma("secure_delete") == 1
    store.close()
    assert phi not in checkpointed_bytes(db)


def test_without_secure_delete_the_same_payload_would_stay_in_the_file(tmp_path: Path) -> None:
    """What the test above guards against, on a bare connection."""
    db = tmp_path / "bare.db"
    con = sqlite3.connect(db, isolation_level=None)
    con.execute("PRAGMA journal_mode=WAL")
    con.execute("PRAGMA secure_delete=OFF")
    con.execute("CREATE TABLE inbox (id INTEGER PRIMARY KEY, payload BLOB)")
    con.execute("INSERT INTO inbox(payload) VALUES (?)",
                (b"DOE^JANE^PHI-MARKER" + bytes(range(256)) * 40,))
    con.execute("UPDATE inbox SET payload=x'' WHERE id=1")
    con.close()
    assert b"DOE^JANE^PHI-MARKER" in checkpointed_bytes(db)


def _commits(store: Store) -> list[str]:
    """The ``synchronous`` setting each of the store's following commits runs under, read
    from the statements its connection executes (SQLite's trace hook; the store has one
    connection)."""
    seen: list[str] = []
    mode = ["FULL"]

    def trace(sql: str) -> None:
        if sql.startswith("PRAGMA synchronous="):
            mode[0] = sql.split("=", 1)[1]
        elif sql == "COMMIT":
            seen.append(mode[0])

    store._db.set_trace_callback(trace)  # private: what reaches the disk is the point
    return seen


def test_a_scan_s_completion_skips_the_sync_and_an_orphan_report_does_not(store: Store) -> None:
    """Completing an inbox row commits without its own fsync (lost to a power cut, the row
    is pending again: processed again, never lost); an error report without an inbox row
    (nothing could bring it back) and every insert before an ack stay synced, and the
    completion still zeroes the payload's pages."""
    rid = store.accept("t", "s", b"p" * 5000)
    commits = _commits(store)
    store.complete(rid, [("result", "m-1", "r", b"sealed")], "processed")
    store.complete(None, [("error", "e-1", "errors", b"{}")], "failed")
    store.accept_many([("t", "s2", b"q"), ("t", "s3", b"r")])
    assert commits == ["NORMAL", "FULL", "FULL"]
    assert (store.pragma("synchronous"), store.pragma("secure_delete")) == (2, 1)
    store.close()
    again = _open(store.path)
    assert again.depths() == (2, 2) and again.counters() == {"processed": 1, "failed": 1}
    again.close()


def test_accept_many_stores_in_order_until_one_does_not_fit(db: Path) -> None:
    """One transaction for the batch; the first scan over the cap and every one after it
    are not stored (the caller holds them, in order), and the cap's error says why."""
    store = _open(db, inbox=10_000)
    commits = _commits(store)
    ids, refused = store.accept_many([("t", f"s{i}", bytes([i]) * 3000) for i in range(5)])
    assert len(ids) == 3 and commits == ["FULL"]
    assert isinstance(refused, StoreFull) and not isinstance(refused, DiskFull)
    assert "inbox holds 9000 bytes (cap 10000)" in str(refused)
    assert [r.payload[0] for r in store.pending()] == [0, 1, 2]
    assert store.accept_many([("t", "s9", b"x" * 1000)]) == ([ids[-1] + 1], None)  # fits
    store.close()


def test_accept_many_refuses_below_the_disk_floor_with_disk_full(db: Path) -> None:
    store = _open(db)
    store.min_free_bytes = store.free_disk_bytes() - 5000  # room for 5000 bytes more
    ids, refused = store.accept_many([("t", "a", b"a" * 3000), ("t", "b", b"b" * 3000)])
    assert len(ids) == 1 and isinstance(refused, DiskFull)
    assert "storage.min_free_disk_bytes" in str(refused)
    store.close()


def test_outbox_deletes_leave_the_connection_synced_and_zeroing(store: Store) -> None:
    a = store.complete(None, [("result", "m-a", "r", b"1")], "processed")[0]
    store.complete(None, [("result", "m-b", "r", b"2")], "processed")
    store.delivered(a)
    store.receipted("m-b")
    assert (store.pragma("synchronous"), store.pragma("secure_delete")) == (2, 1)


def test_a_receipt_deletes_the_rows_of_its_message_id_only(store: Store) -> None:
    a = store.complete(None, [("result", "m-a", "r", b"1")], "processed")[0]
    b1 = store.complete(None, [("result", "m-b", "r", b"22")], "processed")[0]
    c = store.complete(None, [("result", "m-c", "r", b"333")], "processed")[0]
    b2 = store.complete(None, [("result", "m-b", "r", b"22")], "processed")[0]  # sent twice
    assert store.receipted("m-b") == [b1, b2]
    assert [o.id for o in store.outbox()] == [a, c]
    assert store.receipted("m-b") == [] and store.receipted("unknown") == []
    store.receipted("m-a")
    store.receipted("m-c")
    assert store.depths() == (0, 0) and not store.outbox_full()


def test_a_crash_between_outbox_insert_and_inbox_done_leaves_neither(
        store: Store, db: Path) -> None:
    """The outbox insert and the inbox row's "done" are one commit: a failure at the last
    statement (a real SQLite trigger aborting the inbox UPDATE, as a crash there would)
    leaves the scan pending and no result queued; never the result queued twice on the
    next start, never the scan done without its result."""
    rid = store.accept("t", "s", b"scan")
    con = sqlite3.connect(db)
    con.execute("CREATE TRIGGER crash BEFORE UPDATE ON inbox "
                "BEGIN SELECT RAISE(ABORT, 'crash'); END")
    con.commit()
    con.close()
    with pytest.raises(sqlite3.IntegrityError):
        store.complete(rid, [("result", "m-1", "r", b"sealed")], "processed")
    assert _rows(db, "SELECT COUNT(*) FROM outbox") == [(0,)]
    assert _rows(db, "SELECT state FROM inbox") == [("pending",)]
    assert _rows(db, "SELECT COUNT(*) FROM counters") == [(0,)]


def test_payload_of_pending_and_held_rows_only(store: Store) -> None:
    a = store.accept("t", "s", b"scan-a")
    b = store.accept("t", "s", b"scan-b")
    assert store.payload(a) == b"scan-a"
    store.complete(a, [], "processed", hold=True)
    assert store.payload(a) == b"scan-a"  # held: still a neighbour
    store.complete(b, [], "processed")
    assert store.payload(b) is None and store.payload(999) is None
    store.release([a])
    assert store.payload(a) is None


def test_release_held_frees_its_bytes(db: Path) -> None:
    s = _open(db, inbox=MIB)
    try:
        rid = s.accept("t", "s", b"x" * (600 * 1024))
        s.complete(rid, [], "processed", hold=True)
        with pytest.raises(StoreFull):
            s.accept("t", "s", b"y" * (600 * 1024))  # the held payload still counts
        assert s.release_held() == 1 and s.held_count() == 0
        s.accept("t", "s", b"y" * (600 * 1024))  # its bytes are free again
        assert s.release_held() == 0
    finally:
        s.close()


def test_release_and_receipts_free_their_bytes(db: Path) -> None:
    s = _open(db, inbox=MIB, outbox=MIB)
    try:
        ids = [s.accept("t", "s", bytes([i]) * (300 * 1024)) for i in range(3)]
        for rid in ids:
            s.complete(rid, [], "processed", hold=True)
        with pytest.raises(StoreFull):
            s.accept("t", "s", b"x" * (300 * 1024))
        s.release([ids[0], 999, ids[1]])  # an unknown id is skipped, not the end
        s.accept("t", "s", b"x" * (300 * 1024))
        s.accept("t", "s", b"y" * (300 * 1024))  # both releases freed their bytes
        big = b"r" * (600 * 1024)
        s.complete(None, [("result", "m-1", "r", big)], "processed")
        s.complete(None, [("result", "m-2", "r", big)], "processed")
        assert s.outbox_full()
        s.receipted("m-1")
        assert not s.outbox_full()
        s.receipted("m-2")
        s.complete(None, [("result", "m-3", "r", big)], "processed")
        assert not s.outbox_full()  # 600 KiB of 1 MiB: both receipts freed theirs
    finally:
        s.close()


def test_a_failed_release_or_receipt_rolls_back_and_says_why(store: Store, db: Path) -> None:
    rid = store.accept("t", "s", b"scan")
    store.complete(rid, [("result", "m-1", "r", b"sealed")], "processed", hold=True)
    con = sqlite3.connect(db)
    con.executescript(
        "CREATE TRIGGER no_update BEFORE UPDATE ON inbox BEGIN SELECT RAISE(ABORT, 'x'); END;"
        "CREATE TRIGGER no_delete BEFORE DELETE ON outbox BEGIN SELECT RAISE(ABORT, 'x'); END;")
    con.close()
    for action in (lambda: store.release([rid]), store.release_held,
                   lambda: store.receipted("m-1")):
        with pytest.raises(sqlite3.IntegrityError):
            action()
    assert store.held_count() == 1 and store.depths() == (0, 1)


def test_sqlite_s_own_disk_full_is_disk_full_and_rolls_back(store: Store) -> None:
    """SQLITE_FULL (here from ``PRAGMA max_page_count`` on the store's connection, as a full
    filesystem would give it) becomes ``DiskFull`` with nothing half-written, for a plain
    insert and inside a transaction; once there is room again the store carries on."""
    rid = store.accept("t", _sha(b"a"), b"a" * 1000)
    pages = store._db.execute("PRAGMA page_count").fetchone()[0]
    store._db.execute(f"PRAGMA max_page_count={pages}")
    with pytest.raises(DiskFull) as full:
        store.accept("t", _sha(b"b"), b"b" * 200_000)
    assert str(full.value) == "the state directory's filesystem is full"
    with pytest.raises(DiskFull) as full:
        store.complete(rid, [("result", "m-1", "r", b"r" * 200_000)], "processed")
    assert str(full.value) == "the state directory's filesystem is full"
    assert not store._db.in_transaction
    assert store.depths() == (1, 0) and [r.id for r in store.pending()] == [rid]
    store._db.execute("PRAGMA max_page_count=1073741823")
    store.complete(rid, [("result", "m-1", "r", b"r" * 200_000)], "processed")
    assert store.depths() == (0, 1)


def test_other_sqlite_errors_are_not_disk_full(store: Store) -> None:
    store._db.execute("DROP TABLE counters")  # an OperationalError that is not SQLITE_FULL
    with pytest.raises(sqlite3.OperationalError, match="no such table"):
        store.complete(None, [("error", "m-2", "e", b"e")], "failed")
    assert store.depths() == (0, 0) and not store._db.in_transaction


def test_pending_and_held_default_to_the_first_16_rows(store: Store) -> None:
    ids = [store.accept("t", _sha(bytes([i])), bytes([i])) for i in range(17)]
    assert ids[0] == 1
    assert [r.id for r in store.pending()] == ids[:16]
    for rid in ids:
        store.complete(rid, [], "processed", hold=True)
    assert [r.id for r in store.held()] == ids[:16]


def test_release_frees_exactly_the_bytes_it_dropped(db: Path) -> None:
    s = _open(db, inbox=1000)
    try:
        rid = s.accept("t", _sha(b"a"), b"a" * 600)
        s.complete(rid, [], "processed", hold=True)
        s.release([rid])
        s.accept("t", _sha(b"b"), b"b" * 1000)  # the whole cap again: nothing left counted
        with pytest.raises(StoreFull):
            s.accept("t", _sha(b"c"), b"c")
    finally:
        s.close()
