"""Key rotation on the receiving side: several recipient keys by key id, several signing
keys per device; the receiver config takes one file or a list."""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.config import ConfigError, parse_config
from agent.crypto import keyring, keys, seal
from agent.crypto.seal import EnvelopeError

OLD_R, OLD_R_PUB = keys.generate_recipient_keypair("x25519")
NEW_R, NEW_R_PUB = keys.generate_recipient_keypair()
OLD_D, NEW_D = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()


def _seal(recipient: keys.RecipientPublicKey, signer: Ed25519PrivateKey, mid: str) -> bytes:
    return seal.seal(b"x" * 100, recipient=recipient, signing_key=signer, device_id="node-1",
                     message_id=mid)


def test_either_recipient_key_and_either_device_key_opens() -> None:
    ring = {OLD_R.key_id: OLD_R, NEW_R.key_id: NEW_R}
    trusted = {"node-1": (OLD_D.public_key(), NEW_D.public_key())}
    for r_pub, signer in ((OLD_R_PUB, OLD_D), (NEW_R_PUB, OLD_D), (NEW_R_PUB, NEW_D)):
        opened = seal.open_envelope(_seal(r_pub, signer, "m"), recipients=ring,
                                    trusted_devices=trusted)
        assert opened.recipient_key_id == r_pub.key_id
        assert opened.signer_key_id == keys.signing_key_id(signer)
    # a key the receiver does not trust for this device is still refused
    with pytest.raises(EnvelopeError) as ei:
        seal.open_envelope(_seal(NEW_R_PUB, Ed25519PrivateKey.generate(), "m"),
                           recipients=ring, trusted_devices=trusted)
    assert ei.value.reason == "bad_signature"
    # the old recipient key retired: its envelopes are unknown_recipient, not garbage
    with pytest.raises(EnvelopeError) as ei:
        seal.open_envelope(_seal(OLD_R_PUB, NEW_D, "m"), recipients={NEW_R.key_id: NEW_R},
                           trusted_devices=trusted)
    assert ei.value.reason == "unknown_recipient"


def test_rings_load_from_files_and_describe_only_key_ids(tmp_path: Path) -> None:
    for name, key in (("old", OLD_R), ("new", NEW_R)):
        keys.save_private_key(tmp_path / f"{name}.key", key)
    for name, dkey in (("d-old", OLD_D), ("d-new", NEW_D)):
        keys.save_public_key(tmp_path / f"{name}.pub", dkey.public_key())
    ring = keyring.load_recipient_keys([tmp_path / "old.key", tmp_path / "new.key"])
    assert set(ring) == {OLD_R.key_id, NEW_R.key_id}
    devices = keyring.load_device_keys({"node-1": [tmp_path / "d-old.pub",
                                                   tmp_path / "d-new.pub"]})
    assert len(devices["node-1"]) == 2
    described = keyring.describe(ring, devices)
    assert described == {
        "recipient_key_ids": sorted([OLD_R.key_id, NEW_R.key_id]),
        "device_key_ids": {"node-1": [keys.signing_key_id(OLD_D), keys.signing_key_id(NEW_D)]},
    }
    (tmp_path / "new.key").chmod(0o640)  # one open key file spoils the ring: named, fix given
    with pytest.raises(keys.KeyFileError, match=r"new\.key.*chmod 600"):
        keyring.load_recipient_keys([tmp_path / "old.key", tmp_path / "new.key"])
    with pytest.raises(keys.KeyFileError, match="no key file"):
        keyring.load_recipient_keys([])


BASE = """\
[agent]
site = "s"
device_id = "node-1"
[edge]
url = "mqtt://127.0.0.1:1883"
[cloud]
url = "mqtt://127.0.0.1:1884"
[model]
bundle = "b"
[seal]
recipient_public_key = "r.pub"
device_signing_key = "d.key"
[receiver]
"""


def test_receiver_config_takes_one_file_or_a_list(tmp_path: Path) -> None:
    one = parse_config(BASE + 'recipient_private_key = "a.key"\n'
                       'trusted_devices = { node-1 = "d.pub" }\n', base=tmp_path)
    assert one.receiver is not None
    assert one.receiver.recipient_key_files() == [tmp_path / "a.key"]
    assert one.receiver.device_key_files() == {"node-1": [tmp_path / "d.pub"]}
    many = parse_config(BASE + 'recipient_private_key = ["a.key", "/k/b.key"]\n'
                        'trusted_devices = { node-1 = ["d1.pub", "d2.pub"], n2 = "e.pub" }\n',
                        base=tmp_path)
    assert many.receiver is not None
    assert many.receiver.recipient_key_files() == [tmp_path / "a.key", Path("/k/b.key")]
    assert many.receiver.device_key_files() == {
        "node-1": [tmp_path / "d1.pub", tmp_path / "d2.pub"], "n2": [tmp_path / "e.pub"]}
    for bad in ('recipient_private_key = []\ntrusted_devices = { n = "d.pub" }\n',
                'recipient_private_key = ["a", 3]\ntrusted_devices = { n = "d.pub" }\n'):
        with pytest.raises(ConfigError) as ei:
            parse_config(BASE + bad)
        [problem] = ei.value.problems
        assert problem.startswith("receiver.recipient_private_key: expected a file path or "
                                  "a non-empty list of file paths"), problem


def test_an_empty_trusted_devices_is_refused_saying_what_to_write() -> None:
    """With no device trusted every result went to the quarantine, without a word."""
    with pytest.raises(ConfigError) as ei:
        parse_config(BASE + 'recipient_private_key = "a.key"\ntrusted_devices = {}\n')
    [problem] = ei.value.problems
    assert problem.startswith("receiver.trusted_devices: empty: name each device with its "
                              "signing public key"), problem
