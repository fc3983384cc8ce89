"""``init`` and ``config check`` refuse what ``run`` would refuse, before anything runs:
a ``--bundle`` that is not one, private keys open to others, a runtime the bundle has no
file for; ``init`` makes the state directory private."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from agent.cli import main
from agent.config import load_config
from agent.ops import doctor
from tests.bundles import make_scale_bundle
from tests.model.test_refusal import saturating_copy

REPO = Path(__file__).resolve().parents[2]
URL = "mqtt://127.0.0.1:9"


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_scale_bundle(tmp_path_factory.mktemp("bundle") / "scale")


def init(directory: Path, bundle: Path | str) -> int:
    return main(["init", str(directory), "--edge-url", URL, "--cloud-url", URL,
                 "--bundle", str(bundle)])


def check(config: Path, capsys: pytest.CaptureFixture[str],
          *flags: str) -> tuple[int, str, str]:
    code = main(["config", "check", *flags, str(config)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_init_refuses_a_bundle_that_is_not_there(tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    assert init(tmp_path / "node", tmp_path / "nope") == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: --bundle {tmp_path / 'nope'}: no such directory")
    assert not (tmp_path / "node").exists()  # nothing written, no "next: iomt-agent run"
    (tmp_path / "empty").mkdir()
    assert init(tmp_path / "node", tmp_path / "empty") == 1
    assert "bundle.json not found" in capsys.readouterr().err


def test_init_makes_the_state_directory_private(tmp_path: Path, bundle: Path) -> None:
    state = tmp_path / "node" / "state"
    state.mkdir(parents=True, mode=0o755)
    assert main(["init", str(tmp_path / "node"), "--edge-url", URL, "--cloud-url", URL,
                 "--bundle", str(bundle), "--force"]) == 0
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    found = doctor.check_disk(load_config(tmp_path / "node" / "agent.toml"))
    state_findings = [f for f in found if f.subject == "agent.state_dir"]
    assert [f.verdict for f in state_findings] == ["ok"], state_findings


def test_config_check_says_what_it_checked_and_that_the_guard_did_not_run(
        tmp_path: Path, bundle: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert init(tmp_path / "node", bundle) == 0
    capsys.readouterr()
    code, out, _ = check(tmp_path / "node" / "agent.toml", capsys)
    assert code == 0
    assert "every file matches its sha256" in out
    assert "the int8 accuracy guard was not run" in out
    code, out, _ = check(tmp_path / "node" / "agent.toml", capsys, "--guard")
    assert code == 0 and "guard: onnxruntime fp32" in out and "not run" not in out


def test_a_private_key_open_to_others_is_refused_before_the_model_loads(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # A bundle the guard would refuse: `run` must name the key, not the model.
    assert init(tmp_path / "node", saturating_copy(tmp_path / "bundle")) == 0
    capsys.readouterr()
    config = tmp_path / "node" / "agent.toml"
    config.write_text(config.read_text().replace('backend = "auto"', 'backend = "onnxruntime"')
                      .replace('format = "auto"', 'format = "json"'))
    key = tmp_path / "node" / "keys" / "device-signing.key"
    key.chmod(0o644)
    code, _, err = check(config, capsys)
    assert code == 2
    assert "seal.device_signing_key" in err and f"chmod 600 {key}" in err
    run = subprocess.run([sys.executable, "-m", "agent", "run", "--config", str(config)],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2
    events = [json.loads(line) for line in run.stderr.splitlines()]
    assert [e["event"] for e in events] == ["cannot_start"], events
    assert "chmod 600" in events[0]["error"]


def test_config_check_covers_receiver_keys_broker_files_and_the_runtime(
        tmp_path: Path, bundle: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert init(tmp_path / "node", bundle) == 0
    capsys.readouterr()
    node = tmp_path / "node"
    config = node / "agent.toml"
    (node / "keys" / "cloud-recipient.key").chmod(0o640)
    password = node / "edge.password"
    password.write_text("secret\n")
    os.chmod(password, 0o644)
    text = config.read_text().replace(
        'protocol = "5"\n', 'protocol = "5"\nusername = "u"\npassword_file = "edge.password"\n'
        'ca_file = "missing-ca.pem"\n', 1)
    config.write_text(text.replace('backend = "auto"', 'backend = "litert"'))
    code, _, err = check(config, capsys)
    assert code == 2
    assert "receiver.recipient_private_key" in err and "chmod 600" in err
    assert "edge.ca_file: file" in err and "missing-ca.pem not found" in err
    # `run` refuses a password file others can read, so config check does too
    assert f"  - edge.password_file: {password} is accessible by group/others" in err
    assert "model.backend: bundle test-scale has no file for 'litert'" in err


def test_config_check_checks_the_deid_secret_and_warns_when_deid_is_off(
        tmp_path: Path, bundle: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert init(tmp_path / "node", bundle) == 0
    capsys.readouterr()
    config = tmp_path / "node" / "agent.toml"
    secret = tmp_path / "node" / "keys" / "site-deid.key"
    secret.chmod(0o640)
    code, _, err = check(config, capsys)
    assert code == 2 and "deid.secret_file" in err and f"chmod 600 {secret}" in err
    secret.unlink()
    code, _, err = check(config, capsys)
    assert code == 2 and "de-identification secret not found" in err
    config.write_text(config.read_text().replace("enabled = true", "enabled = false"))
    code, _, err = check(config, capsys)
    assert code == 0 and "warning: deid.enabled = false" in err


def test_config_check_refuses_a_fleet_root_that_is_missing_or_not_a_signed_root(
        tmp_path: Path, bundle: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Found at check time, not later as metadata_invalid in the status."""
    from agent.fleet.repo import init_repo

    root = init_repo(tmp_path / "repo")
    assert main(["init", str(tmp_path / "node"), "--edge-url", URL, "--cloud-url", URL,
                 "--bundle", str(bundle), "--fleet-group", "ward-a",
                 "--fleet-root", str(root)]) == 0
    config = tmp_path / "node" / "agent.toml"
    installed = tmp_path / "node" / "fleet" / "root.json"
    assert check(config, capsys)[0] == 0
    tampered = json.loads(installed.read_text())
    tampered["signed"]["version"] = 2  # the signature no longer covers it
    for text, says in ((json.dumps(tampered), "is not a signed TUF root"),
                       ("{", "is not a signed TUF root"), (None, "not found")):
        if text is None:
            installed.unlink()
        else:
            installed.write_text(text)
        code, _out, err = check(config, capsys)
        assert code == 2, err
        assert f"fleet.root: {installed}: no such file" in err if text is None \
            else f"fleet.root: {installed} {says}" in err
        assert "fleet init-repo" in err
