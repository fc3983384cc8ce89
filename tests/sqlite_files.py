"""What an SQLite store leaves on disk, for tests that look for PHI in its files."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import pytest


def checkpointed_bytes(db: Path) -> bytes:
    """The database file once the WAL is checkpointed into it and truncated, plus whatever
    WAL is left."""
    con = sqlite3.connect(db)
    con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    con.close()
    wal = db.with_name(db.name + "-wal")
    return db.read_bytes() + (wal.read_bytes() if wal.exists() else b"")


def without_secure_delete(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every new connection starts with ``secure_delete`` off, as on an SQLite built
    without it (Debian's is built with it on), until the test ends."""
    real = sqlite3.connect

    def connect(*args: Any, **kwargs: Any) -> sqlite3.Connection:
        con = real(*args, **kwargs)
        con.execute("PRAGMA secure_delete=OFF")
        return con

    monkeypatch.setattr(sqlite3, "connect", connect)
