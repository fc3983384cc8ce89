"""The envelope parser under hypothesis: whatever bytes arrive, ``open_envelope`` and
``peek_header`` either succeed or raise ``EnvelopeError`` with a registered reason, never
anything else. Inputs are built to get past each check in turn: random framing, headers
of random JSON (right and wrong types, extra and missing keys), validly signed by the
trusted device so that the suite, recipient and decryption paths are reached too, and
mutations of a real envelope."""

from __future__ import annotations

import json
import struct
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.crypto import keys, seal
from agent.crypto.seal import EnvelopeError
from agent.errors import ENVELOPE_REASONS

RECIPIENT, RECIPIENT_PUB = keys.generate_recipient_keypair("x25519")
DEVICE_KEY = keys.generate_signing_key()
TRUSTED = {"node-1": DEVICE_KEY.public_key()}
RING = {RECIPIENT.key_id: RECIPIENT}
GOOD = {v: seal.seal(b"payload", recipient=RECIPIENT_PUB, signing_key=DEVICE_KEY,
                     device_id="node-1", message_id="m-1", version=v) for v in (1, 2)}
FIELDS = ("v", "suite", "recipient_key_id", "device_id", "message_id", "created",
          "content_type")
SETTINGS = settings(max_examples=150, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])

_json_leaf = (st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False)
              | st.text(max_size=40))
_json = st.recursive(_json_leaf, lambda kids: st.lists(kids, max_size=3)
                     | st.dictionaries(st.text(max_size=8), kids, max_size=3), max_leaves=6)
_plausible = {
    "v": st.sampled_from([1, 2, 0, "1", True, 1.0]),
    "suite": st.sampled_from([*seal.SUITES, "", "x" * 300, "rsa"]) | st.text(max_size=20),
    "recipient_key_id": st.sampled_from([RECIPIENT.key_id, "0" * 32, "A" * 32, ""])
    | st.text(max_size=40),
    "device_id": st.sampled_from(["node-1", "node-2", "", "a\x00b"]) | st.text(max_size=20),
    "message_id": st.text(max_size=30),
    "created": st.sampled_from(["2025-01-01T00:00:00.000Z", "2025-13-40T99:99:99.000Z",
                                "2025-01-01T00:00:00Z"]) | st.text(max_size=30),
    "content_type": st.text(max_size=30),
}


VALID = {"v": 1, "suite": "x25519-hkdfsha256-aes256gcm", "recipient_key_id": RECIPIENT.key_id,
         "device_id": "node-1", "message_id": "m-1", "created": "2025-01-01T00:00:00.000Z",
         "content_type": "application/dicom"}


@st.composite
def headers(draw: st.DrawFn) -> bytes:
    """A valid header with up to three fields replaced (a plausible wrong value or random
    JSON), sometimes a key missing or one extra, sometimes not canonical."""
    obj: dict[str, Any] = dict(VALID)
    for name in draw(st.lists(st.sampled_from(FIELDS), max_size=3, unique=True)):
        obj[name] = draw(_json) if draw(st.integers(0, 3)) == 0 else draw(_plausible[name])
    if draw(st.integers(0, 9)) == 0:
        del obj[draw(st.sampled_from(FIELDS))]
    if draw(st.integers(0, 9)) == 0:
        obj[draw(st.text(max_size=8))] = draw(_json)
    canonical = draw(st.integers(0, 9)) > 0
    text = (json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
            if canonical else json.dumps(obj))
    return text.encode("utf-8", "surrogatepass")


def _signed(header: bytes, ciphertext: bytes, version: int = 1) -> bytes:
    body = b"IOMT" + bytes([version]) + struct.pack(">H", len(header) % 65536) + header
    body += struct.pack(">I", len(ciphertext)) + ciphertext
    signed = seal._signed_message(version, body) if version in seal.VERSIONS else body
    return body + DEVICE_KEY.sign(signed)


def _parse(data: bytes) -> None:
    for attempt in (lambda: seal.open_envelope(data, recipients=RING, trusted_devices=TRUSTED),
                    lambda: seal.peek_header(data)):
        try:
            attempt()
        except EnvelopeError as exc:
            assert exc.reason in ENVELOPE_REASONS, exc.reason
            assert str(exc).startswith(f"{exc.reason}: ")


@SETTINGS
@given(header=headers(), ciphertext=st.binary(max_size=120),
       version=st.sampled_from([1] * 4 + [2] * 4 + [0, 3]))
def test_signed_envelopes_with_random_headers(header: bytes, ciphertext: bytes,
                                              version: int) -> None:
    _parse(_signed(header, ciphertext, version))


@SETTINGS
@given(ops=st.lists(st.tuples(st.sampled_from(["flip", "insert", "delete", "cut"]),
                              st.integers(min_value=0), st.binary(min_size=1, max_size=8)),
                    min_size=1, max_size=4), version=st.sampled_from([1, 2]))
def test_mutations_of_a_real_envelope(ops: list[tuple[str, int, bytes]], version: int) -> None:
    data = bytearray(GOOD[version])
    for op, pos, blob in ops:
        at = pos % (len(data) + 1)
        if op == "flip" and data:
            data[at % len(data)] ^= blob[0]
        elif op == "insert":
            data[at:at] = blob
        elif op == "delete":
            del data[at:at + len(blob)]
        else:
            del data[at:]
    _parse(bytes(data))


@SETTINGS
@given(hlen=st.integers(0, 65535), clen=st.integers(0, 2**32 - 1), rest=st.binary(max_size=200))
def test_lying_length_fields(hlen: int, clen: int, rest: bytes) -> None:
    _parse(b"IOMT\x01" + struct.pack(">H", hlen) + rest[:hlen] + struct.pack(">I", clen) + rest)
