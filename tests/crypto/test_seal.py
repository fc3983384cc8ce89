"""Tests for agent.seal: round trip, tamper detection, header binding, error reasons."""

from __future__ import annotations

import contextlib
import json
import random
import struct
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.crypto import keys, seal
from agent.crypto.keys import RecipientKind, RecipientPrivateKey, RecipientPublicKey
from agent.crypto.seal import EnvelopeError

KINDS: tuple[RecipientKind, ...] = ("mlkem768-x25519", "x25519")
PAYLOAD = bytes(random.Random(7).getrandbits(8) for _ in range(4096))
DEVICE = "edge-01"
_RECIPIENTS = {k: keys.generate_recipient_keypair(k) for k in KINDS}
_DEVICE_KEY = Ed25519PrivateKey.generate()


def _recipient(kind: RecipientKind) -> tuple[RecipientPrivateKey, RecipientPublicKey]:
    return _RECIPIENTS[kind]


def _seal(kind: RecipientKind, payload: bytes = PAYLOAD, **kw: object) -> bytes:
    args: dict[str, object] = {
        "recipient": _recipient(kind)[1],
        "signing_key": _DEVICE_KEY,
        "device_id": DEVICE,
        "message_id": "m-1",
    }
    args.update(kw)
    return seal.seal(payload, **args)  # type: ignore[arg-type]


def _open(data: bytes, kind: RecipientKind = "mlkem768-x25519") -> seal.Opened:
    priv = _recipient(kind)[0]
    return seal.open_envelope(
        data,
        recipients={priv.key_id: priv},
        trusted_devices={DEVICE: _DEVICE_KEY.public_key()},
    )


def _reason(data: bytes, kind: RecipientKind = "mlkem768-x25519") -> str:
    with pytest.raises(EnvelopeError) as ei:
        _open(data, kind)
    return ei.value.reason


def _split(data: bytes) -> tuple[int, int]:
    """Return (header end, ciphertext end) offsets."""
    (hlen,) = struct.unpack_from(">H", data, 5)
    (clen,) = struct.unpack_from(">I", data, 7 + hlen)
    return 7 + hlen, 7 + hlen + 4 + clen


@pytest.mark.parametrize("kind", KINDS)
def test_round_trip(kind: RecipientKind) -> None:
    when = datetime(2025, 3, 4, 5, 6, 7, 891234, tzinfo=timezone(timedelta(hours=2)))
    data = _seal(kind, created=when, content_type="application/json")
    opened = _open(data, kind)
    assert opened.plaintext == PAYLOAD
    assert opened.device_id == DEVICE and opened.message_id == "m-1"
    assert opened.content_type == "application/json"
    assert opened.created == datetime(2025, 3, 4, 3, 6, 7, 891000, tzinfo=UTC)
    assert opened.recipient_key_id == _recipient(kind)[1].key_id
    assert (
        opened.suite
        == {
            "mlkem768-x25519": "mlkem768-x25519-hkdfsha256-aes256gcm",
            "x25519": "x25519-hkdfsha256-aes256gcm",
        }[kind]
    )
    assert PAYLOAD.hex()[:32] not in repr(opened)
    assert seal.peek_header(data) == seal.EnvelopeHeader(
        **{k: getattr(opened, k) for k in seal.EnvelopeHeader.__dataclass_fields__}
    )


@pytest.mark.parametrize("kind", KINDS)
def test_chacha20_round_trip_names_its_suite(kind: RecipientKind) -> None:
    data = _seal(kind, aead="chacha20-poly1305")
    opened = _open(data, kind)
    assert opened.plaintext == PAYLOAD
    assert opened.suite == f"{kind}-hkdfsha256-chacha20poly1305"
    assert seal.SUITES[opened.suite] == (kind, "chacha20-poly1305")
    hend, cend = _split(data)
    aes_hend, aes_cend = _split(_seal(kind))
    assert cend - hend == aes_cend - aes_hend  # the same enc and 16-byte tag as AES-256-GCM


@pytest.mark.parametrize("kind", KINDS)
def test_a_suite_relabelled_to_the_other_aead_fails_to_decrypt(kind: RecipientKind) -> None:
    """The header names the AEAD and is bound to the ciphertext: an envelope re-signed with
    the other AEAD's suite name opens with neither."""
    for aead, other in (("aes-256-gcm", "chacha20poly1305"), ("chacha20-poly1305", "aes256gcm")):
        forged = _resign_with_header(_seal(kind, aead=aead),
                                     {"suite": f"{kind}-hkdfsha256-{other}"})
        assert _reason(forged, kind) == "decrypt_failed"


def test_every_suite_name_is_the_kem_kdf_and_aead() -> None:
    assert sorted(seal.SUITES) == [
        "mlkem768-x25519-hkdfsha256-aes256gcm", "mlkem768-x25519-hkdfsha256-chacha20poly1305",
        "x25519-hkdfsha256-aes256gcm", "x25519-hkdfsha256-chacha20poly1305"]


def test_layout_and_canonical_header() -> None:
    data = _seal("mlkem768-x25519", created=datetime(2025, 1, 1, tzinfo=UTC))
    assert data[:5] == b"IOMT\x01"
    hend, cend = _split(data)
    header = data[7:hend]
    obj = json.loads(header)
    assert header == json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()
    assert obj["created"] == "2025-01-01T00:00:00.000Z" and obj["v"] == 1
    # enc (1120) + plaintext + GCM tag (16)
    assert cend - hend - 4 == 1120 + len(PAYLOAD) + 16
    assert len(data) == cend + 64


@pytest.mark.parametrize("kind", KINDS)
def test_empty_and_large_payload(kind: RecipientKind) -> None:
    for payload in (b"", bytes(131 * 1024)):
        assert _open(_seal(kind, payload), kind).plaintext == payload


@pytest.mark.parametrize("version", [1, 2])
def test_tamper_every_region_rejected(version: int) -> None:
    data = _seal("x25519", payload=b"secret", version=version)
    hend, cend = _split(data)
    rng = random.Random(1)
    positions = set(range(0, hend)) | set(range(cend - 40, len(data)))
    positions |= set(rng.sample(range(hend, cend), 40))
    for pos in sorted(positions):
        for flip in (0x01, 0x80):
            bad = bytearray(data)
            bad[pos] ^= flip
            with pytest.raises(EnvelopeError) as ei:
                _open(bytes(bad), "x25519")
            assert "secret" not in str(ei.value)
            assert ei.value.reason in {
                "malformed",
                "unsupported_version",
                "bad_signature",
                "unknown_device",
            }


@settings(max_examples=200, deadline=None)
@given(pos=st.integers(min_value=0), flip=st.integers(min_value=1, max_value=255))
def test_tamper_hypothesis(pos: int, flip: int) -> None:
    data = _seal("mlkem768-x25519", payload=b"abc")
    bad = bytearray(data)
    bad[pos % len(data)] ^= flip
    with pytest.raises(EnvelopeError):
        _open(bytes(bad))


def test_signature_region_reason() -> None:
    data = bytearray(_seal("x25519"))
    data[-1] ^= 1
    assert _reason(bytes(data), "x25519") == "bad_signature"
    data = bytearray(_seal("x25519"))
    _, cend = _split(bytes(data))
    data[cend - 5] ^= 1  # inside the ciphertext
    assert _reason(bytes(data), "x25519") == "bad_signature"


@pytest.mark.parametrize("cut", [0, 3, 5, 6, 10, 100, -65, -1])
def test_truncated_and_extended(cut: int) -> None:
    data = _seal("x25519")
    assert _reason(data[:cut], "x25519") == "malformed"
    assert _reason(data + b"\x00", "x25519") == "malformed"


def test_unsupported_version() -> None:
    data = bytearray(_seal("x25519"))
    data[4] = 3
    assert _reason(bytes(data), "x25519") == "unsupported_version"
    with pytest.raises(EnvelopeError, match="unsupported_version"):
        seal.peek_header(bytes(data))
    data[4] = 2  # a known version whose header says otherwise
    assert _reason(bytes(data), "x25519") == "malformed"
    with pytest.raises(ValueError, match="envelope version"):
        _seal("x25519", version=3)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("aead", ["aes-256-gcm", "chacha20-poly1305"])
def test_version_2_round_trip_signs_a_digest(kind: RecipientKind, aead: str) -> None:
    """Version 2: the same framing, ``v`` 2 in the header, and an Ed25519 signature over a
    context string and the SHA-256 of every byte before it (not over those bytes)."""
    import hashlib

    from cryptography.exceptions import InvalidSignature

    data = _seal(kind, aead=aead, version=2)
    opened = _open(data, kind)
    assert (opened.plaintext, opened.v, data[4]) == (PAYLOAD, 2, 2)
    body, signature = data[:-64], data[-64:]
    _DEVICE_KEY.public_key().verify(
        signature, b"iomt-envelope-v2 sha256\x00" + hashlib.sha256(body).digest())
    with pytest.raises(InvalidSignature):
        _DEVICE_KEY.public_key().verify(signature, body)
    assert len(data) == len(_seal(kind, aead=aead))  # no byte more than version 1


def test_a_version_1_envelope_cannot_pass_as_version_2_or_back() -> None:
    """Relabelled and re-signed by the genuine device key the way the other version signs,
    an envelope still fails: the header is bound to the ciphertext through ``info``, which
    names the version."""
    for version, other in ((1, 2), (2, 1)):
        data = _seal("x25519", version=version)  # type: ignore[arg-type]
        hend, cend = _split(data)
        obj = json.loads(data[7:hend])
        obj["v"] = other
        header = json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()
        body = b"IOMT" + bytes([other]) + struct.pack(">H", len(header)) + header
        body += data[hend:cend]
        forged = body + _DEVICE_KEY.sign(seal._signed_message(other, body))
        assert _reason(forged, "x25519") == "decrypt_failed"


def test_wrong_recipient_key_id() -> None:
    other, _ = keys.generate_recipient_keypair("mlkem768-x25519")
    data = _seal("mlkem768-x25519")
    with pytest.raises(EnvelopeError) as ei:
        seal.open_envelope(
            data,
            recipients={other.key_id: other},
            trusted_devices={DEVICE: _DEVICE_KEY.public_key()},
        )
    assert ei.value.reason == "unknown_recipient"
    # right id but wrong key material behind it: decryption fails
    with pytest.raises(EnvelopeError) as ei:
        seal.open_envelope(
            data,
            recipients={_recipient("mlkem768-x25519")[1].key_id: other},
            trusted_devices={DEVICE: _DEVICE_KEY.public_key()},
        )
    assert ei.value.reason == "decrypt_failed"
    # a key of the wrong kind under the right id is not used
    wrong_kind, _ = keys.generate_recipient_keypair("x25519")
    with pytest.raises(EnvelopeError) as ei:
        seal.open_envelope(
            data,
            recipients={_recipient("mlkem768-x25519")[1].key_id: wrong_kind},
            trusted_devices={DEVICE: _DEVICE_KEY.public_key()},
        )
    assert ei.value.reason == "unknown_recipient"


def test_unknown_device() -> None:
    data = _seal("x25519", device_id="edge-99")
    assert _reason(data, "x25519") == "unknown_device"


def test_signed_by_another_device_key() -> None:
    data = _seal("x25519", signing_key=Ed25519PrivateKey.generate())
    assert _reason(data, "x25519") == "bad_signature"


def _resign_with_header(data: bytes, mutate: dict[str, object]) -> bytes:
    """Replace the header (keeping the ciphertext) and re-sign with the right device key."""
    hend, cend = _split(data)
    obj = json.loads(data[7:hend])
    obj.update(mutate)
    header = json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()
    body = b"IOMT\x01" + struct.pack(">H", len(header)) + header + data[hend:cend]
    return body + _DEVICE_KEY.sign(body)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(
    "mutate",
    [
        {"message_id": "m-2"},
        {"content_type": "text/plain"},
        {"created": "2030-01-01T00:00:00.000Z"},
    ],
)
def test_header_is_bound_to_ciphertext(kind: RecipientKind, mutate: dict[str, object]) -> None:
    data = _seal(kind)
    forged = _resign_with_header(data, mutate)
    assert seal.peek_header(forged).message_id in {"m-1", "m-2"}
    assert _reason(forged, kind) == "decrypt_failed"


def test_unsupported_suite_after_signature() -> None:
    forged = _resign_with_header(_seal("x25519"), {"suite": "x448-hkdfsha512-chacha20poly1305"})
    assert _reason(forged, "x25519") == "unsupported_suite"


@pytest.mark.parametrize(
    "header",
    [
        b"not json",
        b"[]",
        b'{"v":1}',
        b'{"content_type":"a","created":"2025-01-01T00:00:00.000Z","device_id":"edge-01",'
        b'"message_id":"m","recipient_key_id":"00","suite":"s","v":1}',
        # not canonical (whitespace)
        b'{"content_type": "a","created":"2025-01-01T00:00:00.000Z","device_id":"edge-01",'
        b'"message_id":"m","recipient_key_id":"00000000000000000000000000000000","suite":"s",'
        b'"v":1}',
        b'{"content_type":"a","created":"2025-01-01T00:00:00Z","device_id":"edge-01",'
        b'"message_id":"m","recipient_key_id":"00000000000000000000000000000000","suite":"s",'
        b'"v":1}',
        b'{"content_type":"a","created":"2025-01-01T00:00:00.000Z","device_id":"\\ud800",'
        b'"message_id":"m","recipient_key_id":"00000000000000000000000000000000","suite":"s",'
        b'"v":1}',
    ],
)
def test_malformed_header(header: bytes) -> None:
    body = b"IOMT\x01" + struct.pack(">H", len(header)) + header + struct.pack(">I", 0)
    data = body + _DEVICE_KEY.sign(body)
    assert _reason(data) == "malformed"


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_garbage_only_raises_envelope_error(blob: bytes) -> None:
    for data in (blob, b"IOMT\x01" + blob):
        with pytest.raises(EnvelopeError):
            _open(data)
        with contextlib.suppress(EnvelopeError):
            seal.peek_header(data)


def test_seal_argument_validation() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        _seal("x25519", created=datetime(2025, 1, 1))
    for bad in ("", "a\nb", "x" * 257):
        with pytest.raises(ValueError):
            _seal("x25519", device_id=bad)


def test_keys_from_files_interoperate(tmp_path: Path) -> None:
    priv, pub = keys.generate_recipient_keypair()
    keys.save_private_key(tmp_path / "cloud.key", priv)
    keys.save_public_key(tmp_path / "cloud.pub", pub)
    data = seal.seal(
        b"x",
        recipient=keys.load_recipient_public_key(tmp_path / "cloud.pub"),
        signing_key=_DEVICE_KEY,
        device_id=DEVICE,
        message_id="m",
    )
    loaded = keys.load_recipient_private_key(tmp_path / "cloud.key")
    opened = seal.open_envelope(
        data, recipients=keys.key_ring([loaded]), trusted_devices={DEVICE: _DEVICE_KEY.public_key()}
    )
    assert opened.plaintext == b"x"


def test_every_suite_opens_on_openssls_software_paths(tmp_path: Path) -> None:
    """With OpenSSL told that the CPU has no AES, carry-less multiply or vector units
    (``OPENSSL_ia32cap`` on x86, ``OPENSSL_armcap=0`` on ARM: the code a Raspberry Pi 4
    runs), every suite seals and opens the same bytes as with them, both ways across the
    two processes."""
    import os
    import platform
    import subprocess
    import sys

    if platform.machine().lower() in ("x86_64", "amd64"):
        software = {"OPENSSL_ia32cap": "~0x200000200000000"}  # AES-NI and PCLMULQDQ off
    else:
        software = {"OPENSSL_armcap": "0"}
    script = (
        "import sys\n"
        "from pathlib import Path\n"
        "from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey\n"
        "from agent.crypto import keys, seal\n"
        "d = Path(sys.argv[1]); plain = bytes(range(256)) * 520\n"
        "for suite, (kind, aead) in seal.SUITES.items():\n"
        "    tag = suite.replace('-', '_')\n"
        "    if sys.argv[2] == 'seal':\n"
        "        priv, pub = keys.generate_recipient_keypair(kind)\n"
        "        dev = Ed25519PrivateKey.generate()\n"
        "        keys.save_private_key(d / f'{tag}.key', priv)\n"
        "        keys.save_public_key(d / f'{tag}.dev.pub', dev.public_key())\n"
        "        (d / tag).write_bytes(seal.seal(plain, recipient=pub, signing_key=dev,\n"
        "                                        device_id='n', message_id='m', aead=aead))\n"
        "    else:\n"
        "        priv = keys.load_recipient_private_key(d / f'{tag}.key')\n"
        "        dev = keys.load_verify_key(d / f'{tag}.dev.pub')\n"
        "        opened = seal.open_envelope((d / tag).read_bytes(),\n"
        "                                    recipients={priv.key_id: priv},\n"
        "                                    trusted_devices={'n': dev})\n"
        "        assert opened.plaintext == plain and opened.suite == suite, suite\n"
        "print('ok')\n")
    root = Path(__file__).resolve().parents[2]
    for name, (seal_env, open_env) in {"software seals": (software, {}),
                                       "software opens": ({}, software)}.items():
        work = tmp_path / name.replace(" ", "_")
        work.mkdir()
        for step, extra in (("seal", seal_env), ("open", open_env)):
            run = subprocess.run([sys.executable, "-c", script, str(work), step], cwd=root,
                                 env={**os.environ, **extra}, capture_output=True, text=True,
                                 timeout=120, check=False)
            assert run.returncode == 0 and run.stdout.strip() == "ok", (name, step,
                                                                          run.stderr[-1500:])
