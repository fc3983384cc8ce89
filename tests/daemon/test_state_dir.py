"""``agent.state_dir``: created 0700 when missing, refused in words when it cannot be used
(a file in the way, a directory this user cannot write), by ``run`` and ``config check``."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from agent.daemon.state_dir import StateDirError, prepare_state_dir, state_dir_problem


def test_a_missing_directory_is_created_private(tmp_path: Path) -> None:
    state = tmp_path / "a" / "state"
    assert state_dir_problem(state) is None and not state.exists()  # the check changes nothing
    prepare_state_dir(state)
    assert state.is_dir() and stat.S_IMODE(state.stat().st_mode) == 0o700
    prepare_state_dir(state)  # an existing one is fine


@pytest.mark.parametrize("where", ["state", "state/below"])
def test_a_file_in_the_way_is_named(tmp_path: Path, where: str) -> None:
    (tmp_path / "state").write_text("")
    with pytest.raises(StateDirError) as err:
        prepare_state_dir(tmp_path / where)
    assert f"{tmp_path / 'state'} is a file, not a directory" in str(err.value)
    assert str(err.value).startswith(f"agent.state_dir {tmp_path / where}")
    assert "can write" in str(err.value)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes any directory")
def test_a_directory_this_user_cannot_write_is_named(tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    assert "not writable by user" in (state_dir_problem(locked) or "")
    assert "cannot create it in" in (state_dir_problem(locked / "state") or "")


def test_run_and_config_check_refuse_it_before_writing_anything(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from agent.cli import main
    from tests.bundles import make_scale_bundle

    bundle = make_scale_bundle(tmp_path / "scale")
    url = "mqtt://127.0.0.1:9"
    assert main(["init", str(tmp_path / "node"), "--edge-url", url, "--cloud-url", url,
                 "--bundle", str(bundle)]) == 0
    config = tmp_path / "node" / "agent.toml"
    text = config.read_text().replace('state_dir = "state"', 'state_dir = "blocked/state"')
    config.write_text(text)
    (tmp_path / "node" / "blocked").write_text("")
    capsys.readouterr()
    assert main(["config", "check", str(config)]) == 2
    assert "agent.state_dir" in capsys.readouterr().err
    assert main(["run", "--config", str(config)]) == 2  # run configures its own logging
    refused = [json.loads(line) for line in capsys.readouterr().err.splitlines()
               if '"cannot_start"' in line]
    assert refused and "blocked is a file, not a directory" in refused[0]["error"], refused
    assert sorted(p.name for p in (tmp_path / "node").iterdir()) == [
        "agent.toml", "blocked", "keys", "state"]  # no store, no runtime cache anywhere


def test_a_second_agent_on_the_same_state_dir_is_refused_naming_the_first(
        tmp_path: Path) -> None:
    """Two agents on one config both ran and knocked each other off the brokers every
    second; the second now stops at start and says who holds the directory."""
    from agent.daemon.state_dir import StateLock

    first = StateLock(tmp_path)
    with pytest.raises(StateDirError) as err:
        StateLock(tmp_path)
    assert f"another agent (pid {os.getpid()}) is using it" in str(err.value)
    first.release()
    StateLock(tmp_path).release()  # free again once the first is gone
