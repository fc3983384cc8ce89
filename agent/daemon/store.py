"""Durable inbox and outbox in one SQLite database (WAL).

* A scan is acked upstream only after ``Store.accept`` has committed its inbox row with
  ``synchronous=FULL``.
* ``Store.complete`` writes the result to the outbox and marks the inbox row done in one
  transaction, so a crash leaves either the scan pending or the result queued, never neither.
* Two writes are not synced by themselves (``_unsynced``), as losing them to a power cut
  means a duplicate, never a loss: the completion of an inbox row (the row's insert was
  synced, so the scan is pending again and its result is sent again) and the delete of an
  outbox row once the cloud broker acked it or, with ``delivery.receipts = true``, once the
  consumer's receipt named it (the result is sent again). The consumer drops a duplicate by
  its idempotency key. That leaves one fsync per scan, the insert's (milliseconds on an SD
  card). Every write before an ack is synced, and so is every write before a publish that
  nothing could bring back (an error report without an inbox row).
* Inbox payloads carry PHI: ``secure_delete`` is on, so the pages a done scan frees are
  zeroed (in the database file at the next checkpoint), whatever SQLite's build default.
  An outbox row is sealed ciphertext or a PHI-free error report: its delete skips that.
* The disk: below ``min_free_bytes`` free on the store's filesystem ``accept`` refuses
  (``DiskFull``) so that commits and deletes still find room; SQLite's own "disk is full"
  becomes ``DiskFull`` too, its transaction rolled back (the caller retries later).
* For a 2.5D model a processed scan may still be a neighbour of scans to come: it is
  completed as ``held`` (payload kept) and ``release``d when its series is closed.
"""

from __future__ import annotations

import shutil
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path

from agent.daemon.store_rows import SCHEMA, DiskFull, InboxItem, OutboxItem, StoreFull
from agent.daemon.store_rows import disk_full as _disk_full

__all__ = ["DiskFull", "InboxItem", "OutboxItem", "Store", "StoreFull"]

class Store:
    """Inbox + outbox. Thread-safe: one connection guarded by a lock (writes are short)."""

    def __init__(self, path: Path, *, inbox_max_bytes: int, outbox_max_bytes: int,
                 min_free_bytes: int = 0) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.min_free_bytes = min_free_bytes
        self.inbox_max_bytes = inbox_max_bytes
        self.outbox_max_bytes = outbox_max_bytes
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        # FULL: a commit is on disk before we ack upstream or delete downstream.
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA secure_delete=ON")  # freed inbox pages held PHI
        self._db.execute("PRAGMA busy_timeout=5000")
        self._db.executescript(SCHEMA)
        self._inbox_bytes = self._sum(
            "SELECT COALESCE(SUM(LENGTH(payload)),0) FROM inbox WHERE state IN ('pending','held')"
        )
        self._outbox_bytes = self._sum("SELECT COALESCE(SUM(LENGTH(payload)),0) FROM outbox")
        # Done rows are kept only until the next start; they are not needed after the ack.
        with self._lock:
            self._db.execute("DELETE FROM inbox WHERE state='done'")

    def _sum(self, sql: str) -> int:
        with self._lock:
            return int(self._db.execute(sql).fetchone()[0])

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def free_disk_bytes(self) -> int:
        """Bytes free on the store's filesystem (for unprivileged writers)."""
        return int(shutil.disk_usage(self.path.parent).free)

    def _rollback(self) -> None:
        if self._db.in_transaction:  # SQLite may have rolled back already (disk full)
            self._db.execute("ROLLBACK")

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        """One write transaction (the caller holds ``_lock``): committed at the end, rolled
        back on any error; a full filesystem raises DiskFull (backpressure, not a crash)."""
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
            self._db.execute("COMMIT")
        except sqlite3.OperationalError as exc:
            self._rollback()
            if _disk_full(exc):
                raise DiskFull("the state directory's filesystem is full") from None
            raise
        except BaseException:
            self._rollback()
            raise

    @contextmanager
    def _unsynced(self, *, zeroing: bool) -> Iterator[None]:
        """Writes whose loss means work done again or a duplicate, never a loss: they
        commit without waiting for the disk (``synchronous=NORMAL``; in WAL mode still
        atomic and consistent, durable once a later synced commit or checkpoint has run,
        and lost, if at all, only after every earlier write: the log is replayed in order).
        ``zeroing``: the write frees inbox pages (PHI), which stay zeroed; deletes of outbox
        rows (ciphertext) skip that. The caller holds ``_lock``."""
        self._db.execute("PRAGMA synchronous=NORMAL")
        if not zeroing:
            self._db.execute("PRAGMA secure_delete=OFF")
        try:
            yield
        finally:
            if not zeroing:
                self._db.execute("PRAGMA secure_delete=ON")
            self._db.execute("PRAGMA synchronous=FULL")

    def pragma(self, name: str) -> int:
        """The connection's ``synchronous`` (2 = FULL) or ``secure_delete`` between writes."""
        assert name in ("synchronous", "secure_delete")
        with self._lock:
            return int(self._db.execute(f"PRAGMA {name}").fetchone()[0])

    # -- inbox ---------------------------------------------------------------------------
    def accept(self, topic: str, sha256: str, payload: bytes) -> int:
        """Persist a received scan; return its row id. Raises StoreFull at the cap."""
        ids, refused = self.accept_many([(topic, sha256, payload)])
        if refused is not None:
            raise refused
        return ids[0]

    def accept_many(self, scans: list[tuple[str, str, bytes]]
                    ) -> tuple[list[int], StoreFull | None]:
        """Persist received scans (topic, sha256, payload) in order, in one synced
        transaction: one fsync for them all. Stops at the first that does not fit; returns
        the ids of those stored and why the next was not (None when all were)."""
        ids: list[int] = []
        refused: StoreFull | None = None
        with self._lock:
            added = 0
            free = self.free_disk_bytes()
            try:
                with self._transaction():
                    for topic, sha256, payload in scans:
                        if self._inbox_bytes + added + len(payload) > self.inbox_max_bytes:
                            refused = StoreFull(f"inbox holds {self._inbox_bytes + added} "
                                                f"bytes (cap {self.inbox_max_bytes})")
                            break
                        if free - added - len(payload) < self.min_free_bytes:
                            refused = DiskFull(
                                f"{free - added} bytes free on the state directory's "
                                f"filesystem, storage.min_free_disk_bytes {self.min_free_bytes}")
                            break
                        cur = self._db.execute(
                            "INSERT INTO inbox(received_at, topic, sha256, payload) "
                            "VALUES (?,?,?,?)", (time.time(), topic, sha256, payload))
                        ids.append(int(cur.lastrowid or 0))
                        added += len(payload)
            except DiskFull as exc:  # SQLite's own: rolled back, nothing stored
                return [], exc
            self._inbox_bytes += added
        return ids, refused

    def _rows(self, state: str, after_id: int, limit: int) -> list[InboxItem]:
        with self._lock:
            rows = self._db.execute(
                "SELECT id, topic, sha256, payload, received_at FROM inbox "
                "WHERE state=? AND id>? ORDER BY id LIMIT ?", (state, after_id, limit)).fetchall()
        return [InboxItem(*r) for r in rows]

    def pending(self, after_id: int = 0, limit: int = 16) -> list[InboxItem]:
        """Pending inbox rows in arrival order."""
        return self._rows("pending", after_id, limit)

    def held(self, after_id: int = 0, limit: int = 16) -> list[InboxItem]:
        """Held inbox rows (processed, kept as neighbours for a 2.5D model) in id order."""
        return self._rows("held", after_id, limit)

    def payload(self, inbox_id: int) -> bytes | None:
        """The payload of a pending or held row (None when it is gone)."""
        with self._lock:
            row = self._db.execute("SELECT payload FROM inbox WHERE id=? AND state IN "
                                   "('pending','held')", (inbox_id,)).fetchone()
        return None if row is None else bytes(row[0])

    def release(self, inbox_ids: list[int]) -> None:
        """Held rows that no scan needs any more: drop their payloads (one transaction)."""
        with self._lock:
            with self._transaction():
                freed = 0
                for inbox_id in inbox_ids:
                    row = self._db.execute(
                        "SELECT LENGTH(payload) FROM inbox WHERE id=? AND state='held'",
                        (inbox_id,),
                    ).fetchone()
                    if row is None:
                        continue
                    self._db.execute(
                        "UPDATE inbox SET state='done', payload=x'' WHERE id=?", (inbox_id,)
                    )
                    freed += int(row[0])
            self._inbox_bytes -= freed

    def release_held(self) -> int:
        """Release every held row (the model no longer needs neighbours); returns how many."""
        with self._lock:
            with self._transaction():
                freed, count = self._db.execute(
                    "SELECT COALESCE(SUM(LENGTH(payload)),0), COUNT(*) FROM inbox "
                    "WHERE state='held'").fetchone()
                self._db.execute("UPDATE inbox SET state='done', payload=x'' WHERE state='held'")
            self._inbox_bytes -= int(freed)
            return int(count)

    def complete(
        self,
        inbox_id: int | None,
        outputs: list[tuple[str, str, str, bytes]],
        counter: str,
        *,
        hold: bool = False,
    ) -> list[int]:
        """Mark an inbox row done (if any) and queue ``outputs`` (kind, message_id, topic,
        payload) in one transaction; bump ``counter``. ``hold``: keep the payload (state
        ``held``) until ``release``. Returns the new outbox ids. Synced only without an
        inbox row (see the module's docstring): with one, a lost commit leaves it pending."""
        size = sum(len(o[3]) for o in outputs)
        with self._lock:
            ids: list[int] = []
            durable = nullcontext() if inbox_id is None else self._unsynced(zeroing=True)
            with durable, self._transaction():
                for kind, message_id, topic, payload in outputs:
                    cur = self._db.execute(
                        "INSERT INTO outbox(created_at, kind, message_id, topic, payload) "
                        "VALUES (?,?,?,?,?)",
                        (time.time(), kind, message_id, topic, payload),
                    )
                    ids.append(int(cur.lastrowid or 0))
                row = self._db.execute(
                    "SELECT LENGTH(payload) FROM inbox WHERE id=? AND state='pending'",
                    (inbox_id,),
                ).fetchone()
                if hold:
                    self._db.execute("UPDATE inbox SET state='held' WHERE id=? AND "
                                     "state='pending'", (inbox_id,))
                    row = None  # the payload stays: its bytes still count
                else:
                    self._db.execute("UPDATE inbox SET state='done', payload=x'' WHERE id=?",
                                     (inbox_id,))
                self._db.execute("INSERT INTO counters(name, value) VALUES (?, 1) "
                                 "ON CONFLICT(name) DO UPDATE SET value=value+1", (counter,))
            if row is not None:
                self._inbox_bytes -= int(row[0])
            self._outbox_bytes += size
            return ids

    # -- outbox --------------------------------------------------------------------------
    def outbox_full(self) -> bool:
        return self._outbox_bytes >= self.outbox_max_bytes

    def outbox(self, after_id: int = 0, limit: int = 64) -> list[OutboxItem]:
        with self._lock:
            rows = self._db.execute(
                "SELECT id, kind, message_id, topic, payload FROM outbox WHERE id>? "
                "ORDER BY id LIMIT ?",
                (after_id, limit),
            ).fetchall()
        return [OutboxItem(*r) for r in rows]

    def outbox_rows(self, ids: list[int]) -> list[OutboxItem]:
        """The outbox rows with these ids that still exist, in id order."""
        with self._lock:
            rows = [self._db.execute(
                "SELECT id, kind, message_id, topic, payload FROM outbox WHERE id=?", (i,)
            ).fetchone() for i in sorted(set(ids))]
        return [OutboxItem(*r) for r in rows if r is not None]

    def delivered(self, outbox_id: int) -> None:
        """The next hop acknowledged this row: delete it."""
        with self._lock:
            row = self._db.execute(
                "SELECT LENGTH(payload) FROM outbox WHERE id=?", (outbox_id,)
            ).fetchone()
            if row is None:
                return
            try:
                with self._unsynced(zeroing=False):
                    self._db.execute("DELETE FROM outbox WHERE id=?", (outbox_id,))
            except sqlite3.OperationalError as exc:
                if _disk_full(exc):
                    raise DiskFull("the state directory's filesystem is full") from None
                raise
            self._outbox_bytes -= int(row[0])

    def receipted(self, message_id: str) -> list[int]:
        """The consumer has filed ``message_id``: delete every row that carries it (a scan
        sent twice queues two); returns their ids."""
        with self._lock:
            with self._unsynced(zeroing=False), self._transaction():
                rows = self._db.execute(
                    "SELECT id, LENGTH(payload) FROM outbox WHERE message_id=?", (message_id,)
                ).fetchall()
                self._db.execute("DELETE FROM outbox WHERE message_id=?", (message_id,))
            self._outbox_bytes -= sum(int(r[1]) for r in rows)
        return [int(r[0]) for r in rows]

    def drop_oldest(self, report: Callable[[OutboxItem], tuple[str, str, str, bytes]]
                    ) -> list[OutboxItem]:
        """The outbox is at its cap (``storage.outbox_full = "drop_oldest"``): delete the
        oldest result rows until it is below, each replaced by the row ``report`` makes
        for it (an error report), in one transaction. Returns the dropped rows."""
        dropped: list[OutboxItem] = []
        with self._lock:
            with self._transaction():
                freed = added = 0
                after = 0
                while self._outbox_bytes - freed + added >= self.outbox_max_bytes:
                    r = self._db.execute(
                        "SELECT id, kind, message_id, topic, payload FROM outbox "
                        "WHERE kind='result' AND id>? ORDER BY id LIMIT 1", (after,)).fetchone()
                    if r is None:
                        break
                    item = OutboxItem(*r)
                    after = item.id
                    self._db.execute("DELETE FROM outbox WHERE id=?", (item.id,))
                    kind, message_id, topic, payload = report(item)
                    self._db.execute(
                        "INSERT INTO outbox(created_at, kind, message_id, topic, payload) "
                        "VALUES (?,?,?,?,?)", (time.time(), kind, message_id, topic, payload))
                    freed += len(item.payload)
                    added += len(payload)
                    dropped.append(item)
            self._outbox_bytes += added - freed
        return dropped

    # -- status --------------------------------------------------------------------------
    def held_count(self) -> int:
        """Processed rows kept as neighbours for a 2.5D model."""
        with self._lock:
            return int(self._db.execute(
                "SELECT COUNT(*) FROM inbox WHERE state='held'").fetchone()[0])

    def depths(self) -> tuple[int, int]:
        """(pending inbox rows, outbox rows)."""
        with self._lock:
            return self._depths()

    def _depths(self) -> tuple[int, int]:
        inbox = self._db.execute("SELECT COUNT(*) FROM inbox WHERE state='pending'").fetchone()[0]
        outbox = self._db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0]
        return int(inbox), int(outbox)

    def counters(self) -> dict[str, int]:
        with self._lock:
            return self._counters()

    def _counters(self) -> dict[str, int]:
        return {str(k): int(v) for k, v in self._db.execute("SELECT name, value FROM counters")}

    def snapshot(self) -> tuple[int, int, dict[str, int]]:
        """``depths()`` and ``counters()`` read together: a commit between two reads would
        count its scan both as pending and as processed in one status message."""
        with self._lock:
            return (*self._depths(), self._counters())
