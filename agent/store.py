"""Durable inbox and outbox in one SQLite database (WAL).

* A scan is acked upstream only after ``Store.accept`` has committed its inbox row with
  ``synchronous=FULL``.
* ``Store.complete`` writes the result to the outbox and marks the inbox row done in one
  transaction, so a crash leaves either the scan pending or the result queued, never neither.
* An outbox row is deleted only when the cloud broker has acknowledged it.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

SCHEMA = """
CREATE TABLE IF NOT EXISTS inbox (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    received_at REAL    NOT NULL,
    topic       TEXT    NOT NULL,
    sha256      TEXT    NOT NULL,
    payload     BLOB    NOT NULL,
    state       TEXT    NOT NULL DEFAULT 'pending'  -- pending | done
);
CREATE INDEX IF NOT EXISTS inbox_pending ON inbox(state, id);
CREATE TABLE IF NOT EXISTS outbox (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    created_at  REAL    NOT NULL,
    kind        TEXT    NOT NULL,                -- result | error
    message_id  TEXT    NOT NULL,
    topic       TEXT    NOT NULL,
    payload     BLOB    NOT NULL
);
CREATE TABLE IF NOT EXISTS counters (
    name  TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
"""


class StoreFull(Exception):
    """The inbox or outbox has reached its byte cap."""


@dataclass(frozen=True)
class InboxItem:
    id: int
    topic: str
    sha256: str
    payload: bytes
    received_at: float


@dataclass(frozen=True)
class OutboxItem:
    id: int
    kind: str
    message_id: str
    topic: str
    payload: bytes


class Store:
    """Inbox + outbox. Thread-safe: one connection guarded by a lock (writes are short)."""

    def __init__(self, path: Path, *, inbox_max_bytes: int, outbox_max_bytes: int) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.inbox_max_bytes = inbox_max_bytes
        self.outbox_max_bytes = outbox_max_bytes
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        # FULL: a commit is on disk before we ack upstream or delete downstream.
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA busy_timeout=5000")
        self._db.executescript(SCHEMA)
        self._inbox_bytes = self._sum(
            "SELECT COALESCE(SUM(LENGTH(payload)),0) FROM inbox WHERE state='pending'"
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

    # -- inbox ---------------------------------------------------------------------------
    def accept(self, topic: str, sha256: str, payload: bytes) -> int:
        """Persist a received scan; return its row id. Raises StoreFull at the cap."""
        with self._lock:
            if self._inbox_bytes + len(payload) > self.inbox_max_bytes:
                raise StoreFull(
                    f"inbox holds {self._inbox_bytes} bytes (cap {self.inbox_max_bytes})"
                )
            cur = self._db.execute(
                "INSERT INTO inbox(received_at, topic, sha256, payload) VALUES (?,?,?,?)",
                (time.time(), topic, sha256, payload),
            )
            self._inbox_bytes += len(payload)
            return int(cur.lastrowid or 0)

    def pending(self, after_id: int = 0, limit: int = 16) -> list[InboxItem]:
        """Pending inbox rows in arrival order."""
        with self._lock:
            rows = self._db.execute(
                "SELECT id, topic, sha256, payload, received_at FROM inbox "
                "WHERE state='pending' AND id>? ORDER BY id LIMIT ?",
                (after_id, limit),
            ).fetchall()
        return [InboxItem(*r) for r in rows]

    def complete(
        self, inbox_id: int | None, outputs: list[tuple[str, str, str, bytes]], counter: str
    ) -> list[int]:
        """Mark an inbox row done (if any) and queue ``outputs`` (kind, message_id, topic,
        payload) in one transaction; bump ``counter``. Returns the new outbox ids."""
        size = sum(len(o[3]) for o in outputs)
        with self._lock:
            ids: list[int] = []
            self._db.execute("BEGIN IMMEDIATE")
            try:
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
                self._db.execute(
                    "UPDATE inbox SET state='done', payload=x'' WHERE id=?", (inbox_id,)
                )
                self._db.execute(
                    "INSERT INTO counters(name, value) VALUES (?, 1) "
                    "ON CONFLICT(name) DO UPDATE SET value=value+1",
                    (counter,),
                )
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
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

    def delivered(self, outbox_id: int) -> None:
        """The next hop acknowledged this row: delete it."""
        with self._lock:
            row = self._db.execute(
                "SELECT LENGTH(payload) FROM outbox WHERE id=?", (outbox_id,)
            ).fetchone()
            if row is None:
                return
            self._db.execute("DELETE FROM outbox WHERE id=?", (outbox_id,))
            self._outbox_bytes -= int(row[0])

    # -- status --------------------------------------------------------------------------
    def depths(self) -> tuple[int, int]:
        """(pending inbox rows, outbox rows)."""
        with self._lock:
            inbox = self._db.execute(
                "SELECT COUNT(*) FROM inbox WHERE state='pending'"
            ).fetchone()[0]
            outbox = self._db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0]
        return int(inbox), int(outbox)

    def counters(self) -> dict[str, int]:
        with self._lock:
            return {str(k): int(v) for k, v in self._db.execute("SELECT name, value FROM counters")}
