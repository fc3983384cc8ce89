"""`iomt-agent fleet`: every subcommand has help; bad flags exit 2, refusals 1."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from agent.cli import main

SUBCOMMANDS = ("init-repo", "publish", "refresh", "status", "rollback", "promote", "halt",
               "rotate-key")


def test_fleet_help_lists_every_subcommand(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["fleet", "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert all(name in out for name in SUBCOMMANDS)


@pytest.mark.parametrize("name", SUBCOMMANDS)
def test_each_subcommand_has_help(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["fleet", name, "--help"])
    assert info.value.code == 0
    assert "Exit" in capsys.readouterr().out


def test_init_repo_then_refusals(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["fleet", "init-repo", str(tmp_path / "r"), "--root-threshold", "2"]) == 0
    assert "root.json" in capsys.readouterr().out
    assert (tmp_path / "r" / "root.json").is_file()
    assert main(["fleet", "init-repo", str(tmp_path / "r")]) == 1
    assert "not empty" in capsys.readouterr().err
    assert main(["fleet", "publish", "--repo", str(tmp_path / "r"), "--bundle", "x",
                 "--group", "g", "--broker", "http://nope"]) == 2
    assert "--broker http://nope" in capsys.readouterr().err
    assert main(["fleet", "publish", "--repo", str(tmp_path / "r"), "--bundle",
                 str(tmp_path / "missing"), "--group", "g", "--broker", "mqtt://127.0.0.1:1"]) == 1
    assert main(["fleet", "rotate-key", "--repo", str(tmp_path / "r"), "--role",
                 "timestamp"]) == 0
    assert (tmp_path / "r" / "metadata" / "2.root.json").is_file()


def test_broker_flags_refuse_plaintext_to_another_host_and_keys_without_tls(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    repo = tmp_path / "r"
    assert main(["fleet", "init-repo", str(repo)]) == 0
    publish = ["fleet", "publish", "--repo", str(repo), "--bundle", str(tmp_path / "none"),
               "--group", "g"]
    capsys.readouterr()
    assert main([*publish, "--broker", "mqtt://broker.example:1883"]) == 2
    err = capsys.readouterr().err
    assert "plaintext MQTT to a host that is not loopback" in err and "mqtts://" in err
    assert main(["fleet", "status", "--group", "g", "--broker", "mqtt://10.0.0.7"]) == 2
    capsys.readouterr()
    assert main([*publish, "--broker", "mqtt://127.0.0.1:1", "--cert", "op.pem"]) == 2
    assert "need TLS" in capsys.readouterr().err
    assert main([*publish, "--broker", "mqtts://127.0.0.1:1", "--key", "op.key"]) == 2
    assert "--key needs --cert" in capsys.readouterr().err
    # Explicitly allowed: accepted with a warning (the missing bundle fails next, exit 1).
    assert main([*publish, "--broker", "mqtt://broker.example:1883", "--allow-plaintext"]) == 1
    assert "warning: --allow-plaintext" in capsys.readouterr().err


def test_a_release_the_broker_never_got_leaves_the_repository_as_it_was(
        tmp_path: Path, mosquitto_factory: Any, capsys: pytest.CaptureFixture[str]) -> None:
    """The group's files keep describing what the nodes can fetch, so `refresh` after a
    failed `publish` does not sign a target the broker never got."""
    from tests.bundles import make_scale_bundle

    repo, broker = tmp_path / "r", mosquitto_factory()
    first, second = (make_scale_bundle(tmp_path / n, factor=f)
                     for n, f in (("a", 0.5), ("b", 0.25)))
    assert main(["fleet", "init-repo", str(repo)]) == 0
    assert main(["fleet", "publish", "--repo", str(repo), "--bundle", str(first), "--group",
                 "g", "--broker", broker.url]) == 0
    group = repo / "groups" / "g"
    kept = {f: f.read_bytes() for f in group.rglob("*") if f.is_file()}
    broker.proc.terminate()
    broker.proc.wait(5)
    capsys.readouterr()
    for command in (["publish", "--bundle", str(second)], ["refresh"]):
        assert main(["fleet", *command, "--repo", str(repo), "--group", "g", "--broker",
                     broker.url, "--timeout", "2"]) == 1
        err = capsys.readouterr().err
        assert f"cannot reach the broker {broker.url}: connection refused" in err, err
        assert {f: f.read_bytes() for f in group.rglob("*") if f.is_file()} == kept
