"""The gateway's durable spool: instances not yet safe with the agent.

One SQLite database (WAL, ``synchronous=FULL``): ``put`` returns only once the row is on
disk, so a C-STORE answered after it survives a crash or SIGKILL of the gateway. With
``secure_delete`` on (whatever SQLite's build default) a deleted row's pages are zeroed:
the PHI of instances already safe with the agent does not stay in the file.

A row is *queued* (``due`` NULL: to be published) or *awaiting* the agent's ``accepted``
receipt (the broker PUBACKed it; ``due`` is when it goes out again unconfirmed). Without
``gateway.keep_until_accepted`` a row is deleted on the PUBACK (``delivered``); with it the
PUBACK only makes it awaiting (``acked``) and the receipt deletes it (``confirmed``).
``requeue_all`` (after a reconnect: the broker may have lost what it acked) and
``requeue_overdue`` turn awaiting rows back into queued ones. A spool written by a gateway
before these columns existed is migrated when it is opened.
"""

from __future__ import annotations

import hashlib
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from agent.errors import AgentError
from agent.transport.scan_receipts import resend_delay

SCHEMA = """
CREATE TABLE IF NOT EXISTS spool (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    received_at REAL    NOT NULL,
    sop_uid     TEXT    NOT NULL,
    sha256      TEXT,
    tries       INTEGER NOT NULL DEFAULT 0,
    due         REAL,
    payload     BLOB    NOT NULL
);
"""
# Added to a spool of an older gateway (ALTER TABLE appends them after the payload; the
# indexes keep them from being read through its overflow pages).
_COLUMNS = {"sha256": "TEXT", "tries": "INTEGER NOT NULL DEFAULT 0", "due": "REAL"}
_INDEXES = """
CREATE INDEX IF NOT EXISTS spool_due ON spool(due);
CREATE INDEX IF NOT EXISTS spool_sha256 ON spool(sha256);
"""


class SpoolFull(AgentError):
    """The spool has reached its byte cap."""


@dataclass(frozen=True)
class Spooled:
    id: int
    sop_uid: str
    payload: bytes
    tries: int = 0


class Spool:
    """Thread-safe: one connection behind a lock (the SCP's handler threads, the drainer
    and paho's thread write to it)."""

    def __init__(self, path: Path, *, max_bytes: int) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")  # on disk before C-STORE success
        self._db.execute("PRAGMA secure_delete=ON")  # a sent instance's pages held PHI: zeroed
        self._db.execute("PRAGMA busy_timeout=5000")
        self._db.executescript(SCHEMA)
        self._migrate()
        self._db.executescript(_INDEXES)
        with self._lock:
            row = self._db.execute(
                "SELECT COALESCE(SUM(LENGTH(payload)),0), COUNT(*) FROM spool").fetchone()
        self._bytes, self._count = int(row[0]), int(row[1])

    def _migrate(self) -> None:
        have = {str(r[1]) for r in self._db.execute("PRAGMA table_info(spool)")}
        for name, decl in _COLUMNS.items():
            if name not in have:
                self._db.execute(f"ALTER TABLE spool ADD COLUMN {name} {decl}")
        for row_id, payload in self._db.execute(
                "SELECT id, payload FROM spool WHERE sha256 IS NULL").fetchall():
            self._db.execute("UPDATE spool SET sha256=? WHERE id=?",
                             (hashlib.sha256(payload).hexdigest(), row_id))

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def put(self, sop_uid: str, payload: bytes) -> int:
        """Commit one instance, queued; its row id. Raises SpoolFull at the cap."""
        digest = hashlib.sha256(payload).hexdigest()
        with self._lock:
            if self._bytes + len(payload) > self.max_bytes:
                raise SpoolFull(f"the gateway's spool holds {self._bytes} bytes "
                                f"(cap {self.max_bytes})")
            cur = self._db.execute(
                "INSERT INTO spool(received_at, sop_uid, sha256, payload) VALUES (?,?,?,?)",
                (time.time(), sop_uid, digest, payload))
            self._bytes += len(payload)
            self._count += 1
            return int(cur.lastrowid or 0)

    def oldest(self, exclude: set[int], limit: int) -> list[Spooled]:
        """The oldest queued rows whose ids are not in ``exclude`` (those in flight)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT id, sop_uid, payload, tries FROM spool WHERE due IS NULL "
                "ORDER BY id LIMIT ?", (limit + len(exclude),)).fetchall()
        return [Spooled(int(r[0]), str(r[1]), bytes(r[2]), int(r[3]))
                for r in rows if int(r[0]) not in exclude][:limit]

    def delivered(self, row_id: int) -> None:
        """The broker acknowledged this row's publish and no receipt is awaited: delete it."""
        with self._lock:
            self._delete("id=?", (row_id,))

    def remove(self, row_id: int) -> None:
        """Forget a row that is not safe anywhere (the broker refused it; the caller says
        so to the modality)."""
        with self._lock:
            self._delete("id=?", (row_id,))

    def acked(self, row_id: int, timeout_s: float) -> None:
        """The broker acknowledged this row's publish: await the receipt, ``timeout_s`` after
        the first try, doubling per try (``resend_delay``)."""
        with self._lock:
            row = self._db.execute("SELECT tries FROM spool WHERE id=?", (row_id,)).fetchone()
            if row is None:  # the receipt came first
                return
            tries = int(row[0]) + 1
            self._db.execute("UPDATE spool SET tries=?, due=? WHERE id=?",
                             (tries, time.time() + resend_delay(timeout_s, tries), row_id))

    def confirmed(self, sha256: str) -> int:
        """The agent has the instance with this digest in its inbox: delete its rows (a
        modality that sent it twice has two); how many."""
        with self._lock:
            return self._delete("sha256=?", (sha256,))

    def requeue_all(self) -> int:
        """Every awaiting row back to queued; how many."""
        with self._lock:
            return self._db.execute(
                "UPDATE spool SET due=NULL WHERE due IS NOT NULL").rowcount

    def requeue_overdue(self, now: float) -> int:
        """Awaiting rows whose receipt is overdue at ``now`` back to queued; how many."""
        with self._lock:
            return self._db.execute(
                "UPDATE spool SET due=NULL WHERE due IS NOT NULL AND due <= ?", (now,)).rowcount

    def _delete(self, where: str, args: tuple[object, ...]) -> int:
        rows = self._db.execute(f"SELECT LENGTH(payload) FROM spool WHERE {where}",  # noqa: S608
                                args).fetchall()
        if not rows:
            return 0
        self._db.execute(f"DELETE FROM spool WHERE {where}", args)  # noqa: S608
        self._bytes -= sum(int(r[0]) for r in rows)
        self._count -= len(rows)
        return len(rows)

    @property
    def count(self) -> int:
        """Rows, queued and awaiting."""
        return self._count

    @property
    def queued(self) -> int:
        """Rows still to be published."""
        with self._lock:
            return int(self._db.execute(
                "SELECT COUNT(*) FROM spool WHERE due IS NULL").fetchone()[0])

    @property
    def size(self) -> int:
        return self._bytes
