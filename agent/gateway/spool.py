"""The gateway's durable spool: instances that the edge broker has not acknowledged yet.

One SQLite database (WAL, ``synchronous=FULL``): ``put`` returns only once the row is on
disk, so a C-STORE answered after it survives a crash or SIGKILL of the gateway. A row is
deleted only when the broker has acknowledged its publish (``delivered``).
"""

from __future__ import annotations

import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from agent.errors import AgentError

SCHEMA = """
CREATE TABLE IF NOT EXISTS spool (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    received_at REAL    NOT NULL,
    sop_uid     TEXT    NOT NULL,
    payload     BLOB    NOT NULL
);
"""


class SpoolFull(AgentError):
    """The spool has reached its byte cap."""


@dataclass(frozen=True)
class Spooled:
    id: int
    sop_uid: str
    payload: bytes


class Spool:
    """Thread-safe: one connection behind a lock (the SCP's handler threads and the
    drainer write to it)."""

    def __init__(self, path: Path, *, max_bytes: int) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")  # on disk before C-STORE success
        self._db.execute("PRAGMA busy_timeout=5000")
        self._db.executescript(SCHEMA)
        with self._lock:
            row = self._db.execute(
                "SELECT COALESCE(SUM(LENGTH(payload)),0), COUNT(*) FROM spool").fetchone()
        self._bytes, self._count = int(row[0]), int(row[1])

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def put(self, sop_uid: str, payload: bytes) -> int:
        """Commit one instance; its row id. Raises SpoolFull at the cap."""
        with self._lock:
            if self._bytes + len(payload) > self.max_bytes:
                raise SpoolFull(f"the gateway's spool holds {self._bytes} bytes "
                                f"(cap {self.max_bytes})")
            cur = self._db.execute(
                "INSERT INTO spool(received_at, sop_uid, payload) VALUES (?,?,?)",
                (time.time(), sop_uid, payload))
            self._bytes += len(payload)
            self._count += 1
            return int(cur.lastrowid or 0)

    def oldest(self, exclude: set[int], limit: int) -> list[Spooled]:
        """The oldest rows whose ids are not in ``exclude`` (those in flight)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT id, sop_uid, payload FROM spool ORDER BY id LIMIT ?",
                (limit + len(exclude),)).fetchall()
        return [Spooled(int(r[0]), str(r[1]), bytes(r[2]))
                for r in rows if int(r[0]) not in exclude][:limit]

    def delivered(self, row_id: int) -> None:
        """The broker acknowledged this row's publish: delete it."""
        with self._lock:
            row = self._db.execute(
                "SELECT LENGTH(payload) FROM spool WHERE id=?", (row_id,)).fetchone()
            if row is None:
                return
            self._db.execute("DELETE FROM spool WHERE id=?", (row_id,))
            self._bytes -= int(row[0])
            self._count -= 1

    @property
    def count(self) -> int:
        return self._count

    @property
    def size(self) -> int:
        return self._bytes
