"""Tests for agent.keys: generation, key ids, file formats and permissions."""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.crypto import keys
from agent.crypto.keys import KeyFileError, RecipientKind

KINDS: tuple[RecipientKind, ...] = ("mlkem768-x25519", "x25519")


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


@pytest.mark.parametrize("kind", KINDS)
def test_generate_sizes_and_key_id(kind: RecipientKind) -> None:
    priv, pub = keys.generate_recipient_keypair(kind)
    assert priv.public == pub
    expected = {"mlkem768-x25519": (96, 1216), "x25519": (32, 32)}[kind]
    assert (len(priv.private_bytes_raw()), len(pub.raw)) == expected
    assert pub.key_id == hashlib.sha256(pub.raw).digest()[:16].hex()
    assert len(pub.key_id) == 32
    assert priv.key_id == pub.key_id
    assert priv.private_bytes_raw().hex()[:16] not in repr(priv)


def test_default_kind_is_hybrid() -> None:
    priv, _ = keys.generate_recipient_keypair()
    assert priv.kind == "mlkem768-x25519"


@pytest.mark.parametrize("kind", KINDS)
def test_recipient_save_load_roundtrip(tmp_path: Path, kind: RecipientKind) -> None:
    priv, pub = keys.generate_recipient_keypair(kind)
    keys.save_private_key(tmp_path / "r.key", priv)
    keys.save_public_key(tmp_path / "r.pub", pub)
    assert _mode(tmp_path / "r.key") == 0o600
    assert (tmp_path / "r.key").read_text().startswith("-----BEGIN IOMT HPKE PRIVATE KEY-----\n")
    assert (tmp_path / "r.pub").read_text().startswith("-----BEGIN IOMT HPKE PUBLIC KEY-----\n")
    priv2 = keys.load_recipient_private_key(tmp_path / "r.key")
    pub2 = keys.load_recipient_public_key(tmp_path / "r.pub")
    assert priv2.kind == pub2.kind == kind
    assert priv2.key_id == pub2.key_id == pub.key_id
    assert priv2.private_bytes_raw() == priv.private_bytes_raw()
    assert pub2 == pub
    # no temp files left behind
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.key", "r.pub"]


def test_private_key_created_0600_despite_permissive_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        priv, _ = keys.generate_recipient_keypair("x25519")
        keys.save_private_key(tmp_path / "r.key", priv)
        keys.save_private_key(tmp_path / "dev.key", Ed25519PrivateKey.generate())
    finally:
        os.umask(old)
    assert _mode(tmp_path / "r.key") == 0o600
    assert _mode(tmp_path / "dev.key") == 0o600


def test_refuses_overwrite_unless_asked(tmp_path: Path) -> None:
    a, _ = keys.generate_recipient_keypair("x25519")
    b, _ = keys.generate_recipient_keypair("x25519")
    path = tmp_path / "r.key"
    keys.save_private_key(path, a)
    with pytest.raises(KeyFileError, match="already exists"):
        keys.save_private_key(path, b)
    assert keys.load_recipient_private_key(path).key_id == a.key_id
    keys.save_private_key(path, b, overwrite=True)
    assert keys.load_recipient_private_key(path).key_id == b.key_id
    assert _mode(path) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["r.key"]


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660])
def test_load_refuses_open_private_key(tmp_path: Path, mode: int) -> None:
    priv, _ = keys.generate_recipient_keypair("x25519")
    path = tmp_path / "r.key"
    keys.save_private_key(path, priv)
    path.chmod(mode)
    with pytest.raises(KeyFileError) as ei:
        keys.load_recipient_private_key(path)
    msg = str(ei.value)
    assert str(path) in msg and "chmod 600" in msg and f"{mode:04o}" in msg
    dev = tmp_path / "dev.key"
    keys.save_private_key(dev, Ed25519PrivateKey.generate())
    dev.chmod(mode)
    with pytest.raises(KeyFileError, match="chmod 600"):
        keys.load_signing_key(dev)


def test_public_key_may_be_world_readable(tmp_path: Path) -> None:
    _, pub = keys.generate_recipient_keypair("x25519")
    keys.save_public_key(tmp_path / "r.pub", pub)
    (tmp_path / "r.pub").chmod(0o644)
    assert keys.load_recipient_public_key(tmp_path / "r.pub") == pub


def test_missing_file_message(tmp_path: Path) -> None:
    with pytest.raises(KeyFileError, match="not found") as ei:
        keys.load_recipient_private_key(tmp_path / "nope.key")
    assert "nope.key" in str(ei.value)
    with pytest.raises(KeyFileError, match="not found"):
        keys.load_verify_key(tmp_path / "nope.pub")


def test_wrong_kind_of_file(tmp_path: Path) -> None:
    priv, pub = keys.generate_recipient_keypair("x25519")
    dev = Ed25519PrivateKey.generate()
    keys.save_private_key(tmp_path / "r.key", priv)
    keys.save_public_key(tmp_path / "r.pub", pub)
    keys.save_private_key(tmp_path / "dev.key", dev)
    keys.save_public_key(tmp_path / "dev.pub", dev.public_key())
    (tmp_path / "r.pub").chmod(0o600)
    with pytest.raises(KeyFileError, match=r"wrong kind.*public key"):
        keys.load_recipient_private_key(tmp_path / "r.pub")
    with pytest.raises(KeyFileError, match="wrong kind"):
        keys.load_recipient_public_key(tmp_path / "r.key")
    with pytest.raises(KeyFileError, match="wrong kind"):
        keys.load_recipient_private_key(tmp_path / "dev.key")
    with pytest.raises(KeyFileError, match=r"r\.key"):
        keys.load_signing_key(tmp_path / "r.key")
    with pytest.raises(KeyFileError, match=r"r\.pub"):
        keys.load_verify_key(tmp_path / "r.pub")


def test_malformed_and_truncated(tmp_path: Path) -> None:
    priv, _ = keys.generate_recipient_keypair("mlkem768-x25519")
    path = tmp_path / "r.key"
    keys.save_private_key(path, priv)
    lines = path.read_text().splitlines()
    bad = tmp_path / "bad.key"
    fd = os.open(bad, os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, "\n".join([lines[0], *lines[1:-2], lines[-1]]).encode())  # drop a line
    os.close(fd)
    with pytest.raises(KeyFileError, match=r"bad\.key"):
        keys.load_recipient_private_key(bad)
    bad.write_text(lines[0] + "\n!!!not base64!!!\n" + lines[-1] + "\n")
    with pytest.raises(KeyFileError, match="base64"):
        keys.load_recipient_private_key(bad)


def test_ed25519_roundtrip(tmp_path: Path) -> None:
    dev = keys.generate_signing_key()
    keys.save_private_key(tmp_path / "dev.key", dev)
    keys.save_public_key(tmp_path / "dev.pub", dev.public_key())
    assert (tmp_path / "dev.key").read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    assert (tmp_path / "dev.pub").read_bytes().startswith(b"-----BEGIN PUBLIC KEY-----")
    dev2 = keys.load_signing_key(tmp_path / "dev.key")
    pub2 = keys.load_verify_key(tmp_path / "dev.pub")
    pub2.verify(dev2.sign(b"x"), b"x")
    assert pub2 == dev.public_key()


def test_key_ring() -> None:
    a, _ = keys.generate_recipient_keypair("x25519")
    b, _ = keys.generate_recipient_keypair()
    ring = keys.key_ring([a, b])
    assert ring == {a.key_id: a, b.key_id: b}


def test_a_public_key_named_as_the_private_one_is_called_by_its_kind_not_its_mode(
        tmp_path: Path) -> None:
    """Public keys are written 0644: "chmod 600" was the first answer, and a wrong one."""
    _priv, pub = keys.generate_recipient_keypair("x25519")
    keys.save_public_key(tmp_path / "r.pub", pub)
    (tmp_path / "r.pub").chmod(0o644)
    with pytest.raises(KeyFileError) as err:
        keys.load_recipient_private_key(tmp_path / "r.pub")
    assert "wrong kind of key file" in str(err.value) and "chmod" not in str(err.value)
    assert "(this is the public key of the pair)" in str(err.value)
