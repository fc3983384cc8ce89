"""The node's update path (fetcher + ngclient + unpack + bundle checks) against a real
Mosquitto, in process: a good release becomes a candidate and then ``current``, and each
attack is rejected with its reason while ``current`` stays what it was."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
import time
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from agent.config import BrokerConfig, FleetSection
from agent.fleet.archive import pack_bundle
from agent.fleet.publish import publish, release_messages, send_retained
from agent.fleet.repo import Release, init_repo, sign_release
from agent.fleet.updater import FleetUpdater
from agent.transport.topics import FleetTopics, Topics
from tests.bundles import make_scale_bundle
from tests.conftest import Mosquitto

pytestmark = pytest.mark.integration

GROUP = "ward-a"


@pytest.fixture
def broker(mosquitto_factory: Callable[..., Mosquitto]) -> Mosquitto:
    return mosquitto_factory("cloud")


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    init_repo(tmp_path / "repo")
    return tmp_path / "repo"


def _bundle(tmp: Path, version: str, factor: float = 0.5) -> Path:
    root = make_scale_bundle(tmp / f"bundle-{version}", factor)
    meta = json.loads((root / "bundle.json").read_text())
    meta["version"] = version
    (root / "bundle.json").write_text(json.dumps(meta))
    return root


def _node(tmp: Path, broker: Mosquitto, repo: Path, name: str = "node") -> FleetUpdater:
    up = FleetUpdater(FleetSection(group=GROUP, root=repo / "root.json"),
                      BrokerConfig(url=broker.url), f"fleet-{name}-{time.monotonic_ns()}",
                      tmp / f"state-{name}", device=f"site/{name}", stall_s=2.0,
                      deadline_s=10.0)
    up.store.prepare()
    up.conn.start()
    assert up.conn.wait_connected(10)
    return up


def _settled(up: FleetUpdater) -> None:
    """Wait until the group's timestamp has arrived and the burst has landed."""
    assert up.cache.get(up.topics.metadata("timestamp"), 10) is not None
    time.sleep(0.5)


def _activate(up: FleetUpdater) -> str:
    _settled(up)
    up.check()
    candidate = up.take_candidate()
    assert candidate is not None, up.status()
    up.activated(candidate)
    assert up.store.current == candidate.bundle
    return candidate.key


def _send(broker: Mosquitto, release: Release, **kw: int) -> None:
    send_retained(BrokerConfig(url=broker.url),
                  release_messages(FleetTopics(GROUP), release, **kw))


def _rejected(up: FleetUpdater, reason: str) -> dict[str, object]:
    status = up.status()
    assert status["state"] == "rejected", status
    assert status["reason"] == reason, status
    assert up.take_candidate() is None
    assert up.take_reports()[-1][0] == reason
    return status


def test_a_release_becomes_current_and_the_next_replaces_it(
        tmp_path: Path, broker: Mosquitto, repo: Path) -> None:
    cfg = BrokerConfig(url=broker.url)
    publish(repo, _bundle(tmp_path, "1.0.0"), GROUP, cfg, chunk_bytes=1024)
    up = _node(tmp_path, broker, repo)
    first = _activate(up)
    assert up.status()["state"] == "active" and up.status()["version"] == "1.0.0"
    assert up.fetcher.bytes_received > 0
    publish(repo, _bundle(tmp_path, "2.0.0", 0.25), GROUP, cfg, chunk_bytes=1024)
    time.sleep(1.0)
    second = _activate(up)
    assert second != first
    assert (up.store.root / "previous").resolve().name == first
    assert json.loads((up.store.current / "bundle.json").read_text())["version"] == "2.0.0"
    up.check()  # nothing new: no candidate, still active
    assert up.take_candidate() is None and up.status()["state"] == "active"
    up.conn.stop()


def test_metadata_signed_with_another_key_is_rejected(
        tmp_path: Path, broker: Mosquitto, repo: Path) -> None:
    up = _node(tmp_path, broker, repo)
    rogue = tmp_path / "rogue"
    init_repo(rogue)
    publish(rogue, _bundle(tmp_path, "6.6.6"), GROUP, BrokerConfig(url=broker.url))
    _settled(up)
    up.check()
    _rejected(up, "metadata_unsigned")
    assert up.store.current is None
    up.conn.stop()


def test_unsigned_metadata_is_rejected(tmp_path: Path, broker: Mosquitto, repo: Path) -> None:
    up = _node(tmp_path, broker, repo)
    release = sign_release(repo, GROUP, pack_bundle(_bundle(tmp_path, "1.0.0")), {})
    doc = json.loads(release.timestamp)
    doc["signatures"] = []
    _send(broker, replace(release, timestamp=json.dumps(doc).encode()))
    _settled(up)
    up.check()
    _rejected(up, "metadata_unsigned")
    up.conn.stop()


def test_a_replayed_older_release_is_rejected_also_after_a_restart(
        tmp_path: Path, broker: Mosquitto, repo: Path) -> None:
    cfg = BrokerConfig(url=broker.url)
    old = sign_release(repo, GROUP, pack_bundle(_bundle(tmp_path, "1.0.0")),
                       {"bundle": "test-scale", "version": "1.0.0"})
    _send(broker, old)
    up = _node(tmp_path, broker, repo)
    _activate(up)
    publish(repo, _bundle(tmp_path, "2.0.0", 0.25), GROUP, cfg)
    time.sleep(1.0)
    serving = _activate(up)
    _send(broker, old)  # the attacker re-publishes the older, validly signed release
    time.sleep(1.0)
    up.check()
    _rejected(up, "metadata_replayed")
    assert up.store.current_key == serving
    from agent.fleet.publish import refresh

    refresh(repo, GROUP, cfg)  # the operator puts current metadata back
    time.sleep(1.0)
    up.check()
    assert up.status()["state"] == "active" and up.status()["version"] == "2.0.0"
    _send(broker, old)  # and the attacker replays again
    time.sleep(1.0)
    up.conn.stop()
    again = _node(tmp_path, broker, repo)  # same state directory: a restart
    _settled(again)
    again.check()
    _rejected(again, "metadata_replayed")
    assert again.store.current_key == serving
    again.conn.stop()


def test_expired_metadata_is_rejected(tmp_path: Path, broker: Mosquitto, repo: Path) -> None:
    up = _node(tmp_path, broker, repo)
    stale = datetime.now(UTC) - timedelta(days=30)
    _send(broker, sign_release(repo, GROUP, pack_bundle(_bundle(tmp_path, "1.0.0")), {},
                               now=stale))
    _settled(up)
    up.check()
    _rejected(up, "metadata_expired")
    up.conn.stop()


def _tampered_chunks(broker: Mosquitto, release: Release, tamper: Callable[[bytes], bytes],
                     manifest_length: int | None = None) -> None:
    messages = release_messages(FleetTopics(GROUP), release, chunk_bytes=1024)
    out = []
    for topic, payload in messages:
        if str(topic).endswith("/bundle.tar") and manifest_length is not None:
            doc = json.loads(payload)
            doc["length"] = manifest_length
            doc["chunks"] = -(-manifest_length // 1024)
            payload = json.dumps(doc).encode()
        elif str(topic).endswith("/bundle.tar/1"):
            payload = tamper(payload)
        out.append((topic, payload))
    send_retained(BrokerConfig(url=broker.url), out)


def test_a_corrupted_chunk_is_rejected(tmp_path: Path, broker: Mosquitto, repo: Path) -> None:
    up = _node(tmp_path, broker, repo)
    release = sign_release(repo, GROUP, pack_bundle(_bundle(tmp_path, "1.0.0")),
                           {"bundle": "b", "version": "1.0.0"})
    _tampered_chunks(broker, release, lambda b: bytes([b[0] ^ 0xFF]) + b[1:])
    _settled(up)
    up.check()
    _rejected(up, "target_mismatch")
    assert up.store.current is None and not any(up.store.bundles.iterdir())
    up.conn.stop()


def test_a_target_longer_than_signed_is_refused_before_reading_it(
        tmp_path: Path, broker: Mosquitto, repo: Path) -> None:
    up = _node(tmp_path, broker, repo)
    release = sign_release(repo, GROUP, pack_bundle(_bundle(tmp_path, "1.0.0")),
                           {"bundle": "b", "version": "1.0.0"})
    longer = len(release.target) + 10 * 1024 * 1024
    _tampered_chunks(broker, release, lambda b: b, manifest_length=longer)
    _settled(up)
    up.check()
    _rejected(up, "target_too_long")
    assert up.fetcher.bytes_received == 0
    up.conn.stop()


def test_extra_bytes_in_a_chunk_are_refused(tmp_path: Path, broker: Mosquitto,
                                            repo: Path) -> None:
    up = _node(tmp_path, broker, repo)
    release = sign_release(repo, GROUP, pack_bundle(_bundle(tmp_path, "1.0.0")),
                           {"bundle": "b", "version": "1.0.0"})
    _tampered_chunks(broker, release, lambda b: b + b"\0" * 4096)
    _settled(up)
    up.check()
    _rejected(up, "target_too_long")
    up.conn.stop()


def test_a_stalled_transfer_hits_its_deadline(tmp_path: Path, broker: Mosquitto,
                                              repo: Path) -> None:
    up = _node(tmp_path, broker, repo)
    release = sign_release(repo, GROUP, pack_bundle(_bundle(tmp_path, "1.0.0")),
                           {"bundle": "b", "version": "1.0.0"})
    messages = [(t, p) for t, p in release_messages(FleetTopics(GROUP), release,
                                                    chunk_bytes=1024)
                if not str(t).endswith("/bundle.tar/2")]  # one chunk never comes
    send_retained(BrokerConfig(url=broker.url), messages)
    _settled(up)
    started = time.monotonic()
    up.check()
    assert time.monotonic() - started < 8
    _rejected(up, "download_stalled")
    up.conn.stop()


def _evil_tar(kind: str) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:
        info = tarfile.TarInfo("bundle.json")
        info.size = 2
        tar.addfile(info, io.BytesIO(b"{}"))
        if kind == "escape":
            info = tarfile.TarInfo("../../escaped.txt")
            info.size = 4
            tar.addfile(info, io.BytesIO(b"evil"))
        else:
            info = tarfile.TarInfo("model.int8.onnx")
            info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
            tar.addfile(info)
    return out.getvalue()


@pytest.mark.parametrize("kind", ["escape", "symlink"])
def test_a_tar_that_escapes_staging_or_links_out_is_rejected(
        tmp_path: Path, broker: Mosquitto, repo: Path, kind: str) -> None:
    up = _node(tmp_path, broker, repo)
    _send(broker, sign_release(repo, GROUP, _evil_tar(kind), {"bundle": "b", "version": "6"}))
    _settled(up)
    up.check()
    _rejected(up, "unsafe_archive")
    assert not list(tmp_path.rglob("escaped.txt"))
    up.conn.stop()


def test_a_target_signed_for_another_group_is_rejected(
        tmp_path: Path, broker: Mosquitto, repo: Path) -> None:
    up = _node(tmp_path, broker, repo)
    other = sign_release(repo, "ward-b", pack_bundle(_bundle(tmp_path, "1.0.0")),
                         {"bundle": "b", "version": "1.0.0"})
    _send(broker, other)  # ward-b's release on ward-a's topics
    _settled(up)
    up.check()
    _rejected(up, "wrong_group")
    up.conn.stop()


def test_a_bundle_whose_files_do_not_match_is_rejected(
        tmp_path: Path, broker: Mosquitto, repo: Path) -> None:
    up = _node(tmp_path, broker, repo)
    bundle = _bundle(tmp_path, "1.0.0")
    broken = tmp_path / "broken"
    shutil.copytree(bundle, broken)
    (broken / "model.int8.onnx").write_bytes(b"not the model")
    _send(broker, sign_release(repo, GROUP, pack_bundle(broken), {"bundle": "b",
                                                                  "version": "1.0.0"}))
    _settled(up)
    up.check()
    _rejected(up, "bundle_invalid")
    up.conn.stop()


def _root_v2(repo: Path, signer_files: list[str], duplicate: bool = False) -> bytes:
    """Root version 2 (same keys), signed by the named key files only."""
    from cryptography.hazmat.primitives.serialization import load_pem_private_key
    from securesystemslib.signer import CryptoSigner
    from tuf.api.metadata import Metadata, Root

    from agent.fleet.repo import SERIALIZER, expires

    md = Metadata[Root].from_bytes((repo / "metadata" / "1.root.json").read_bytes())
    md.signed.version = 2
    md.signed.expires = expires("root")
    md.signatures.clear()
    for name in signer_files:
        key = load_pem_private_key((repo / "keys" / name).read_bytes(), None)
        md.sign(CryptoSigner(key), append=True)  # type: ignore[arg-type]
    doc = json.loads(md.to_bytes(SERIALIZER))
    if duplicate:
        doc["signatures"] = doc["signatures"] * 2  # one key listed twice
    return json.dumps(doc).encode()


@pytest.mark.parametrize("duplicate", [False, True])
def test_a_new_root_below_the_threshold_is_rejected(
        tmp_path: Path, broker: Mosquitto, duplicate: bool) -> None:
    repo = tmp_path / "repo2"
    init_repo(repo, root_threshold=2, root_keys=2)
    up = _node(tmp_path, broker, repo)
    release = sign_release(repo, GROUP, pack_bundle(_bundle(tmp_path, "1.0.0")),
                           {"bundle": "b", "version": "1.0.0"})
    root2 = _root_v2(repo, ["root-1.pem"], duplicate=duplicate)
    _send(broker, replace(release, roots={**release.roots, 2: root2}))
    _settled(up)
    up.check()
    _rejected(up, "metadata_unsigned" if not duplicate else "metadata_invalid")
    assert up.store.current is None
    up.conn.stop()


def test_a_new_root_signed_by_the_threshold_is_followed(
        tmp_path: Path, broker: Mosquitto) -> None:
    repo = tmp_path / "repo2"
    init_repo(repo, root_threshold=2, root_keys=2)
    up = _node(tmp_path, broker, repo)
    release = sign_release(repo, GROUP, pack_bundle(_bundle(tmp_path, "1.0.0")),
                           {"bundle": "test-scale", "version": "1.0.0"})
    root2 = _root_v2(repo, ["root-1.pem", "root-2.pem"])
    _send(broker, replace(release, roots={**release.roots, 2: root2}))
    _activate(up)
    assert json.loads((up.store.metadata / "root.json").read_text())["signed"]["version"] == 2
    up.conn.stop()


def test_refresh_renews_the_metadata_without_a_download(
        tmp_path: Path, broker: Mosquitto, repo: Path) -> None:
    from agent.fleet.publish import refresh

    cfg = BrokerConfig(url=broker.url)
    publish(repo, _bundle(tmp_path, "1.0.0"), GROUP, cfg, chunk_bytes=1024)
    up = _node(tmp_path, broker, repo)
    _activate(up)
    received = up.fetcher.bytes_received
    release = refresh(repo, GROUP, cfg)
    time.sleep(1.0)
    up.check()
    assert up.take_candidate() is None and up.status()["state"] == "active"
    assert up.fetcher.bytes_received == received  # nothing downloaded again
    local = json.loads((up.store.metadata / "timestamp.json").read_text())
    assert local["signed"]["version"] == release.version == 2
    up.conn.stop()


def test_rollback_republishes_an_earlier_bundle_as_a_newer_release(
        tmp_path: Path, broker: Mosquitto, repo: Path) -> None:
    from agent.fleet.publish import rollback
    from agent.fleet.repo import RepoError

    cfg = BrokerConfig(url=broker.url)
    publish(repo, _bundle(tmp_path, "1.0.0"), GROUP, cfg, chunk_bytes=1024)
    up = _node(tmp_path, broker, repo)
    first = _activate(up)
    publish(repo, _bundle(tmp_path, "2.0.0", 0.25), GROUP, cfg, chunk_bytes=1024)
    time.sleep(1.0)
    _activate(up)
    release = rollback(repo, GROUP, "1.0.0", cfg)
    assert release.version == 3
    time.sleep(1.0)
    assert _activate(up) == first  # the same bundle bytes, under a newer TUF version
    assert up.status()["version"] == "1.0.0"
    with pytest.raises(RepoError, match=r"known: 1\.0\.0, 2\.0\.0"):
        rollback(repo, GROUP, "0.9", cfg)
    up.conn.stop()


def _say(broker: Mosquitto, device: str, state: str, version: str) -> None:
    """The retained status a daemon would publish for ``device``."""
    status = {"v": 1, "state": "online", "site": "site", "device_id": device,
              "model": {"name": "test-scale", "version": version},
              "update": {"group": GROUP, "state": state, "version": version,
                         "reason": "failure_rate" if state == "rolled_back" else None}}
    send_retained(BrokerConfig(url=broker.url), [
        (Topics("site", device).status, json.dumps(status).encode())])


def test_a_canary_release_then_promote_and_halt(
        tmp_path: Path, broker: Mosquitto, repo: Path) -> None:
    from agent.fleet.rollout import RolloutError, halt, promote

    cfg = BrokerConfig(url=broker.url)
    publish(repo, _bundle(tmp_path, "1.0.0"), GROUP, cfg)
    canary, other = _node(tmp_path, broker, repo, "a"), _node(tmp_path, broker, repo, "b")
    base = _activate(canary)
    assert _activate(other) == base
    publish(repo, _bundle(tmp_path, "2.0.0", 0.25), GROUP, cfg, canaries=["site/a"])
    time.sleep(1.0)
    new = _activate(canary)
    other.check()
    assert other.take_candidate() is None and other.store.current_key == base
    _say(broker, "a", "rolled_back", "2.0.0")
    with pytest.raises(RolloutError, match=r"canary site/a rolled back 2\.0\.0"):
        promote(repo, GROUP, cfg)
    _say(broker, "a", "active", "2.0.0")
    promote(repo, GROUP, cfg)
    time.sleep(1.0)
    assert _activate(other) == new
    canary.check()  # the promoted release: the same target, nothing to do
    assert canary.take_candidate() is None
    # A second canary release, halted: the canary gets 2.0.0 back.
    publish(repo, _bundle(tmp_path, "3.0.0", 0.125), GROUP, cfg, canaries=["site/a"])
    time.sleep(1.0)
    _activate(canary)
    halt(repo, GROUP, cfg)
    time.sleep(1.0)
    assert _activate(canary) == new
    other.check()
    assert other.take_candidate() is None and other.store.current_key == new
    with pytest.raises(RolloutError, match="no canary release"):
        halt(repo, GROUP, cfg)
    canary.conn.stop()
    other.conn.stop()


@pytest.mark.parametrize("role", ["timestamp", "root"])
def test_after_a_key_rotation_the_old_key_no_longer_counts(
        tmp_path: Path, broker: Mosquitto, repo: Path, role: str) -> None:
    from cryptography.hazmat.primitives.serialization import load_pem_private_key
    from securesystemslib.signer import CryptoSigner
    from tuf.api.metadata import Metadata, Timestamp

    from agent.fleet.publish import refresh
    from agent.fleet.repo import SERIALIZER
    from agent.fleet.rotate import rotate_key

    cfg = BrokerConfig(url=broker.url)
    publish(repo, _bundle(tmp_path, "1.0.0"), GROUP, cfg)
    up = _node(tmp_path, broker, repo)
    _activate(up)
    old_timestamp_key = (repo / "keys" / "timestamp-1.pem").read_bytes()
    assert rotate_key(repo, role) == 2
    assert (repo / "keys" / "retired").is_dir()
    release = refresh(repo, GROUP, cfg)
    time.sleep(1.0)
    up.check()
    assert up.status()["state"] == "active", up.status()
    trusted = json.loads((up.store.metadata / "root.json").read_text())
    assert trusted["signed"]["version"] == 2
    if role != "timestamp":
        return
    # The retired timestamp key signs a newer timestamp: not trusted any more.
    md = Metadata[Timestamp].from_bytes(release.timestamp)
    md.signed.version += 1
    md.signatures.clear()
    md.sign(CryptoSigner(load_pem_private_key(old_timestamp_key, None)))  # type: ignore[arg-type]
    send_retained(cfg, [(FleetTopics(GROUP).metadata("timestamp"), md.to_bytes(SERIALIZER))])
    time.sleep(1.0)
    up.check()
    _rejected(up, "metadata_unsigned")
    up.conn.stop()


@pytest.mark.parametrize("role", ["snapshot", "targets"])
def test_mix_and_match_of_metadata_from_different_versions_is_rejected(
        tmp_path: Path, broker: Mosquitto, repo: Path, role: str) -> None:
    cfg = BrokerConfig(url=broker.url)
    publish(repo, _bundle(tmp_path, "1.0.0"), GROUP, cfg)
    up = _node(tmp_path, broker, repo)
    serving = _activate(up)
    older = sign_release(repo, GROUP, pack_bundle(_bundle(tmp_path, "2.0.0", 0.25)), {})
    newer = sign_release(repo, GROUP, pack_bundle(_bundle(tmp_path, "3.0.0", 0.125)),
                         {"bundle": "b", "version": "3.0.0"})
    # The newer timestamp (and snapshot), with the older version's file in its place.
    mixed = replace(newer, **{role: getattr(older, role)})
    _send(broker, mixed)
    time.sleep(1.0)
    up.check()
    _rejected(up, "metadata_replayed")
    assert up.store.current_key == serving
    up.conn.stop()
