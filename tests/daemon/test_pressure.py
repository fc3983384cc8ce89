"""Full stores and a full disk on a real SQLite store: the disk reserve refuses new scans
(held unacked, ``Pressure`` says why), an outbox at its cap holds scans under the default
policy, ``drop_oldest`` replaces the oldest results by error reports in one transaction."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from agent.config import LimitsSection
from agent.daemon.ingest import Ingest
from agent.daemon.pressure import Pressure
from agent.daemon.store import DiskFull, OutboxItem, Store
from agent.transport.mqtt import Message
from agent.transport.topics import Topics

TOPIC = "iomt/site-1/scans/gw"
MIB = 1 << 20


def _msg(mid: int, size: int = 1000) -> Message:
    return Message(TOPIC, bytes([mid % 256]) * size, 1, mid, False, False)


def _ingest(store: Store, acked: list[int], pressure: Pressure, *,
            outbox_backpressure: bool = True) -> Ingest:
    return Ingest(store, LimitsSection(), Topics("site-1", "edge-1"),
                  ack=lambda m, _sha: acked.append(m.mid), stored=lambda: None, pressure=pressure,
                  outbox_backpressure=outbox_backpressure)


def test_below_the_disk_reserve_scans_are_held_unacked_until_space_returns(
        tmp_path: Path) -> None:
    store = Store(tmp_path / "agent.db", inbox_max_bytes=MIB, outbox_max_bytes=MIB)
    pressure, acked = Pressure(), []
    ingest = _ingest(store, acked, pressure)
    ingest.on_message(_msg(1))
    store.min_free_bytes = store.free_disk_bytes() + MIB  # the disk is "full" now
    with pytest.raises(DiskFull, match="min_free_disk_bytes"):
        store.accept(TOPIC, "0" * 64, b"x")
    ingest.on_message(_msg(2))
    ingest.on_message(_msg(3))
    assert acked == [1] and ingest.held == 2 and len(store.pending()) == 1
    assert pressure.changed()
    summary = pressure.summary()
    assert summary is not None and summary["reason"] == "disk_full"
    assert ingest.retry() == 2  # still full
    store.min_free_bytes = 0  # space returned
    assert ingest.retry() == 0
    assert acked == [1, 2, 3] and len(store.pending()) == 3
    assert pressure.summary() is None and pressure.changed()


def test_a_full_outbox_holds_new_scans_under_the_default_policy(tmp_path: Path) -> None:
    store = Store(tmp_path / "agent.db", inbox_max_bytes=MIB, outbox_max_bytes=MIB)
    store.complete(None, [("result", "r-0", "iomt/s/d/results", b"r" * MIB)], "processed")
    assert store.outbox_full()
    pressure, acked = Pressure(), []
    ingest = _ingest(store, acked, pressure)
    ingest.on_message(_msg(1))
    assert acked == [] and ingest.held == 1 and store.pending() == []
    summary = pressure.summary()
    assert summary is not None and summary["reason"] == "outbox_full"
    [row] = store.outbox()
    store.delivered(row.id)
    assert ingest.retry() == 0 and acked == [1]
    # drop_oldest: the inbox keeps taking scans; the finisher makes room instead.
    store.complete(None, [("result", "r-1", "iomt/s/d/results", b"r" * MIB)], "processed")
    other: list[int] = []
    _ingest(store, other, Pressure(), outbox_backpressure=False).on_message(_msg(2))
    assert other == [2]


def test_drop_oldest_replaces_the_oldest_results_by_reports_in_one_transaction(
        tmp_path: Path) -> None:
    store = Store(tmp_path / "agent.db", inbox_max_bytes=MIB, outbox_max_bytes=MIB)
    for i in range(4):
        store.complete(None, [("result", f"r-{i}", "iomt/s/d/results", b"r" * (MIB // 3))],
                       "processed")
    store.complete(None, [("error", "e-0", "iomt/s/d/errors", b"{}")], "failed")
    assert store.outbox_full()

    def report(item: OutboxItem) -> tuple[str, str, str, bytes]:
        return "error", f"x-{item.message_id}", "iomt/s/d/errors", json.dumps(
            {"dropped": item.message_id}).encode()

    dropped = store.drop_oldest(report)
    assert [d.message_id for d in dropped] == ["r-0", "r-1"]  # oldest first, until below cap
    assert not store.outbox_full()
    left = [(r.kind, r.message_id) for r in store.outbox()]
    assert left == [("result", "r-2"), ("result", "r-3"), ("error", "e-0"),
                    ("error", "x-r-0"), ("error", "x-r-1")]

    def broken(item: OutboxItem) -> tuple[str, str, str, bytes]:
        raise RuntimeError("report failed")

    store.complete(None, [("result", "r-4", "iomt/s/d/results", b"r" * (MIB // 2))],
                   "processed")
    with pytest.raises(RuntimeError):
        store.drop_oldest(broken)
    assert len(store.outbox()) == 6  # rolled back: nothing dropped without its report
    store.close()
    reopened = Store(tmp_path / "agent.db", inbox_max_bytes=MIB, outbox_max_bytes=MIB)
    assert reopened.outbox_full()  # the byte count matches what is on disk


def test_what_ingest_logs_and_reports_while_it_holds_scans(tmp_path: Path) -> None:
    """The first held scan logs its cause (the event is the cause) with the store's words;
    Pressure names the ingest as the stopped source; a cause that changes while scans are
    held is reported again; the last stored one logs ``inbox_accepting``."""
    store = Store(tmp_path / "agent.db", inbox_max_bytes=MIB, outbox_max_bytes=MIB)
    pressure, acked = Pressure(), []
    ingest = _ingest(store, acked, pressure)
    ingest.on_message(_msg(1, size=MIB - 1000))
    with capture_logs() as logs:
        ingest.on_message(_msg(2, size=2000))  # over the inbox cap
        ingest.on_message(_msg(3, size=10))  # behind it: held without a second warning
    [held] = [e for e in logs if e["event"] == "inbox_full"]
    assert held["held"] == 1 and held["detail"] == f"inbox holds {MIB - 1000} bytes (cap {MIB})"
    assert held["fix"] == "scans wait unacked with the edge broker until there is room"
    assert held["log_level"] == "warning"
    assert [e["event"] for e in logs] == ["backpressure", "inbox_full"]
    assert pressure.summary() == {"reason": "inbox_full", "source": "ingest",
                                  "since": pressure.summary()["since"]}  # type: ignore[index]
    [row] = store.pending()  # processed: the inbox has room, but the outbox is full now
    store.complete(row.id, [("result", "r-0", "iomt/s/d/results", b"r" * MIB)], "processed")
    with capture_logs() as logs:
        assert ingest.retry() == 2
    summary = pressure.summary()
    assert summary is not None and summary["reason"] == "outbox_full"
    assert summary["source"] == "ingest"
    assert [(e["event"], e["reason"]) for e in logs] == [("backpressure", "outbox_full")]
    [result] = store.outbox()
    store.delivered(result.id)
    with capture_logs() as logs:
        assert ingest.retry() == 0
    assert acked == [1, 2, 3] and pressure.summary() is None
    assert [e["event"] for e in logs] == ["backpressure_over", "inbox_accepting"]
    assert logs[0]["source"] == "ingest"
    assert logs[1]["note"] == "held scans stored and acked"
    store.close()


def test_a_full_outbox_is_named_in_the_log_and_a_scan_behind_it_waits(tmp_path: Path) -> None:
    store = Store(tmp_path / "agent.db", inbox_max_bytes=MIB, outbox_max_bytes=MIB)
    store.complete(None, [("result", "r-0", "iomt/s/d/results", b"r" * MIB)], "processed")
    pressure, acked = Pressure(), []
    ingest = _ingest(store, acked, pressure)
    with capture_logs() as logs:
        ingest.on_message(_msg(1))
    [held] = [e for e in logs if e["event"] == "outbox_full"]
    assert held["detail"] == "the outbox is at limits.outbox_max_bytes" and held["held"] == 1
    store.close()


def test_a_full_disk_is_named_in_the_log(tmp_path: Path) -> None:
    store = Store(tmp_path / "agent.db", inbox_max_bytes=MIB, outbox_max_bytes=MIB)
    store.min_free_bytes = store.free_disk_bytes() + MIB
    pressure, acked = Pressure(), []
    with capture_logs() as logs:
        _ingest(store, acked, pressure).on_message(_msg(1))
    [held] = [e for e in logs if e["event"] == "disk_full"]
    assert "min_free_disk_bytes" in held["detail"] and acked == []
    store.close()


def test_with_room_in_the_outbox_backpressure_lets_scans_in(tmp_path: Path) -> None:
    store = Store(tmp_path / "agent.db", inbox_max_bytes=MIB, outbox_max_bytes=MIB)
    pressure, acked = Pressure(), []
    ingest = _ingest(store, acked, pressure, outbox_backpressure=True)
    ingest.on_message(_msg(1))
    assert acked == [1] and pressure.summary() is None and ingest.held == 0
    store.close()


def test_inbox_accepting_is_logged_once_the_last_held_scan_is_acked(tmp_path: Path) -> None:
    store = Store(tmp_path / "agent.db", inbox_max_bytes=MIB, outbox_max_bytes=MIB)
    pressure = Pressure()
    trail: list[str] = []
    ingest = Ingest(store, LimitsSection(), Topics("site-1", "edge-1"),
                    ack=lambda m, _sha: trail.append(f"ack {m.mid}"), stored=lambda: None,
                    pressure=pressure)
    ingest.on_message(_msg(1, size=MIB - 1000))
    for mid in (2, 3, 4):
        ingest.on_message(_msg(mid, size=2000))
    [row] = store.pending()
    store.complete(row.id, [], "processed")
    with capture_logs() as logs:
        trail.clear()
        real_clear = pressure.clear

        def clear(source: str) -> None:
            trail.append(f"clear {source}")
            real_clear(source)

        pressure.clear = clear  # type: ignore[method-assign]
        assert ingest.retry() == 0
    assert trail == ["ack 2", "ack 3", "ack 4", "clear ingest"]
    assert [e["event"] for e in logs] == ["backpressure_over", "inbox_accepting"]
    store.close()


def _report(item: OutboxItem) -> tuple[str, str, str, bytes]:
    return "error", f"x-{item.message_id}", "iomt/s/d/errors", b"e" * 20


def test_drop_oldest_at_exactly_the_cap_drops_and_counts_every_byte(tmp_path: Path) -> None:
    """At the cap to the byte, the oldest result goes; when dropping every result still
    leaves the outbox over its cap (error reports fill it), the rest stays and the byte
    count still matches the rows (checked by filling up to one byte below the cap)."""
    cap = 1000
    store = Store(tmp_path / "agent.db", inbox_max_bytes=MIB, outbox_max_bytes=cap)
    store.complete(None, [("result", "r-0", "iomt/s/d/results", b"r" * 400),
                          ("result", "r-1", "iomt/s/d/results", b"r" * 600)], "processed")
    assert store.outbox_full()
    assert [d.message_id for d in store.drop_oldest(_report)] == ["r-0"]  # 620 left
    store.complete(None, [("result", "r-2", "iomt/s/d/results", b"r" * 379)], "processed")
    assert not store.outbox_full()  # 999 bytes
    store.complete(None, [("error", "e-0", "iomt/s/d/errors", b"e" * 1)], "failed")
    assert store.outbox_full()  # 1000
    store.close()


def test_drop_oldest_with_too_few_results_keeps_the_byte_count(tmp_path: Path) -> None:
    cap = 1000
    store = Store(tmp_path / "agent.db", inbox_max_bytes=MIB, outbox_max_bytes=cap)
    store.complete(None, [("error", "e-0", "iomt/s/d/errors", b"e" * 1100)], "failed")
    store.complete(None, [("result", "r-0", "iomt/s/d/results", b"r" * 50),
                          ("result", "r-1", "iomt/s/d/results", b"r" * 50)], "processed")
    dropped = store.drop_oldest(_report)
    assert [d.message_id for d in dropped] == ["r-0", "r-1"]  # 1100 + 2 x 20 left: still full
    assert store.outbox_full()
    [big] = [r for r in store.outbox() if r.message_id == "e-0"]
    store.delivered(big.id)  # 40 bytes of reports left
    store.complete(None, [("result", "r-2", "iomt/s/d/results", b"r" * 959)], "processed")
    assert not store.outbox_full()  # 999
    store.complete(None, [("error", "e-1", "iomt/s/d/errors", b"e")], "failed")
    assert store.outbox_full()  # 1000
    store.close()
