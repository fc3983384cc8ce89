"""Attacks on fleet updates against the running agent between real Mosquitto brokers: each
is rejected with its reason in the retained status while the activated model keeps
serving, the agent keeps running and no scan is lost. (Each attack also has its own
in-process test in tests/fleet/test_updater_broker.py.)"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from agent.config import BrokerConfig
from agent.demo.sample_series import build_series, load_demo_slab
from agent.fleet.archive import pack_bundle
from agent.fleet.publish import release_messages, send_retained
from agent.fleet.repo import Release, init_repo, sign_release
from agent.transport.topics import FleetTopics
from tests.conftest import Mosquitto
from tests.fleet.test_updater_broker import _evil_tar, _root_v2
from tests.integration.harness import REFERENCE_BUNDLE, Proc, Recorder, cli, spawn
from tests.integration.test_fleet_live import _publish, _update, _variant
from tests.integration.test_models_live import _wait_status

pytestmark = pytest.mark.integration

GROUP = "ward-a"


@pytest.fixture
def brokers(mosquitto_factory: Callable[[str], Mosquitto]) -> tuple[Mosquitto, Mosquitto]:
    return mosquitto_factory("edge"), mosquitto_factory("cloud")


def test_attacks_on_a_running_agent_are_rejected_and_it_keeps_serving(
        tmp_path: Path, brokers: tuple[Mosquitto, Mosquitto]) -> None:
    edge, cloud = brokers
    cfg = BrokerConfig(url=cloud.url)
    topics = FleetTopics(GROUP)
    repo = tmp_path / "repo"
    init_repo(repo, root_threshold=2, root_keys=2)
    r = cli("init", str(tmp_path / "node"), "--edge-url", edge.url, "--cloud-url", cloud.url,
            "--site", "site-a", "--device-id", "node-1", "--bundle", str(REFERENCE_BUNDLE),
            "--fleet-group", GROUP, "--fleet-root", str(repo / "root.json"))
    assert r.returncode == 0, r.stderr
    config = tmp_path / "node" / "agent.toml"
    text = config.read_text().replace('format = "auto"', 'format = "json"')
    assert text.rstrip().endswith('root = "fleet/root.json"         # the fleet\'s trusted '
                                  'root (from `iomt-agent fleet init-repo`)')
    config.write_text(text + "download_stall_s = 1\n")  # the [fleet] section is the last
    rec = Recorder.start(cloud.url, "cloud", "iomt/site-a/node-1/#")
    agent = spawn(["run", "--config", str(config)], tmp_path / "agent.log")
    agent.wait_for('"mqtt_connected"', 3)
    slab = load_demo_slab().t1
    sent = 0

    senders: list[Proc] = []

    def scans(n: int, name: str) -> None:
        """Send ``n`` slices in the background (``send`` waits for the broker's acks)."""
        nonlocal sent
        out = tmp_path / name
        out.mkdir()
        for i, payload in enumerate(build_series(slab[:n])):
            (out / f"{i:03d}.dcm").write_bytes(payload)
        senders.append(spawn(["send", "--config", str(config), str(out)],
                             tmp_path / f"{name}.log"))
        sent += n

    # Two genuine releases; the first one's messages are kept for the replay.
    first = sign_release(repo, GROUP, pack_bundle(_variant(tmp_path, "2.0.0")),
                         {"bundle": "t1w-to-t2w-lite", "version": "2.0.0"})
    old_messages = release_messages(topics, first)
    send_retained(cfg, old_messages)
    _wait_status(rec, lambda s: _update(s).get("version") == "2.0.0"
                 and _update(s).get("state") == "active", 180)
    _publish(repo, _variant(tmp_path, "2.1.0"), cloud)
    _wait_status(rec, lambda s: _update(s).get("version") == "2.1.0"
                 and _update(s).get("state") == "active", 180)
    scans(2, "s0")

    def latest_update() -> dict[str, object]:
        return _update(json.loads(rec.on("/status")[-1].payload))

    def rejected(reason: str, before: dict[str, object]) -> dict[str, object]:
        """The first rejection set after ``before`` (the update status before the attack;
        a status republished meanwhile still carries the older one)."""
        deadline = time.monotonic() + 120
        while not (found := [s for m in rec.on("/status") if (
                u := _update(s := json.loads(m.payload))).get("state") == "rejected"
                and str(u.get("at")) > str(before.get("at"))]):
            assert time.monotonic() < deadline, f"no rejection for {reason}"
            time.sleep(0.1)
        status = found[0]
        assert _update(status)["reason"] == reason, status
        assert status["model"]["version"] == "2.1.0"  # type: ignore[index]
        assert agent.proc.poll() is None
        return _update(status)

    attacks: list[tuple[str, Callable[[], None]]] = []

    def replay() -> None:
        send_retained(cfg, old_messages)

    def wrong_key() -> None:
        rogue = tmp_path / "rogue"
        init_repo(rogue)
        rel = sign_release(rogue, GROUP, pack_bundle(_variant(tmp_path, "6.6.6")),
                           {"bundle": "x", "version": "6.6.6"})
        send_retained(cfg, release_messages(topics, rel))

    def corrupted_chunk() -> None:
        rel = sign_release(repo, GROUP, pack_bundle(_variant(tmp_path, "2.2.0")),
                           {"bundle": "t1w-to-t2w-lite", "version": "2.2.0"})
        third = str(topics.target_chunk(rel.sha256, "bundle.tar", 3))
        msgs = [(t, (p[:100] + bytes([p[100] ^ 1]) + p[101:]) if str(t) == third else p)
                for t, p in release_messages(topics, rel)]
        send_retained(cfg, msgs)

    def escaping_tar() -> None:
        rel = sign_release(repo, GROUP, _evil_tar("escape"), {"bundle": "x", "version": "7"})
        send_retained(cfg, release_messages(topics, rel))

    def contract_mismatch() -> None:  # the model's input does not fit its own contract
        bad = tmp_path / "bundle-9.0.0"
        shutil.copytree(REFERENCE_BUNDLE, bad)
        meta = json.loads((bad / "bundle.json").read_text())
        meta["version"], meta["input"]["shape"] = "9.0.0", [128, 128]
        (bad / "bundle.json").write_text(json.dumps(meta))
        _publish(repo, bad, cloud)

    def expired() -> None:  # a freeze: genuine metadata, signed a month ago
        rel = sign_release(repo, GROUP, pack_bundle(_variant(tmp_path, "2.3.0")),
                           {"bundle": "t1w-to-t2w-lite", "version": "2.3.0"},
                           now=datetime.now(UTC) - timedelta(days=30))
        send_retained(cfg, release_messages(topics, rel))

    def stalled() -> None:  # one chunk never comes: fleet.download_stall_s (1 s) ends it
        rel = sign_release(repo, GROUP, pack_bundle(_variant(tmp_path, "2.4.0")),
                           {"bundle": "t1w-to-t2w-lite", "version": "2.4.0"})
        gap = str(topics.target_chunk(rel.sha256, "bundle.tar", 2))
        send_retained(cfg, [(t, p) for t, p in release_messages(topics, rel) if str(t) != gap])

    def other_group() -> None:  # ward-b's genuine release, shown on ward-a's topics
        rel = sign_release(repo, "ward-b", pack_bundle(_variant(tmp_path, "2.5.0")),
                           {"bundle": "t1w-to-t2w-lite", "version": "2.5.0"})
        send_retained(cfg, release_messages(topics, rel))

    def variant(version: str) -> Release:
        return sign_release(repo, GROUP, pack_bundle(_variant(tmp_path, version)),
                            {"bundle": "t1w-to-t2w-lite", "version": version})

    def unsigned() -> None:  # the timestamp without its signature
        rel = variant("2.6.0")
        doc = json.loads(rel.timestamp)
        doc["signatures"] = []
        send_retained(cfg, release_messages(topics, replace(rel, timestamp=json.dumps(
            doc).encode())))

    def mix_and_match() -> None:  # a newer snapshot and timestamp, an older targets
        older, newer = variant("2.7.0"), variant("2.8.0")
        send_retained(cfg, release_messages(topics, replace(newer, targets=older.targets)))

    def longer_than_signed() -> None:  # the manifest offers 10 MiB more than signed
        rel = variant("2.9.0")
        manifest = str(topics.target(rel.sha256, "bundle.tar"))
        msgs = []
        for t, p in release_messages(topics, rel):
            if str(t) == manifest:
                doc = json.loads(p)
                doc["length"] += 10 * 1024 * 1024
                doc["chunks"] = -(-doc["length"] // doc["chunk_size"])
                p = json.dumps(doc).encode()
            msgs.append((t, p))
        send_retained(cfg, msgs)

    def root_below_threshold(duplicate: bool) -> Callable[[], None]:
        def attack() -> None:  # a new root signed by 1 of the 2 root keys (listed twice)
            rel = variant("3.1.0" if duplicate else "3.0.0")
            root2 = _root_v2(repo, ["root-1.pem"], duplicate=duplicate)
            send_retained(cfg, release_messages(topics, replace(rel, roots={**rel.roots,
                                                                             2: root2})))
        return attack

    attacks = [("metadata_replayed", replay), ("metadata_unsigned", wrong_key),
               ("metadata_expired", expired), ("metadata_unsigned", unsigned),
               ("download_stalled", stalled), ("metadata_replayed", mix_and_match),
               ("wrong_group", other_group), ("target_too_long", longer_than_signed),
               ("target_mismatch", corrupted_chunk), ("unsafe_archive", escaping_tar),
               ("bundle_invalid", contract_mismatch),
               # last: the bad root/2 stays retained, so every later check would fail
               ("metadata_unsigned", root_below_threshold(False)),
               ("metadata_invalid", root_below_threshold(True))]
    for i, (reason, attack) in enumerate(attacks):
        before = latest_update()
        attack()
        status = rejected(reason, before)
        if reason == "download_stalled":
            assert "no data for 1 s" in str(status["detail"]), status
        scans(1, f"s{i + 1}")  # the old model serves between attacks

    assert all(sender.proc.wait(120) == 0 for sender in senders)
    done = _wait_status(rec, lambda s: s.get("processed") == sent, 120)
    assert done["failed"] == 0 and done["inbox_depth"] == 0
    assert done["model"]["version"] == "2.1.0"  # type: ignore[index]
    assert not list(tmp_path.rglob("escaped.txt"))
    reports = [json.loads(m.payload) for m in rec.on("/errors")]
    assert {rep["detail"].split(":")[0] for rep in reports} >= {r for r, _ in attacks}
    assert agent.terminate() == 0
    text = agent.text()
    assert "SECRET" not in text  # no scan content in the log (the sample has no PHI)
    rec.stop()
