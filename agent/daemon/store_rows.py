"""The store's tables (SQLite), the rows it hands out and the errors it raises."""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass

from agent.errors import AgentError

SCHEMA = """
CREATE TABLE IF NOT EXISTS inbox (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    received_at REAL    NOT NULL,
    topic       TEXT    NOT NULL,
    sha256      TEXT    NOT NULL,
    payload     BLOB    NOT NULL,
    state       TEXT    NOT NULL DEFAULT 'pending'  -- pending | held | done
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
CREATE INDEX IF NOT EXISTS outbox_message ON outbox(message_id);
CREATE TABLE IF NOT EXISTS counters (
    name  TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
"""


class StoreFull(AgentError):
    """The inbox or outbox has reached its byte cap."""


class DiskFull(StoreFull):
    """The store's filesystem is (nearly) full: nothing was written."""


def disk_full(exc: sqlite3.Error) -> bool:
    """SQLITE_FULL, whatever its extended code (``sqlite_errorcode``: Python 3.11+)."""
    return exc.sqlite_errorcode & 0xFF == sqlite3.SQLITE_FULL


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
