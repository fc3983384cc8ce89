"""The agent's seal keys: swapped whole by a reload, refused (old keys kept) when unusable,
read from ``$CREDENTIALS_DIRECTORY``; open secret files refuse the start; no key material
in any log line."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from structlog.testing import capture_logs

from agent.cloud.receiver import receiver_from_config
from agent.config import ConfigError, load_config
from agent.crypto import keys, seal
from agent.crypto.site_secret import create_site_secret
from agent.daemon.sealing import Sealer
from agent.daemon.service import Agent

CONFIG = """\
[agent]
site = "s"
device_id = "node-1"
state_dir = "state"
[edge]
url = "{edge_url}"
{edge_tls}
[cloud]
url = "mqtt://127.0.0.1:1884"
[model]
bundle = "bundle"
[seal]
recipient_public_key = "{recipient}"
device_signing_key = "{signing}"
[deid]
secret_file = "{deid}"
[receiver]
recipient_private_key = ["old-r.key", "new-r.key"]
trusted_devices = {{ node-1 = ["old-d.pub", "new-d.pub"] }}
"""


def _write(tmp: Path, recipient: str = "old-r.pub", signing: str = "old-d.key",
           deid: str = "site-deid.key", edge_url: str = "mqtt://127.0.0.1:1883",
           edge_tls: str = "") -> Path:
    path = tmp / "agent.toml"
    path.write_text(CONFIG.format(recipient=recipient, signing=signing, deid=deid,
                                  edge_url=edge_url, edge_tls=edge_tls))
    return path


@pytest.fixture
def node(tmp_path: Path) -> Path:
    """A directory with an old and a new recipient pair and device pair, a deid secret."""
    for name in ("old", "new"):
        r, r_pub = keys.generate_recipient_keypair()
        keys.save_private_key(tmp_path / f"{name}-r.key", r)
        keys.save_public_key(tmp_path / f"{name}-r.pub", r_pub)
        d = keys.generate_signing_key()
        keys.save_private_key(tmp_path / f"{name}-d.key", d)
        keys.save_public_key(tmp_path / f"{name}-d.pub", d.public_key())
    create_site_secret(tmp_path / "site-deid.key")
    return tmp_path


def _material(node: Path) -> list[str]:
    """Every private key and secret of the node as text that could reach a log: raw hex,
    base64 of the raw bytes, the armored / PEM bodies, the deid secret."""
    out = []
    for name in ("old-r.key", "new-r.key"):
        raw = keys.load_recipient_private_key(node / name).private_bytes_raw()
        out += [raw.hex(), raw[:24].hex(), base64.b64encode(raw).decode()[:32]]
        out += (node / name).read_text().splitlines()[1:-1]
    for name in ("old-d.key", "new-d.key"):
        d = keys.load_signing_key(node / name)
        raw = d.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                              serialization.NoEncryption())
        out += [raw.hex(), base64.b64encode(raw).decode()[:32]]
        out += (node / name).read_text().splitlines()[1:-1]
    out.append((node / "site-deid.key").read_text().strip())
    return [m for m in out if len(m) >= 16]


def test_reload_rotates_both_keys_and_the_receiver_opens_old_and_new(node: Path) -> None:
    config = load_config(_write(node))
    with capture_logs() as logs:
        sealer = Sealer(config.seal, "node-1")
        before = sealer(b"first", "m-1")
        _write(node, recipient="new-r.pub", signing="new-d.key")
        assert sealer.reload(load_config(node / "agent.toml").seal) is True
        after = sealer(b"second", "m-2")
        receiver = receiver_from_config(load_config(node / "agent.toml"), node / "out")
    new_ids = {"recipient_key_id": keys.load_recipient_public_key(node / "new-r.pub").key_id,
               "signing_key_id": keys.signing_key_id(keys.load_verify_key(node / "new-d.pub"))}
    assert {k: sealer.summary()[k] for k in new_ids} == new_ids
    [rotated] = [e for e in logs if e["event"] == "seal_keys_rotated"]
    assert {k: rotated[k] for k in new_ids} == new_ids
    assert set(rotated["previous"]) == {"recipient_key_id", "signing_key_id"}
    opened = [seal.open_envelope(e, recipients=receiver.recipients,
                                 trusted_devices=receiver.trusted_devices)
              for e in (before, after)]
    assert [o.plaintext for o in opened] == [b"first", b"second"]
    assert opened[0].recipient_key_id != opened[1].recipient_key_id
    assert opened[1].recipient_key_id == new_ids["recipient_key_id"]
    assert opened[1].signer_key_id == new_ids["signing_key_id"]
    text = repr(logs)
    assert not [m for m in _material(node) if m in text]


def test_a_reload_to_unusable_keys_is_refused_and_the_old_keys_keep_sealing(
        node: Path) -> None:
    sealer = Sealer(load_config(_write(node)).seal, "node-1")
    serving = sealer.summary()
    (node / "new-d.key").chmod(0o644)
    _write(node, recipient="new-r.pub", signing="new-d.key")
    with capture_logs() as logs:
        assert sealer.reload(load_config(node / "agent.toml").seal) is False
    [refused] = [e for e in logs if e["event"] == "seal_keys_refused"]
    assert str(node / "new-d.key") in refused["reason"] and "chmod 600" in refused["reason"]
    assert refused["serving"] == serving and sealer.summary() == serving
    (node / "new-d.key").chmod(0o600)
    assert not [m for m in _material(node) if m in repr(logs)]


def test_the_configured_aead_seals_and_a_reload_switches_it(node: Path) -> None:
    """``seal.aead`` names the cipher and ``seal.envelope_version`` the version: the
    envelope says which, the receiver opens both, the status shows them and a reload to the
    other cipher is logged."""
    path = _write(node)
    path.write_text(path.read_text().replace(
        "[deid]", 'aead = "chacha20-poly1305"\nenvelope_version = 2\n[deid]'))
    sealer = Sealer(load_config(path).seal, "node-1")
    chacha = sealer(b"first", "m-1")
    assert sealer.summary()["suite"] == "mlkem768-x25519-hkdfsha256-chacha20poly1305"
    assert sealer.summary()["aead_reason"] == "set by seal.aead"
    assert sealer.summary()["envelope_version"] == 2 and chacha[4] == 2
    path.write_text(path.read_text().replace('"chacha20-poly1305"', '"aes-256-gcm"').replace(
        "envelope_version = 2\n", ""))
    with capture_logs() as logs:
        assert sealer.reload(load_config(path).seal) is True
    [changed] = [e for e in logs if e["event"] == "seal_aead_changed"]
    assert (changed["aead"], changed["previous"]) == ("aes-256-gcm", "chacha20-poly1305")
    aes = sealer(b"second", "m-2")
    assert aes[4] == 1 and sealer.summary()["envelope_version"] == 1  # the default
    receiver = receiver_from_config(load_config(path), node / "out")
    opened = [seal.open_envelope(e, recipients=receiver.recipients,
                                 trusted_devices=receiver.trusted_devices)
              for e in (chacha, aes)]
    assert [(o.plaintext, o.suite.rsplit("-", 1)[1]) for o in opened] == [
        (b"first", "chacha20poly1305"), (b"second", "aes256gcm")]


def test_a_wrong_aead_is_refused_with_its_key_path(node: Path) -> None:
    path = _write(node)
    path.write_text(path.read_text().replace("[deid]", 'aead = "aes-128-cbc"\n[deid]'))
    with pytest.raises(ConfigError, match=r"seal\.aead: .*'chacha20-poly1305' \(got "
                       r"'aes-128-cbc'\)"):
        load_config(path)


def test_keys_come_from_credentials_directory_when_set(
        node: Path, tmp_path_factory: pytest.TempPathFactory,
        monkeypatch: pytest.MonkeyPatch) -> None:
    creds = tmp_path_factory.mktemp("credentials")  # as systemd's LoadCredential= copies
    for name in ("new-d.key", "site-deid.key"):
        (creds / name).write_bytes((node / name).read_bytes())
        (creds / name).chmod(0o400)
    path = _write(node, signing="${CREDENTIALS_DIRECTORY}/new-d.key",
                  deid="${CREDENTIALS_DIRECTORY}/site-deid.key")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    config = load_config(path)
    assert config.seal.device_signing_key == creds / "new-d.key"
    assert config.deid.secret_file == creds / "site-deid.key"
    sealer = Sealer(config.seal, "node-1")
    assert sealer.summary()["signing_key_id"] == keys.signing_key_id(
        keys.load_verify_key(node / "new-d.pub"))
    monkeypatch.delenv("CREDENTIALS_DIRECTORY")  # outside the service: <config>/credentials
    assert load_config(path).seal.device_signing_key == node / "credentials" / "new-d.key"


@pytest.mark.parametrize("name", ["key_file", "password_file"])
def test_the_agent_refuses_to_start_with_an_open_tls_key_or_password(
        node: Path, name: str) -> None:
    for f in ("ca.pem", "client.pem", "client.key", "edge.password"):
        (node / f).write_text("not read: refused before\n")
        (node / f).chmod(0o600)
    opened = node / ("client.key" if name == "key_file" else "edge.password")
    opened.chmod(0o640)
    tls = ('ca_file = "ca.pem"\ncert_file = "client.pem"\nkey_file = "client.key"\n'
           'username = "node-1"\npassword_file = "edge.password"\n')
    config = load_config(_write(node, edge_url="mqtts://127.0.0.1:8883", edge_tls=tls))
    with pytest.raises(keys.KeyFileError) as ei:
        Agent(config)
    message = str(ei.value)
    assert message.startswith(f"edge.{name}: {opened}")
    assert f"chmod 600 {opened}" in message and "(mode 0640)" in message


def test_signing_key_ids_are_public_fingerprints() -> None:
    key = Ed25519PrivateKey.generate()
    assert keys.signing_key_id(key) == keys.signing_key_id(key.public_key())
    assert keys.signing_key_id(key) == keys.key_id_for(key.public_key().public_bytes_raw())
