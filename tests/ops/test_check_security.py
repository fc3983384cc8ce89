"""``doctor``'s security posture (``agent.ops.check_security``) on ``iomt-agent init``
directories: de-identification and its site secret, the receiver's keys by key id, and
the summary line over the links, de-identification and the seal key."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.config import load_config
from agent.crypto import keys
from agent.ops.check_security import check_deid, check_posture, check_receiver_keys
from agent.ops.scaffold import InitOptions, write_directory
from tests.bundles import make_scale_bundle


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_scale_bundle(tmp_path_factory.mktemp("bundle") / "scale")


def _node(tmp: Path, bundle: Path, edge: str = "mqtt://127.0.0.1:1883",
          cloud: str = "mqtt://127.0.0.1:1884") -> Path:
    return write_directory(InitOptions(directory=tmp / "node", edge_url=edge, cloud_url=cloud,
                                       bundle=bundle))


def test_deid_on_needs_its_secret_present_and_private(tmp_path: Path, bundle: Path) -> None:
    config = _node(tmp_path, bundle)
    [found] = check_deid(load_config(config))
    assert found.verdict == "ok" and "PS3.15 basic profile on (options: none)" in found.detail
    secret = tmp_path / "node" / "keys" / "site-deid.key"
    secret.chmod(0o644)
    [found] = check_deid(load_config(config))
    assert found.verdict == "fail" and f"chmod 600 {secret}" in found.detail
    secret.unlink()
    [found] = check_deid(load_config(config))
    assert found.verdict == "fail" and "not found" in found.detail and "0600" in found.fix


def test_deid_off_and_plaintext_off_loopback_are_posture_warnings(
        tmp_path: Path, bundle: Path) -> None:
    config = _node(tmp_path, bundle)
    [posture] = check_posture(load_config(config))
    assert posture.verdict == "ok", posture
    assert posture.detail.startswith("edge plaintext on loopback; cloud plaintext on loopback; "
                                     "de-identification on; sealed to mlkem768-x25519 key ")
    text = config.read_text().replace("enabled = true", "enabled = false")
    text = text.replace('url = "mqtt://127.0.0.1:1884"',
                        'url = "mqtt://cloud.example.org"\nallow_plaintext = true')
    config.write_text(text)
    cfg = load_config(config)
    [deid] = check_deid(cfg)
    assert deid.verdict == "warn" and "the cloud sees names, ids, dates" in deid.detail
    [posture] = check_posture(cfg)
    assert posture.verdict == "warn"
    assert "cloud PLAINTEXT off loopback" in posture.detail
    assert "de-identification OFF" in posture.detail
    assert posture.fix.startswith("cloud.url is plaintext MQTT off loopback; "
                                  "de-identification is off")


def test_mutual_tls_is_named(tmp_path: Path, bundle: Path) -> None:
    config = _node(tmp_path, bundle)
    config.write_text(config.read_text().replace(
        'url = "mqtt://127.0.0.1:1883"',
        'url = "mqtts://edge.example.org"\ncert_file = "c.pem"\nkey_file = "c.key"', 1))
    [posture] = check_posture(load_config(config))
    assert posture.detail.startswith("edge mutual TLS; cloud plaintext on loopback")


def test_receiver_keys_are_listed_by_key_id(tmp_path: Path, bundle: Path) -> None:
    config = _node(tmp_path, bundle)
    k = tmp_path / "node" / "keys"
    new, new_pub = keys.generate_recipient_keypair()
    keys.save_private_key(k / "cloud-recipient-2.key", new)
    config.write_text(config.read_text().replace(
        'recipient_private_key = "keys/cloud-recipient.key"',
        'recipient_private_key = ["keys/cloud-recipient.key", "keys/cloud-recipient-2.key"]'))
    found = check_receiver_keys(load_config(config))
    assert [f.verdict for f in found] == ["ok", "ok", "ok"]
    assert found[1].detail.endswith(f"key id {new_pub.key_id}")
    assert found[2].subject == "receiver.trusted_devices.edge-1"
    (k / "cloud-recipient-2.key").chmod(0o640)
    found = check_receiver_keys(load_config(config))
    assert [f.verdict for f in found] == ["ok", "fail", "ok"]
    assert "chmod 600" in found[1].detail
