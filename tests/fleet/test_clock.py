"""The node's clock floor (agent.fleet.clock) with the updater against a real Mosquitto: a
node that boots with its clock behind what it has verified does not evaluate expiry (state
``waiting_for_clock``, nothing downloaded, the serving bundle stays), and checks as soon as
the clock is set."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from agent.config import BrokerConfig, FleetSection
from agent.fleet.archive import pack_bundle
from agent.fleet.clock import BUILD_FLOOR, ISSUED_FIELD, SLACK, clock_behind, clock_floor
from agent.fleet.repo import init_repo, sign_release
from agent.fleet.updater import FleetUpdater
from tests.conftest import Mosquitto
from tests.fleet.test_updater_broker import GROUP, _activate, _bundle, _rejected, _send, _settled

pytestmark = pytest.mark.integration

BOOT = datetime(1970, 1, 1, tzinfo=UTC)  # a node without an RTC before NTP answers


def _node(tmp: Path, broker: Mosquitto, repo: Path, now: list[datetime]) -> FleetUpdater:
    up = FleetUpdater(FleetSection(group=GROUP, root=repo / "root.json"),
                      BrokerConfig(url=broker.url), f"fleet-clock-{time.monotonic_ns()}",
                      tmp / "state", device="site/node", clock=lambda: now[0], stall_s=2.0,
                      deadline_s=10.0)
    up.store.prepare()
    up.conn.start()
    assert up.conn.wait_connected(10)
    return up


def _waiting(up: FleetUpdater) -> dict[str, object]:
    assert up.check() is False  # the update thread tries again in a few seconds
    status = up.status()
    assert status["state"] == "waiting_for_clock" and status["reason"] == "clock_behind"
    assert "no update check runs before NTP" in str(status["detail"])
    assert up.take_candidate() is None and up.take_reports() == []  # not a rejection
    return status


def test_the_floor_is_the_newest_signed_time_and_the_build_date(tmp_path: Path) -> None:
    assert clock_floor(tmp_path) == BUILD_FLOOR  # nothing verified yet
    issued = datetime(2031, 5, 1, 12, tzinfo=UTC)
    (tmp_path / "timestamp.json").write_text(json.dumps(
        {"signed": {"_type": "timestamp", ISSUED_FIELD: "2031-05-01T12:00:00Z"}}))
    assert clock_floor(tmp_path) == issued
    assert clock_behind(tmp_path, issued - SLACK) is None  # a publisher a little ahead
    behind = clock_behind(tmp_path, issued - SLACK - timedelta(seconds=1))
    assert behind is not None and "2031-05-01T12:00:00+00:00" in behind
    (tmp_path / "timestamp.json").write_text("{not json")
    assert clock_floor(tmp_path) == BUILD_FLOOR


def test_a_node_booting_with_its_clock_behind_waits_for_the_clock(
        tmp_path: Path, mosquitto_factory: Callable[..., Mosquitto]) -> None:
    broker = mosquitto_factory("cloud")
    repo = tmp_path / "repo"
    init_repo(repo)
    now = [BOOT]
    up = _node(tmp_path, broker, repo, now)
    signed_at = datetime.now(UTC).replace(microsecond=0)
    _send(broker, sign_release(repo, GROUP, pack_bundle(_bundle(tmp_path, "1.0.0")),
                               {"bundle": "b", "version": "1.0.0"}, now=signed_at))
    _settled(up)
    assert _waiting(up)["version"] is None
    assert up.fetcher.bytes_received == 0 and up.store.current is None

    now[0] = datetime.now(UTC)  # NTP set the clock: the next check runs
    key = _activate(up)
    assert clock_floor(up.store.metadata) == signed_at  # from the verified timestamp
    up.conn.stop()

    # A reboot that restores a clock two days old (no RTC, a saved time): the stored
    # timestamp is the floor, so metadata that expired yesterday is not judged by it.
    now[0] = signed_at - timedelta(days=2)
    again = _node(tmp_path, broker, repo, now)
    _send(broker, sign_release(repo, GROUP, pack_bundle(_bundle(tmp_path, "2.0.0")),
                               {"bundle": "b", "version": "2.0.0"},
                               now=signed_at - timedelta(days=1, hours=12)))
    _settled(again)
    assert _waiting(again)["version"] == "1.0.0"  # the activated bundle keeps serving
    assert again.store.current_key == key and again.fetcher.bytes_received == 0

    now[0] = datetime.now(UTC)
    again.check()  # with the clock set, expiry is judged: the frozen release is refused
    _rejected(again, "metadata_expired")
    assert again.store.current_key == key
    again.conn.stop()
