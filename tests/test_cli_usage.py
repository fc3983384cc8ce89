"""The command line refuses a newcomer's mistakes with a sentence and the documented exit
code, before anything is written or sent: numbers out of range (argparse, exit 2), a file
where a directory goes and the reverse, a private key offered as the fleet's root."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.cli import main
from tests.bundles import make_scale_bundle

URL = "mqtt://127.0.0.1:9"


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("usage")
    bundle = make_scale_bundle(base / "scale")
    assert main(["init", str(base / "node"), "--edge-url", URL, "--cloud-url", URL,
                 "--bundle", str(bundle)]) == 0
    return base / "node" / "agent.toml"


def _code(argv: list[str]) -> int:
    """The exit status, returned or raised (a config that cannot be read exits at once)."""
    try:
        return main(argv)
    except SystemExit as ended:
        return int(ended.code or 0)


@pytest.mark.parametrize(("argv", "says"), [
    (["fleet", "publish", "--repo", "r", "--bundle", "b", "--group", "g", "--broker", URL,
      "--canary", "0"], "argument --canary: must be 1 or more (got 0)"),
    (["fleet", "publish", "--repo", "r", "--bundle", "b", "--group", "g", "--broker", URL,
      "--chunk-kib", "-5"], "argument --chunk-kib: must be 1 or more (got -5)"),
    (["fleet", "init-repo", "r", "--root-threshold", "0"], "--root-threshold: must be 1 or"),
    (["doctor", "--config", "x", "--timeout", "-1"], "--timeout: must be more than 0"),
    (["send", "--config", "x", "p", "--timeout", "0"], "--timeout: must be more than 0"),
    (["receive", "--config", "x", "--out", "o", "--count", "-1"], "--count: must be 1 or"),
    (["model", "verify", "b", "--threads", "-3"], "--threads: must be 0 or more (got -3)"),
    (["doctor", "--config", "x", "--timeout", "soon"], "'soon' is not a number"),
])
def test_a_number_out_of_range_is_a_usage_error(argv: list[str], says: str,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as ended:
        main(argv)
    assert ended.value.code == 2
    assert says in capsys.readouterr().err


def test_config_check_names_a_path_that_is_not_a_config(
        node: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "scan.dcm").write_bytes(b"\0" * 128 + b"DICM\xff\xfe")
    assert _code(["config", "check", str(tmp_path / "scan.dcm")]) == 2
    assert "not a text file: a config is UTF-8 TOML" in capsys.readouterr().err
    assert _code(["config", "check", str(tmp_path)]) == 2
    assert f"is a directory: give the TOML file in it (e.g. {tmp_path / 'agent.toml'})" \
        in capsys.readouterr().err
    assert main(["config", "check", "--config", str(node)]) == 0  # as run and doctor take it


def test_send_refuses_a_bad_source_and_nothing_to_send(
        node: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "empty").mkdir()
    assert main(["send", "--config", str(node), str(tmp_path / "empty")]) == 1
    assert f"no files in {tmp_path / 'empty'}" in capsys.readouterr().err
    (tmp_path / "one.dcm").write_bytes(b"x")
    assert main(["send", "--config", str(node), str(tmp_path / "one.dcm"),
                 "--source", "a/b"]) == 2
    assert "--source a/b: source 'a/b' is not a valid topic level" in capsys.readouterr().err


def test_receive_refuses_an_out_that_is_a_file(
        node: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "afile").write_text("")
    assert main(["receive", "--config", str(node), "--out", str(tmp_path / "afile"),
                 "--count", "1", "--timeout", "1"]) == 2
    assert "a file is in the way: give a directory for the results" in capsys.readouterr().err


def test_a_file_where_a_directory_goes(node: Path, tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    afile = tmp_path / "afile"
    afile.write_text("")
    assert main(["init", str(afile), "--edge-url", URL, "--cloud-url", URL]) == 1
    assert f"{afile} is a file: give a directory to create" in capsys.readouterr().err
    assert main(["fleet", "init-repo", str(afile)]) == 1
    assert f"{afile} is a file: give a new directory" in capsys.readouterr().err
    bundle_json = next(node.parent.parent.glob("scale/bundle.json"))
    assert main(["model", "verify", str(bundle_json)]) == 2
    assert "is a file, not a model bundle: give the directory that holds bundle.json" \
        in capsys.readouterr().err
    assert main(["init", str(tmp_path / "n"), "--edge-url", URL, "--cloud-url", URL,
                 "--bundle", str(bundle_json)]) == 1
    assert "a file: give the bundle's directory" in capsys.readouterr().err


def test_a_private_key_is_refused_as_the_fleet_root_and_never_copied(
        node: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["fleet", "init-repo", str(tmp_path / "repo")]) == 0
    capsys.readouterr()
    bundle = next(node.parent.parent.glob("scale"))
    for given, says in ((tmp_path / "repo" / "keys" / "root-1.pem", "holds a private key"),
                        (tmp_path / "repo", "is a directory"),
                        (tmp_path / "repo" / "repo.json", "is not a signed TUF root")):
        assert main(["init", str(tmp_path / "n"), "--edge-url", URL, "--cloud-url", URL,
                     "--bundle", str(bundle), "--fleet-group", "ward-a",
                     "--fleet-root", str(given)]) == 2
        assert f"--fleet-root {given} {says}" in capsys.readouterr().err
        assert not (tmp_path / "n").exists()
