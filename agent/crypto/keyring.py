"""Key rings: the several keys a receiver holds while keys rotate.

* recipient keys: every HPKE private key the receiver holds, by key id (an envelope's
  header names the one it was sealed to);
* device keys: every Ed25519 public key trusted for a device (its old and its new signing
  key while the device rotates it).

``describe`` gives what may be logged about a ring: kinds and key ids, never key bytes.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from agent.crypto.keys import (
    KeyFileError,
    RecipientPrivateKey,
    load_recipient_private_key,
    load_verify_key,
    signing_key_id,
)


def load_recipient_keys(paths: Iterable[Path]) -> dict[str, RecipientPrivateKey]:
    """Load recipient private keys (each 0600) and index them by key id. Raises
    ``KeyFileError`` for the first file that cannot be used, or for an empty list."""
    ring: dict[str, RecipientPrivateKey] = {}
    for path in paths:
        key = load_recipient_private_key(path)
        ring[key.key_id] = key
    if not ring:
        raise KeyFileError("receiver.recipient_private_key: no key file named")
    return ring


def load_device_keys(
    files: Mapping[str, Iterable[Path]],
) -> dict[str, tuple[Ed25519PublicKey, ...]]:
    """Load every trusted device's public signing keys. Raises ``KeyFileError`` for the
    first file that cannot be used, or a device with no file."""
    ring: dict[str, tuple[Ed25519PublicKey, ...]] = {}
    for device, paths in files.items():
        loaded = tuple(load_verify_key(p) for p in paths)
        if not loaded:
            raise KeyFileError(f"receiver.trusted_devices.{device}: no key file named")
        ring[device] = loaded
    return ring


def describe(
    recipients: Mapping[str, RecipientPrivateKey],
    devices: Mapping[str, Iterable[Ed25519PublicKey]],
) -> dict[str, object]:
    """Key ids of the rings, for a log line (public information only)."""
    return {
        "recipient_key_ids": sorted(recipients),
        "device_key_ids": {d: [signing_key_id(k) for k in ks] for d, ks in devices.items()},
    }
