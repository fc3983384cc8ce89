"""Fleet pieces without a broker: URL to topic mapping, the manifest checks, the archive,
the activation switch, the config section and the reason registry."""

from __future__ import annotations

import io
import json
import re
import tarfile
from pathlib import Path

import pytest

from agent import errors
from agent.config import FleetSection, parse_config
from agent.fleet.activation import BundleStore
from agent.fleet.archive import extract_bundle, pack_bundle
from agent.fleet.fetcher import _read_manifest, metadata_topic, target_address
from agent.fleet.repo import RepoError, init_repo
from agent.fleet.verdict import UpdateRejected
from agent.transport.topics import FleetTopics, TopicError
from tests.bundles import make_scale_bundle

REPO = Path(__file__).resolve().parents[2]
T = FleetTopics("ward-a")
SHA = "ab" * 32


def test_metadata_urls_map_onto_the_group_topics() -> None:
    assert str(metadata_topic(T, "fleet:/metadata/timestamp.json")) == \
        "iomt/fleet/ward-a/metadata/timestamp"
    assert str(metadata_topic(T, "fleet:/metadata/7.root.json")) == \
        "iomt/fleet/ward-a/metadata/root/7"
    assert str(metadata_topic(T, "fleet:/metadata/3.snapshot.json")) == \
        "iomt/fleet/ward-a/metadata/snapshot/3"
    for bad in ("fleet:/metadata/x.json", "fleet:/metadata/1.evil.json", "http://x/1.root.json",
                "fleet:/metadata/0.root.json", "fleet:/metadata/a/b.json"):
        with pytest.raises(TopicError):
            metadata_topic(T, bad)


def test_target_urls_and_topics() -> None:
    assert target_address(f"fleet:/targets/{SHA}.bundle.tar") == (SHA, "bundle.tar")
    assert str(T.target_chunk(SHA, "bundle.tar", 3)) == \
        f"iomt/fleet/ward-a/targets/{SHA}/bundle.tar/3"
    assert T.target_filter(SHA, "bundle.tar").matches(str(T.target(SHA, "bundle.tar")))
    for bad in ("fleet:/targets/short.bundle.tar", f"fleet:/targets/{SHA}.a/b",
                "fleet:/targets/nohash"):
        with pytest.raises(TopicError):
            target_address(bad)
    with pytest.raises(TopicError):
        FleetTopics("a/b")
    with pytest.raises(TopicError):
        T.metadata("delegated", 1)


def test_a_manifest_is_checked_against_the_signed_length() -> None:
    ok = json.dumps({"length": 3000, "chunk_size": 1024, "chunks": 3}).encode()
    assert _read_manifest(ok, "t", 3000) == (3000, 1024, 3)
    from tuf.api.exceptions import DownloadLengthMismatchError

    with pytest.raises(DownloadLengthMismatchError):
        _read_manifest(ok, "t", 2999)
    for doc in ({"length": 3000, "chunk_size": 1024, "chunks": 2},
                {"length": 3000, "chunk_size": 0, "chunks": 3}, {"length": 1}):
        with pytest.raises(UpdateRejected) as info:
            _read_manifest(json.dumps(doc).encode(), "t", 3000)
        assert info.value.reason == "target_mismatch"


def test_packing_is_deterministic_and_round_trips(tmp_path: Path) -> None:
    bundle = make_scale_bundle(tmp_path / "b")
    first, second = pack_bundle(bundle), pack_bundle(bundle)
    assert first == second
    (tmp_path / "b.tar").write_bytes(first)
    out = extract_bundle(tmp_path / "b.tar", tmp_path / "out")
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in bundle.iterdir())
    (bundle / "link").symlink_to("bundle.json")
    with pytest.raises(UpdateRejected, match="regular files"):
        pack_bundle(bundle)


def _tar(tmp: Path, members: list[tarfile.TarInfo]) -> Path:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for m in members:
            tar.addfile(m, io.BytesIO(b"x" * m.size) if m.isfile() else None)
    path = tmp / "t.tar"
    path.write_bytes(buf.getvalue())
    return path


def _member(name: str, size: int = 1, kind: bytes = tarfile.REGTYPE) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.type = (size if kind == tarfile.REGTYPE else 0), kind
    return info


@pytest.mark.parametrize("members", [
    [_member("../up")], [_member("/abs")], [_member("a/../../up")],
    [_member("dev", kind=tarfile.CHRTYPE)], [_member("fifo", kind=tarfile.FIFOTYPE)],
    [_member("hard", kind=tarfile.LNKTYPE)], [_member("sym", kind=tarfile.SYMTYPE)],
    [_member(f"f{i}") for i in range(5)], [_member("big", size=2048)],
])
def test_unsafe_archives_are_refused(tmp_path: Path, members: list[tarfile.TarInfo]) -> None:
    with pytest.raises(UpdateRejected) as info:
        extract_bundle(_tar(tmp_path, members), tmp_path / "out", max_files=4, max_bytes=1024)
    assert info.value.reason == "unsafe_archive"
    assert not (tmp_path / "up").exists()


def test_activation_switches_current_and_keeps_previous(tmp_path: Path) -> None:
    store = BundleStore(tmp_path)
    store.prepare()
    assert store.current is None
    keys = []
    for key in ("k1", "k2", "k3"):
        staged = make_scale_bundle(store.staging / key)
        keys.append(store.install(staged, key))
        store.activate(keys[-1])
        assert store.current == keys[-1]
    assert (store.root / "previous").resolve() == keys[1]
    assert not keys[0].exists()  # only current and previous are kept
    assert (store.root / "current").is_symlink()


def test_the_fleet_section(tmp_path: Path) -> None:
    cfg = FleetSection(group="ward-a", root=Path("root.json"))
    assert cfg.check_interval_s == 300.0
    with pytest.raises(ValueError, match="topic level"):
        FleetSection(group="a/b", root=Path("root.json"))
    with pytest.raises(ValueError):
        FleetSection(group="g", root=Path("r"), surprise=1)  # type: ignore[call-arg]
    for name, field in FleetSection.model_fields.items():
        assert field.title and field.description, name
    text = """
[agent]
site = "s"
device_id = "d"
[edge]
url = "mqtt://localhost"
[cloud]
url = "mqtt://127.0.0.1"
[model]
bundle = "b"
[seal]
recipient_public_key = "r"
device_signing_key = "k"
[fleet]
group = "ward-a"
root = "fleet/root.json"
"""
    config = parse_config(text, base=tmp_path)
    assert config.fleet is not None and config.fleet.root == tmp_path / "fleet" / "root.json"
    assert config.client_id("fleet") == "iomt-s-d-fleet"
    assert parse_config(text.split("[fleet]")[0]).fleet is None


def test_init_repo_keys_are_private_and_the_root_is_written(tmp_path: Path) -> None:
    root = init_repo(tmp_path / "r", root_threshold=2, root_keys=3)
    doc = json.loads(root.read_text())
    assert doc["signed"]["roles"]["root"]["threshold"] == 2
    assert len(doc["signatures"]) == 3
    keys = sorted((tmp_path / "r" / "keys").iterdir())
    assert len(keys) == 6 and all(k.stat().st_mode & 0o777 == 0o600 for k in keys)
    assert (tmp_path / "r" / "keys").stat().st_mode & 0o777 == 0o700
    with pytest.raises(RepoError, match="not empty"):
        init_repo(tmp_path / "r")
    with pytest.raises(RepoError, match="threshold"):
        init_repo(tmp_path / "s", root_threshold=2, root_keys=1)


def test_every_update_reason_is_registered_and_documented() -> None:
    doc = (REPO / "docs" / "protocol.md").read_text(encoding="utf-8")
    table = set(re.findall(r"^\| `([a-z_]+)` \|", doc, re.M))
    assert not [c for c in errors.UPDATE_REASONS if c not in table]
    assert set(errors.UPDATE_REASONS) <= errors.REASONS
    with pytest.raises(ValueError, match=r"agent/errors\.py"):
        UpdateRejected("no_such", "x")
    assert issubclass(UpdateRejected, errors.AgentError)
    assert issubclass(RepoError, errors.AgentError)


def test_the_status_table() -> None:
    from agent.fleet.overview import render

    table = render([{"site": "s", "device_id": "d", "state": "online",
                     "model": {"name": "m", "version": "2"},
                     "update": {"group": "g", "state": "rejected", "version": "3",
                                "reason": "guard_failed", "detail": "below the floor"}}])
    header, line = table.splitlines()
    assert header.split() == ["device", "online", "model", "update", "last", "error"]
    assert line.split()[:5] == ["s/d", "yes", "m", "2", "rejected"]
    assert line.endswith("guard_failed: below the floor")


def test_rollback_settings_are_checked() -> None:
    cfg = FleetSection(group="g", root=Path("r"), rollback_window=20, rollback_failure_rate=0.2)
    assert (cfg.rollback_window, cfg.rollback_failure_rate) == (20, 0.2)
    for bad in ({"rollback_window": 0}, {"rollback_failure_rate": 1.0}):
        with pytest.raises(ValueError):
            FleetSection(group="g", root=Path("r"), **bad)  # type: ignore[arg-type]
