"""What ``receive`` (``ResultReceiver.file``) does with an attacker's envelope: a tampered
header, ciphertext or signature, a wrong recipient and a replayed message id are each
rejected (or dropped as the duplicate they are), and nothing is written for them; damaged
DICOM inside a validly signed envelope is ``malformed``, never a crash."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.cloud.receiver import ResultReceiver
from agent.crypto import keys, seal
from agent.crypto.seal import EnvelopeError
from agent.demo.sample_series import build_series

DEVICE = "node-1"
RECIPIENT, RECIPIENT_PUB = keys.generate_recipient_keypair()
OTHER, OTHER_PUB = keys.generate_recipient_keypair()
DEVICE_KEY = keys.generate_signing_key()
INSTANCES = build_series(np.full((2, 16, 16), 700, dtype=np.uint16))


def _seal(plaintext: bytes = INSTANCES[0], message_id: str = "m-1",
          recipient: keys.RecipientPublicKey = RECIPIENT_PUB) -> bytes:
    return seal.seal(plaintext, recipient=recipient, signing_key=DEVICE_KEY, device_id=DEVICE,
                     message_id=message_id)


def _parts(envelope: bytes) -> tuple[bytes, bytes]:
    (hlen,) = struct.unpack_from(">H", envelope, 5)
    (clen,) = struct.unpack_from(">I", envelope, 7 + hlen)
    return envelope[7:7 + hlen], envelope[11 + hlen:11 + hlen + clen]


def _frame(header: bytes, ciphertext: bytes, signer: Ed25519PrivateKey = DEVICE_KEY) -> bytes:
    body = b"IOMT\x01" + struct.pack(">H", len(header)) + header
    body += struct.pack(">I", len(ciphertext)) + ciphertext
    return body + signer.sign(body)


def _receiver(out: Path) -> ResultReceiver:
    return ResultReceiver(recipients={RECIPIENT.key_id: RECIPIENT},
                          trusted_devices={DEVICE: DEVICE_KEY.public_key()}, out_dir=out)


def _rejected(out: Path, envelope: bytes) -> str:
    with pytest.raises(EnvelopeError) as ei:
        _receiver(out).file(envelope)
    assert not out.exists() or not list(out.rglob("*.dcm"))  # nothing written
    return ei.value.reason


def _edit_header(envelope: bytes, **changes: object) -> bytes:
    header, _ = _parts(envelope)
    fields = json.loads(header)
    fields.update(changes)
    return json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()


def test_a_tampered_header_is_rejected(tmp_path: Path) -> None:
    good = _seal()
    _, ciphertext = _parts(good)
    for change in ({"message_id": "m-2"}, {"device_id": "node-2"},
                   {"content_type": "text/plain"}, {"created": "2020-01-01T00:00:00.000Z"}):
        forged = _frame(_edit_header(good, **change), ciphertext, Ed25519PrivateKey.generate())
        want = "unknown_device" if "device_id" in change else "bad_signature"
        assert _rejected(tmp_path, forged) == want
        # the old signature kept: it does not cover the new header
        resigned = bytearray(_frame(_edit_header(good, **change), ciphertext))
        resigned[-64:] = good[-64:]
        assert _rejected(tmp_path, bytes(resigned)) in {"bad_signature", "unknown_device"}
    # Even the device's own key cannot move a ciphertext under another header: the header
    # is HPKE's info, so the ciphertext no longer opens.
    moved = _frame(_edit_header(good, message_id="m-2"), ciphertext)
    assert _rejected(tmp_path, moved) == "decrypt_failed"


def test_a_tampered_ciphertext_is_rejected(tmp_path: Path) -> None:
    good = _seal()
    header, ciphertext = _parts(good)
    for pos in (0, len(ciphertext) // 2, len(ciphertext) - 1):  # enc, body, tag
        bad = bytearray(good)
        bad[11 + len(header) + pos] ^= 0x20
        assert _rejected(tmp_path, bytes(bad)) == "bad_signature"
        flipped = bytearray(ciphertext)
        flipped[pos] ^= 0x20  # re-signed by the device key: the AEAD still refuses it
        assert _rejected(tmp_path, _frame(header, bytes(flipped))) == "decrypt_failed"


def test_a_tampered_signature_is_rejected(tmp_path: Path) -> None:
    good = _seal()
    for pos in (1, 32, 63):
        bad = bytearray(good)
        bad[-pos] ^= 0x01
        assert _rejected(tmp_path, bytes(bad)) == "bad_signature"
    assert _rejected(tmp_path, good[:-64] + bytes(64)) == "bad_signature"
    assert _rejected(tmp_path, good[:-1]) == "malformed"


def test_a_wrong_recipient_is_rejected(tmp_path: Path) -> None:
    to_other = _seal(recipient=OTHER_PUB)
    assert _rejected(tmp_path, to_other) == "unknown_recipient"
    # sealed to another key but claiming ours: the key id is checked by decryption
    _, ciphertext = _parts(to_other)
    claims_ours = _frame(_edit_header(to_other, recipient_key_id=RECIPIENT.key_id), ciphertext)
    assert _rejected(tmp_path, claims_ours) == "decrypt_failed"
    # a key of the other kind under the right id: refused before any decryption
    x_priv, x_pub = keys.generate_recipient_keypair("x25519")
    mixed = ResultReceiver(recipients={RECIPIENT.key_id: x_priv},
                           trusted_devices={DEVICE: DEVICE_KEY.public_key()}, out_dir=tmp_path)
    with pytest.raises(EnvelopeError) as ei:
        mixed.file(_seal())
    assert ei.value.reason == "unknown_recipient"
    assert x_pub.kind == "x25519"


def test_a_replayed_message_id_is_never_filed_twice(tmp_path: Path) -> None:
    envelope = _seal(INSTANCES[0], "m-1")
    receiver = _receiver(tmp_path)
    first = receiver.file(envelope)
    assert first.kind == "new" and first.path is not None
    content, mtime = first.path.read_bytes(), first.path.stat().st_mtime_ns
    assert receiver.file(envelope).kind == "repeat"  # the same bytes again
    # the same message id with other content (the device's key signed it): first one wins
    assert receiver.file(_seal(INSTANCES[1], "m-1")).kind == "repeat"
    # a receiver restarted later: the replay finds its file and leaves it alone
    again = _receiver(tmp_path).file(envelope)
    assert again.kind == "earlier" and again.path == first.path
    assert first.path.read_bytes() == content and first.path.stat().st_mtime_ns == mtime
    assert len(list(tmp_path.rglob("*.dcm"))) == 1


@pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom on the damaged values
@pytest.mark.parametrize("vr", [b"AI", b"UV"])
def test_a_damaged_vr_of_a_uid_is_malformed_not_a_crash(tmp_path: Path, vr: bytes) -> None:
    """pydicom reads the element lazily: an unknown VR ('AI') or one whose value length
    cannot fit it ('UV', 8-byte values) raises only when the UID is read (found by the
    property test below)."""
    study_uid = b"\x20\x00\x0d\x00UI"  # (0020,000D), explicit VR little endian
    data = bytearray(INSTANCES[0])
    at = data.index(study_uid) + 4
    data[at:at + 2] = vr
    out = tmp_path / "out"
    with pytest.raises(EnvelopeError) as exc:
        _receiver(out).file(_seal(bytes(data), message_id="m-vr"))
    assert exc.value.reason == "malformed" and "StudyInstanceUID cannot be read" in str(exc.value)
    assert not out.exists() or not list(out.rglob("*.dcm"))


@pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom on the damaged values
@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(ops=st.lists(st.tuples(st.integers(min_value=0), st.binary(min_size=1, max_size=4)),
                    min_size=1, max_size=6),
       cut=st.none() | st.integers(min_value=0))
def test_a_signed_envelope_around_damaged_dicom_is_malformed_never_a_crash(
        tmp_path: Path, ops: list[tuple[int, bytes]], cut: int | None) -> None:
    # The device's own key signed it, so only the plaintext check stands between the bytes
    # and the output directory: whatever they are, the receiver files a valid instance or
    # says `malformed`, and writes nothing outside OUT.
    data = bytearray(INSTANCES[0])
    for pos, blob in ops:
        at = pos % len(data)
        data[at:at + len(blob)] = blob
    if cut is not None:
        del data[cut % len(data):]
    out = tmp_path / "out"
    try:
        filed = _receiver(out).file(_seal(bytes(data), message_id=f"m-{id(data)}"))
    except EnvelopeError as exc:
        assert exc.reason == "malformed"
        return
    assert filed.path is not None and out in filed.path.parents
