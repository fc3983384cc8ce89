"""Sealed envelopes: HPKE-encrypted, Ed25519-signed results for the cloud receiver.

Layout of the envelope (all integers big-endian; exact spec in ``docs/protocol.md``)::

    b"IOMT" | u8 version | u16 len(H) | H | u32 len(C) | C | signature (64 bytes)

``H`` is the header as canonical JSON, ``C`` is the single-shot HPKE base-mode ciphertext
(encapsulated key || AEAD ciphertext) with ``info = b"iomt-envelope-vN" || H``. The
signature is Ed25519 by the device key: in version 1 over every byte before it; in version 2
over ``b"iomt-envelope-v2 sha256\x00"`` || the SHA-256 of every byte before it, so that the
result is hashed once instead of twice with SHA-512 inside Ed25519 (``seal.envelope_version``;
a receiver opens both versions).

The header's ``suite`` names the KEM (the recipient key's kind) and the AEAD: AES-256-GCM,
or ChaCha20-Poly1305 for a node whose CPU has no AES instructions (a Raspberry Pi 4), where
it is several times faster in software (``agent.crypto.aead_choice``; measured by
``bench/seal.py``). A receiver opens all four suites.

``open_envelope`` checks the framing, then the signature (with the keys trusted for the
device named in the header), then decrypts with the recipient key the header names. Error
messages never contain plaintext.

Key rotation needs no change of the wire format: the header names the recipient key by key
id, so a receiver that holds several recipient keys picks the right one, and a receiver that
trusts several signing keys for one device (its old and its new key while it rotates) accepts
a signature by any of them; ``Opened.signer_key_id`` says which one signed.
"""

from __future__ import annotations

import hashlib
import json
import re
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final, Literal

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hpke
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from agent.crypto.keys import (
    RecipientKind,
    RecipientPrivateKey,
    RecipientPublicKey,
    signing_key_id,
)
from agent.errors import AgentError

MAGIC = b"IOMT"
VERSION: Final = 1  # what ``seal`` writes unless told otherwise
VERSIONS = (1, 2)
EnvelopeVersion = Literal[1, 2]
_DIGEST_CONTEXT = b"iomt-envelope-v2 sha256\x00"  # what a v2 signature covers, then the digest
SIGNATURE_LEN = 64
MAX_FIELD_LEN = 256

Aead = Literal["aes-256-gcm", "chacha20-poly1305"]
AEADS: dict[Aead, hpke.AEAD] = {
    "aes-256-gcm": hpke.AEAD.AES_256_GCM,
    "chacha20-poly1305": hpke.AEAD.CHACHA20_POLY1305,
}
_KEMS: dict[RecipientKind, hpke.KEM] = {
    "mlkem768-x25519": hpke.KEM.MLKEM768_X25519,
    "x25519": hpke.KEM.X25519,
}


def suite_name(kind: RecipientKind, aead: Aead) -> str:
    """The header's ``suite`` for a recipient key of ``kind`` and ``aead``, e.g.
    ``mlkem768-x25519-hkdfsha256-aes256gcm``."""
    return f"{kind}-hkdfsha256-{aead.replace('-', '')}"


# Every suite an envelope may name: the recipient key's kind and the AEAD.
SUITES: dict[str, tuple[RecipientKind, Aead]] = {
    suite_name(kind, aead): (kind, aead) for kind in _KEMS for aead in AEADS
}
_HPKE: dict[tuple[RecipientKind, Aead], hpke.Suite] = {
    (kind, aead): hpke.Suite(_KEMS[kind], hpke.KDF.HKDF_SHA256, AEADS[aead])
    for kind in _KEMS for aead in AEADS
}


def hpke_suite(kind: RecipientKind, aead: Aead = "aes-256-gcm") -> hpke.Suite:
    """The HPKE suite envelopes use for recipient keys of ``kind`` with ``aead`` (base
    mode, single shot; ``tests/crypto/test_hpke_vectors.py`` runs the RFC 9180 vectors
    through it)."""
    return _HPKE[kind, aead]


_HEADER_KEYS = frozenset(
    {"v", "suite", "recipient_key_id", "device_id", "message_id", "created", "content_type"}
)
_CREATED_RE = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z")
_KEY_ID_RE = re.compile(r"[0-9a-f]{32}")
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")
_PREFIX = struct.Struct(">4sBH")  # magic, version, header length
_U32 = struct.Struct(">I")

Reason = Literal[
    "malformed",
    "unsupported_version",
    "unknown_device",
    "bad_signature",
    "unknown_recipient",
    "decrypt_failed",
    "unsupported_suite",
]


class EnvelopeError(AgentError):
    """An envelope could not be parsed, authenticated or decrypted.

    ``reason`` is a stable machine-readable code (see ``Reason``); the message never
    contains plaintext.
    """

    def __init__(self, reason: Reason, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason: Reason = reason


@dataclass(frozen=True)
class EnvelopeHeader:
    """The cleartext header of an envelope (authenticated only after ``open_envelope``)."""

    v: int
    suite: str
    recipient_key_id: str
    device_id: str
    message_id: str
    created: datetime
    content_type: str


# What a receiver trusts for one device: its signing key, or several while it rotates.
DeviceKeys = Ed25519PublicKey | Sequence[Ed25519PublicKey]


@dataclass(frozen=True)
class Opened(EnvelopeHeader):
    """A verified and decrypted envelope: the header fields plus the plaintext and the key
    id of the device key whose signature verified."""

    plaintext: bytes = field(repr=False)
    signer_key_id: str = ""


def format_created(when: datetime) -> str:
    """Format an aware datetime as RFC 3339 UTC with milliseconds, e.g. ``...T10:00:00.000Z``."""
    if when.tzinfo is None or when.utcoffset() is None:
        raise ValueError("created must be timezone-aware")
    utc = when.astimezone(UTC)
    return utc.strftime("%Y-%m-%dT%H:%M:%S.") + f"{utc.microsecond // 1000:03d}Z"


def _canonical_json(obj: Mapping[str, Any]) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def _check_text(name: str, value: str) -> None:
    if not isinstance(value, str) or not value or len(value) > MAX_FIELD_LEN:
        raise ValueError(f"{name} must be a non-empty string of at most {MAX_FIELD_LEN} chars")
    if _CONTROL_RE.search(value):
        raise ValueError(f"{name} must not contain control characters")


def seal(
    plaintext: bytes,
    *,
    recipient: RecipientPublicKey,
    signing_key: Ed25519PrivateKey,
    device_id: str,
    message_id: str,
    content_type: str = "application/dicom",
    created: datetime | None = None,
    aead: Aead = "aes-256-gcm",
    version: EnvelopeVersion = VERSION,
) -> bytes:
    """Encrypt ``plaintext`` to ``recipient`` and sign the envelope with ``signing_key``.

    The suite follows the recipient key's kind and ``aead`` (``agent.crypto.aead_choice``
    picks it for the CPU); ``version`` is the envelope's (1, or 2 with the signature over
    a digest). ``created`` defaults to now and must be timezone-aware. Raises
    ``ValueError`` for invalid arguments.
    """
    if version not in VERSIONS:
        raise ValueError(f"envelope version must be one of {VERSIONS}")
    for name, value in (
        ("device_id", device_id),
        ("message_id", message_id),
        ("content_type", content_type),
    ):
        _check_text(name, value)
    header = _canonical_json(
        {
            "v": version,
            "suite": suite_name(recipient.kind, aead),
            "recipient_key_id": recipient.key_id,
            "device_id": device_id,
            "message_id": message_id,
            "created": format_created(datetime.now(UTC) if created is None else created),
            "content_type": content_type,
        }
    )
    ciphertext = _HPKE[recipient.kind, aead].encrypt(
        plaintext, recipient.hpke_key(), info=_info(version) + header
    )
    out = bytearray(_PREFIX.pack(MAGIC, version, len(header)))
    out += header
    out += _U32.pack(len(ciphertext))
    out += ciphertext
    out += signing_key.sign(_signed_message(version, out))
    return bytes(out)


def _info(version: int) -> bytes:
    return b"iomt-envelope-v%d" % version


def _signed_message(version: int, body: bytes | bytearray) -> bytes:
    """What the signature covers: the body itself (v1), or a context string and the body's
    SHA-256 (v2)."""
    if version == 1:
        return bytes(body)
    return _DIGEST_CONTEXT + hashlib.sha256(body).digest()


def _split(data: bytes) -> tuple[bytes, bytes, bytes]:
    """Check the framing; return (header bytes, ciphertext, signature)."""
    if len(data) < 5 or data[:4] != MAGIC:
        raise EnvelopeError("malformed", "not an IOMT envelope (bad magic)")
    if data[4] not in VERSIONS:
        raise EnvelopeError("unsupported_version",
                            f"envelope version {data[4]} (supported: 1, 2)")
    if len(data) < _PREFIX.size:
        raise EnvelopeError("malformed", "truncated before header length")
    _, _, hlen = _PREFIX.unpack_from(data)
    pos = _PREFIX.size + hlen
    if len(data) < pos + _U32.size:
        raise EnvelopeError("malformed", "truncated header")
    (clen,) = _U32.unpack_from(data, pos)
    pos += _U32.size
    if len(data) != pos + clen + SIGNATURE_LEN:
        raise EnvelopeError(
            "malformed", f"length mismatch: {len(data)} bytes, framing says {pos + clen + 64}"
        )
    return data[_PREFIX.size : _PREFIX.size + hlen], data[pos : pos + clen], data[pos + clen :]


def _parse_header(raw: bytes, version: int) -> EnvelopeHeader:
    try:
        obj = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise EnvelopeError("malformed", "header is not UTF-8 JSON") from None
    if not isinstance(obj, dict) or set(obj) != _HEADER_KEYS:
        raise EnvelopeError("malformed", "header does not have exactly the envelope header fields")
    try:
        canonical = _canonical_json(obj) == raw
    except UnicodeEncodeError:  # lone surrogates from \uXXXX escapes
        canonical = False
    if not canonical:
        raise EnvelopeError("malformed", "header is not canonical JSON")
    if type(obj["v"]) is not int or obj["v"] != version:
        raise EnvelopeError("malformed", "header v does not match the envelope version")
    for name in ("suite", "device_id", "message_id", "content_type"):
        try:
            _check_text(name, obj[name])
        except ValueError as e:
            raise EnvelopeError("malformed", f"header {e}") from None
    if not isinstance(obj["recipient_key_id"], str) or not _KEY_ID_RE.fullmatch(
        obj["recipient_key_id"]
    ):
        raise EnvelopeError("malformed", "header recipient_key_id is not 32 lowercase hex")
    if not isinstance(obj["created"], str) or not _CREATED_RE.fullmatch(obj["created"]):
        raise EnvelopeError("malformed", "header created is not YYYY-MM-DDTHH:MM:SS.mmmZ")
    try:
        created = datetime.strptime(obj["created"], "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)
    except ValueError:
        raise EnvelopeError("malformed", "header created is not a valid time") from None
    return EnvelopeHeader(
        v=obj["v"],
        suite=obj["suite"],
        recipient_key_id=obj["recipient_key_id"],
        device_id=obj["device_id"],
        message_id=obj["message_id"],
        created=created,
        content_type=obj["content_type"],
    )


def peek_header(data: bytes) -> EnvelopeHeader:
    """Parse the header WITHOUT verifying anything (for logging and routing only)."""
    raw_header, _, _ = _split(data)
    return _parse_header(raw_header, data[4])


def open_envelope(
    data: bytes,
    *,
    recipients: Mapping[str, RecipientPrivateKey],
    trusted_devices: Mapping[str, DeviceKeys],
) -> Opened:
    """Verify and decrypt an envelope.

    ``recipients`` maps key id -> recipient private key, ``trusted_devices`` maps device id
    -> its Ed25519 public key (or a sequence of them while the device's key rotates). The
    signature is checked first, with the keys of the header's device; then the ciphertext
    is decrypted with the key named by ``recipient_key_id``. Raises ``EnvelopeError`` (see
    its ``reason``).
    """
    raw_header, ciphertext, signature = _split(data)
    header = _parse_header(raw_header, data[4])
    trusted = trusted_devices.get(header.device_id)
    if trusted is None:
        raise EnvelopeError("unknown_device", f"device {header.device_id!r} is not trusted")
    signed = _signed_message(header.v, data[: len(data) - SIGNATURE_LEN])
    signer = _verifying_key(trusted, signature, signed)
    if signer is None:
        raise EnvelopeError(
            "bad_signature", f"signature does not verify for device {header.device_id!r}"
        )
    suite = SUITES.get(header.suite)
    if suite is None:
        raise EnvelopeError("unsupported_suite", f"suite {header.suite!r} is not supported")
    kind = suite[0]
    key = recipients.get(header.recipient_key_id)
    if key is None or key.kind != kind:
        raise EnvelopeError(
            "unknown_recipient", f"no {kind} private key with id {header.recipient_key_id}"
        )
    try:
        plaintext = _HPKE[suite].decrypt(ciphertext, key.hpke_key(),
                                         info=_info(header.v) + raw_header)
    except (InvalidTag, ValueError):
        raise EnvelopeError(
            "decrypt_failed", f"HPKE decryption failed for key {header.recipient_key_id}"
        ) from None
    return Opened(
        v=header.v,
        suite=header.suite,
        recipient_key_id=header.recipient_key_id,
        device_id=header.device_id,
        message_id=header.message_id,
        created=header.created,
        content_type=header.content_type,
        plaintext=plaintext,
        signer_key_id=signing_key_id(signer),
    )


def _verifying_key(
    trusted: DeviceKeys, signature: bytes, signed: bytes
) -> Ed25519PublicKey | None:
    """The first of the device's trusted keys whose signature verifies, or None."""
    for key in (trusted,) if isinstance(trusted, Ed25519PublicKey) else trusted:
        try:
            key.verify(signature, signed)
        except InvalidSignature:
            continue
        return key
    return None
