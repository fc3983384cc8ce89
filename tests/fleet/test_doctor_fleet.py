"""The doctor's [fleet] lines: a good root, a missing or unsigned one, no section, a clock
behind the node's floor."""

from __future__ import annotations

import json
from pathlib import Path

from agent.config import Config, parse_config
from agent.fleet.repo import init_repo
from agent.ops.check_fleet import check_fleet

BASE = """
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
"""


def _config(tmp: Path, root: Path | None) -> Config:
    extra = f'[fleet]\ngroup = "ward-a"\nroot = "{root}"\n' if root else ""
    return parse_config(BASE + extra, base=tmp)


def test_no_section_no_line(tmp_path: Path) -> None:
    assert check_fleet(_config(tmp_path, None)) == []


def test_a_good_root(tmp_path: Path) -> None:
    root = init_repo(tmp_path / "repo", root_threshold=2, root_keys=3)
    [finding] = check_fleet(_config(tmp_path, root))
    assert finding.verdict == "ok", finding
    assert "threshold 2 of 3" in finding.detail and "ward-a" in finding.detail


def test_a_clock_behind_the_floor_is_warned(tmp_path: Path) -> None:
    from datetime import UTC, datetime

    root = init_repo(tmp_path / "repo")
    found = check_fleet(_config(tmp_path, root), now=datetime(1970, 1, 1, tzinfo=UTC))
    assert [f.verdict for f in found] == ["ok", "warn"]
    assert found[1].subject == "fleet clock" and "1970-01-01" in found[1].detail
    assert "NTP" in found[1].fix


def test_a_missing_or_unsigned_root_fails(tmp_path: Path) -> None:
    [missing] = check_fleet(_config(tmp_path, tmp_path / "nope.json"))
    assert missing.verdict == "fail" and "cannot read" in missing.detail
    root = init_repo(tmp_path / "repo")
    doc = json.loads(root.read_text())
    doc["signatures"] = []
    bad = tmp_path / "unsigned.json"
    bad.write_text(json.dumps(doc))
    [unsigned] = check_fleet(_config(tmp_path, bad))
    assert unsigned.verdict == "fail" and "threshold" in unsigned.detail
    assert "fleet init-repo" in unsigned.fix


def test_init_writes_the_fleet_section(tmp_path: Path) -> None:
    import pytest

    from agent.config import ConfigError, load_config
    from agent.ops.scaffold import InitOptions, write_directory
    from tests.bundles import make_scale_bundle

    root = init_repo(tmp_path / "repo")
    bundle = make_scale_bundle(tmp_path / "b")
    opts = InitOptions(tmp_path / "node", "mqtt://localhost", "mqtt://127.0.0.1", bundle=bundle,
                       fleet_group="ward-a", fleet_root=root)
    config = load_config(write_directory(opts))
    assert config.fleet is not None and config.fleet.group == "ward-a"
    assert config.fleet.root.read_bytes() == root.read_bytes()
    assert check_fleet(config)[0].verdict == "ok"
    with pytest.raises(ConfigError, match="go together"):
        write_directory(InitOptions(tmp_path / "n2", "mqtt://localhost", "mqtt://127.0.0.1",
                                    bundle=bundle, fleet_group="ward-a"))
    with pytest.raises(ConfigError, match=r"fleet\.group"):
        write_directory(InitOptions(tmp_path / "n3", "mqtt://localhost", "mqtt://127.0.0.1",
                                    bundle=bundle, fleet_group="a/b", fleet_root=root))
