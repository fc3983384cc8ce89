"""Key material for sealed envelopes: HPKE recipient keys and Ed25519 signing keys.

Recipient keys (held by the cloud receiver) come in two kinds:

* ``mlkem768-x25519`` (default): the hybrid ML-KEM-768 + X25519 KEM of HPKE.
* ``x25519``: classic DHKEM(X25519), for receivers that cannot do ML-KEM yet.

They are stored in an armored text format (see ``docs/protocol.md``, "Key files")::

    -----BEGIN IOMT HPKE PRIVATE KEY-----
    base64( u8 len(kind) || kind (ASCII) || raw key bytes )
    -----END IOMT HPKE PRIVATE KEY-----

The key id of a recipient key is the hex of the first 16 bytes of SHA-256 over its raw
public key bytes. Device and operator signing keys are Ed25519: PKCS#8 PEM (unencrypted)
for private keys, SubjectPublicKeyInfo PEM for public keys.

Private key files are written with mode 0600 and loading one that grants any access to
group or others is refused.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import secrets
import stat
from collections.abc import Iterable
from pathlib import Path
from typing import Literal, get_args

from cryptography.hazmat.primitives import hpke, serialization
from cryptography.hazmat.primitives.asymmetric import mlkem, x25519
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from agent.errors import AgentError

RecipientKind = Literal["mlkem768-x25519", "x25519"]
RECIPIENT_KINDS: tuple[RecipientKind, ...] = get_args(RecipientKind)
DEFAULT_RECIPIENT_KIND: RecipientKind = "mlkem768-x25519"

_PRIVATE_LABEL = "IOMT HPKE PRIVATE KEY"
_PUBLIC_LABEL = "IOMT HPKE PUBLIC KEY"
# kind -> (raw private length, raw public length)
_RAW_LENGTHS: dict[RecipientKind, tuple[int, int]] = {
    "mlkem768-x25519": (64 + 32, 1184 + 32),
    "x25519": (32, 32),
}

HpkePublicKey = hpke.MLKEM768X25519PublicKey | x25519.X25519PublicKey
HpkePrivateKey = hpke.MLKEM768X25519PrivateKey | x25519.X25519PrivateKey


class KeyFileError(AgentError):
    """A key file is missing, unreadable, malformed, of the wrong kind or too permissive."""


def key_id_for(public_raw: bytes) -> str:
    """Return the key id for raw public key bytes: hex of sha256(public_raw)[:16]."""
    return hashlib.sha256(public_raw).digest()[:16].hex()


def signing_key_id(key: Ed25519PublicKey | Ed25519PrivateKey) -> str:
    """The key id of an Ed25519 key: ``key_id_for`` its raw 32-byte public key."""
    public = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    return key_id_for(public.public_bytes_raw())


class RecipientPublicKey:
    """An HPKE recipient public key together with its kind, raw bytes and key id."""

    __slots__ = ("_hpke", "key_id", "kind", "raw")

    def __init__(self, kind: RecipientKind, raw: bytes) -> None:
        """Build from raw bytes (hybrid: ML-KEM-768 public 1184 B || X25519 public 32 B)."""
        if kind not in _RAW_LENGTHS:
            raise ValueError(f"unknown recipient key kind {kind!r}")
        if len(raw) != _RAW_LENGTHS[kind][1]:
            raise ValueError(f"{kind} public key must be {_RAW_LENGTHS[kind][1]} bytes")
        self.kind: RecipientKind = kind
        self.raw: bytes = bytes(raw)
        self.key_id: str = key_id_for(self.raw)
        self._hpke: HpkePublicKey
        if kind == "x25519":
            self._hpke = x25519.X25519PublicKey.from_public_bytes(raw)
        else:
            self._hpke = hpke.MLKEM768X25519PublicKey(
                mlkem.MLKEM768PublicKey.from_public_bytes(raw[:1184]),
                x25519.X25519PublicKey.from_public_bytes(raw[1184:]),
            )

    def hpke_key(self) -> HpkePublicKey:
        """Return the key object accepted by ``hpke.Suite.encrypt``."""
        return self._hpke

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, RecipientPublicKey)
            and other.kind == self.kind
            and other.raw == self.raw
        )

    def __hash__(self) -> int:
        return hash((self.kind, self.raw))

    def __repr__(self) -> str:
        return f"RecipientPublicKey(kind={self.kind!r}, key_id={self.key_id!r})"


class RecipientPrivateKey:
    """An HPKE recipient private key (the raw secret is never shown by ``repr``)."""

    __slots__ = ("_hpke", "_raw", "kind", "public")

    def __init__(self, kind: RecipientKind, raw: bytes) -> None:
        """Build from raw bytes (hybrid: ML-KEM-768 seed 64 B || X25519 private 32 B)."""
        if kind not in _RAW_LENGTHS:
            raise ValueError(f"unknown recipient key kind {kind!r}")
        if len(raw) != _RAW_LENGTHS[kind][0]:
            raise ValueError(f"{kind} private key must be {_RAW_LENGTHS[kind][0]} bytes")
        self.kind: RecipientKind = kind
        self._raw = bytes(raw)
        self._hpke: HpkePrivateKey
        if kind == "x25519":
            xk = x25519.X25519PrivateKey.from_private_bytes(raw)
            self._hpke = xk
            public_raw = xk.public_key().public_bytes_raw()
        else:
            mk = mlkem.MLKEM768PrivateKey.from_seed_bytes(raw[:64])
            xk = x25519.X25519PrivateKey.from_private_bytes(raw[64:])
            self._hpke = hpke.MLKEM768X25519PrivateKey(mk, xk)
            public_raw = mk.public_key().public_bytes_raw() + xk.public_key().public_bytes_raw()
        self.public: RecipientPublicKey = RecipientPublicKey(kind, public_raw)

    @property
    def key_id(self) -> str:
        """The key id of the matching public key."""
        return self.public.key_id

    def private_bytes_raw(self) -> bytes:
        """Return the raw secret bytes (for serialisation only)."""
        return self._raw

    def hpke_key(self) -> HpkePrivateKey:
        """Return the key object accepted by ``hpke.Suite.decrypt``."""
        return self._hpke

    def __repr__(self) -> str:
        return f"RecipientPrivateKey(kind={self.kind!r}, key_id={self.key_id!r})"


def generate_recipient_keypair(
    kind: RecipientKind = DEFAULT_RECIPIENT_KIND,
) -> tuple[RecipientPrivateKey, RecipientPublicKey]:
    """Generate a fresh recipient key pair of ``kind``; return (private, public)."""
    if kind == "x25519":
        raw = x25519.X25519PrivateKey.generate().private_bytes_raw()
    elif kind == "mlkem768-x25519":
        raw = (
            mlkem.MLKEM768PrivateKey.generate().private_bytes_raw()
            + x25519.X25519PrivateKey.generate().private_bytes_raw()
        )
    else:
        raise ValueError(f"unknown recipient key kind {kind!r}; expected one of {RECIPIENT_KINDS}")
    private = RecipientPrivateKey(kind, raw)
    return private, private.public


def key_ring(keys: Iterable[RecipientPrivateKey]) -> dict[str, RecipientPrivateKey]:
    """Index recipient private keys by key id, as ``seal.open_envelope`` expects."""
    return {k.key_id: k for k in keys}


def generate_signing_key() -> Ed25519PrivateKey:
    """Generate an Ed25519 key (device signing key or operator key)."""
    return Ed25519PrivateKey.generate()


# --- armor -------------------------------------------------------------------------------


def _armor(label: str, kind: RecipientKind, raw: bytes) -> bytes:
    body = base64.b64encode(bytes([len(kind)]) + kind.encode("ascii") + raw).decode("ascii")
    lines = [body[i : i + 64] for i in range(0, len(body), 64)]
    return (
        "\n".join([f"-----BEGIN {label}-----", *lines, f"-----END {label}-----"]) + "\n"
    ).encode()


def _dearmor(
    path: Path, text: bytes, label: str, want_private: bool
) -> tuple[RecipientKind, bytes]:
    try:
        lines = text.decode("ascii").strip().splitlines()
    except UnicodeDecodeError:
        raise KeyFileError(f"{path}: not an IOMT HPKE key file (not ASCII text)") from None
    begin, end = f"-----BEGIN {label}-----", f"-----END {label}-----"
    if len(lines) < 3 or lines[0].strip() != begin or lines[-1].strip() != end:
        other = _PUBLIC_LABEL if want_private else _PRIVATE_LABEL
        found = lines[0].strip() if lines else "<empty>"
        hint = (f" (this is the {'public' if want_private else 'private'} key of the pair)"
                if other in found else "")
        raise KeyFileError(
            f"{path}: wrong kind of key file: expected {begin!r}, found {found!r}{hint}"
        )
    try:
        blob = base64.b64decode("".join(s.strip() for s in lines[1:-1]), validate=True)
    except (binascii.Error, ValueError):
        raise KeyFileError(f"{path}: malformed key file (bad base64)") from None
    if not blob or len(blob) < 1 + blob[0]:
        raise KeyFileError(f"{path}: malformed key file (truncated header)")
    kind_text = blob[1 : 1 + blob[0]].decode("ascii", "replace")
    if kind_text not in RECIPIENT_KINDS:
        raise KeyFileError(f"{path}: unsupported recipient key kind {kind_text!r}")
    kind: RecipientKind = "x25519" if kind_text == "x25519" else "mlkem768-x25519"
    raw = blob[1 + blob[0] :]
    want = _RAW_LENGTHS[kind][0 if want_private else 1]
    if len(raw) != want:
        raise KeyFileError(f"{path}: malformed {kind} key: {len(raw)} bytes, expected {want}")
    return kind, raw


# --- files -------------------------------------------------------------------------------


def _write_atomic(path: Path, content: bytes, mode: int, overwrite: bool) -> None:
    """Write ``content`` to ``path`` via a temp file that has ``mode`` before any byte."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    except OSError as e:
        raise KeyFileError(f"{path}: cannot create key file: {e.strerror}") from e
    try:
        try:
            os.fchmod(fd, mode)  # umask may have narrowed it; make it exact
            with os.fdopen(fd, "wb") as f:
                f.write(content)
                f.flush()
                os.fsync(f.fileno())
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        if overwrite:
            tmp.replace(path)
        else:
            try:
                os.link(tmp, path)  # atomic, fails if path exists
            except FileExistsError:
                raise KeyFileError(f"{path}: already exists; refusing to overwrite") from None
            finally:
                tmp.unlink(missing_ok=True)
        _fsync_dir(path.parent)
    except OSError as e:
        raise KeyFileError(f"{path}: cannot write key file: {e.strerror}") from e


def _fsync_dir(directory: Path) -> None:
    """Make a rename durable; best effort (not every filesystem allows it)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _read(path: Path, private: bool) -> bytes:
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        raise KeyFileError(f"{path}: key file not found") from None
    except OSError as e:
        raise KeyFileError(f"{path}: cannot read key file: {e.strerror}") from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise KeyFileError(f"{path}: not a regular file")
        try:
            data = f.read()
        except OSError as e:
            raise KeyFileError(f"{path}: cannot read key file: {e.strerror}") from None
    # A public key where a private one belongs: its kind is the error, not its mode.
    if private and b"PUBLIC KEY" not in data:
        _refuse_open_mode(path, st)
    return data


def _refuse_open_mode(path: Path, st: os.stat_result) -> None:
    if os.name == "posix" and st.st_mode & 0o077:
        raise KeyFileError(
            f"{path}: private key file is accessible by group/others "
            f"(mode {stat.S_IMODE(st.st_mode):04o}); run 'chmod 600 {path}'"
        )


def check_private_file(path: Path) -> None:
    """Refuse a secret file the agent does not parse itself (a TLS client key, an MQTT
    password file) when group or others may access it; raises ``KeyFileError`` naming the
    file and the fix. A missing file is left to the part that reads it."""
    try:
        st = Path(path).stat()
    except OSError:
        return
    _refuse_open_mode(Path(path), st)


def save_private_key(
    path: Path, key: RecipientPrivateKey | Ed25519PrivateKey, *, overwrite: bool = False
) -> None:
    """Write a recipient key (armored) or an Ed25519 key (PKCS#8 PEM) with mode 0600."""
    if isinstance(key, RecipientPrivateKey):
        content = _armor(_PRIVATE_LABEL, key.kind, key.private_bytes_raw())
    else:
        content = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    _write_atomic(Path(path), content, 0o600, overwrite)


def save_public_key(
    path: Path, key: RecipientPublicKey | Ed25519PublicKey, *, overwrite: bool = False
) -> None:
    """Write a recipient public key (armored) or an Ed25519 public key (SPKI PEM), mode 0644."""
    if isinstance(key, RecipientPublicKey):
        content = _armor(_PUBLIC_LABEL, key.kind, key.raw)
    else:
        content = key.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    _write_atomic(Path(path), content, 0o644, overwrite)


def load_recipient_private_key(path: Path) -> RecipientPrivateKey:
    """Load an armored recipient private key; refuses files readable by group/others."""
    kind, raw = _dearmor(Path(path), _read(Path(path), True), _PRIVATE_LABEL, True)
    try:
        return RecipientPrivateKey(kind, raw)
    except ValueError as e:
        raise KeyFileError(f"{path}: invalid {kind} private key: {e}") from None


def load_recipient_public_key(path: Path) -> RecipientPublicKey:
    """Load an armored recipient public key."""
    kind, raw = _dearmor(Path(path), _read(Path(path), False), _PUBLIC_LABEL, False)
    try:
        return RecipientPublicKey(kind, raw)
    except ValueError as e:
        raise KeyFileError(f"{path}: invalid {kind} public key: {e}") from None


def load_signing_key(path: Path) -> Ed25519PrivateKey:
    """Load an Ed25519 private key (PKCS#8 PEM); refuses files readable by group/others."""
    data = _read(Path(path), True)
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as e:
        raise KeyFileError(f"{path}: not an unencrypted PKCS#8 PEM private key: {e}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFileError(
            f"{path}: wrong kind of key: expected Ed25519, found {type(key).__name__}"
        )
    return key


def load_verify_key(path: Path) -> Ed25519PublicKey:
    """Load an Ed25519 public key (SubjectPublicKeyInfo PEM)."""
    data = _read(Path(path), False)
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError) as e:
        raise KeyFileError(f"{path}: not a PEM public key: {e}") from None
    if not isinstance(key, Ed25519PublicKey):
        raise KeyFileError(
            f"{path}: wrong kind of key: expected Ed25519, found {type(key).__name__}"
        )
    return key
