"""The cloud consumer: verify, decrypt, de-duplicate and file sealed results.

Library use::

    r = ResultReceiver(recipients={k.key_id: k}, trusted_devices={"node-1": pub}, out_dir=p)
    # while keys rotate: several recipient keys, several keys for one device
    r = ResultReceiver(recipients={old.key_id: old, new.key_id: new},
                       trusted_devices={"node-1": (old_pub, new_pub)}, out_dir=p)
    r.handle(envelope_bytes)   # -> Received | None (duplicate) ; raises EnvelopeError
    r.file(envelope_bytes)     # -> Filed: new, earlier (filed by an earlier run) or repeat
    r.quarantine(envelope_bytes)  # an envelope that cannot be opened now: kept, not lost
    r.retry_quarantine()       # try the kept ones again (e.g. with the right key now)

The MQTT consumer loop of ``iomt-agent receive`` is ``agent.cloud.consumer``.
"""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pydicom
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from agent.config import Config, ConfigError
from agent.crypto import keyring, keys
from agent.crypto.seal import DeviceKeys, EnvelopeError, open_envelope

QUARANTINE_DIR = "quarantine"  # under the output directory
QUARANTINE_SUFFIX = ".iomt"


@dataclass(frozen=True)
class Received:
    message_id: str
    device_id: str
    path: Path
    size: int


@dataclass(frozen=True)
class Filed:
    """What ``ResultReceiver.file`` did with one envelope: ``new`` (written now),
    ``earlier`` (its file was already there: filed by an earlier run) or ``repeat`` (this
    receiver has seen it already)."""

    kind: Literal["new", "earlier", "repeat"]
    message_id: str
    device_id: str
    path: Path | None  # the result's file (None for a repeat)
    size: int
    recipient_key_id: str = ""  # the recipient key it was sealed to
    signer_key_id: str = ""  # the device key that signed it


def _uid_path_part(value: object, what: str) -> str:
    text = str(value or "")
    if not text or not all(c.isdigit() or c == "." for c in text) or len(text) > 64:
        raise EnvelopeError("malformed", f"result has an invalid {what}")
    return text


def _uid_of(ds: pydicom.Dataset, keyword: str) -> str:
    """A UID of the result as a path part. pydicom converts a value when it is first read,
    so a damaged element (a VR it does not know, a length its VR cannot have) raises here,
    not in ``dcmread``: that is ``malformed`` too."""
    try:
        value = ds.get(keyword)
    except Exception as exc:  # pydicom raises many types for bad input
        raise EnvelopeError("malformed", f"result's {keyword} cannot be read "
                                         f"({type(exc).__name__})") from None
    return _uid_path_part(value, keyword)


class ResultReceiver:
    """Opens envelopes and writes DIR/<Study>/<Series>/<SOP>.dcm, dropping duplicates."""

    def __init__(
        self,
        *,
        recipients: Mapping[str, keys.RecipientPrivateKey],
        trusted_devices: Mapping[str, DeviceKeys],
        out_dir: Path,
    ) -> None:
        self.recipients = dict(recipients)
        self.trusted_devices: dict[str, tuple[Ed25519PublicKey, ...]] = {
            d: (k,) if isinstance(k, Ed25519PublicKey) else tuple(k)
            for d, k in trusted_devices.items()
        }
        self.out_dir = out_dir
        self._seen: set[str] = set()

    @property
    def quarantine_dir(self) -> Path:
        return self.out_dir / QUARANTINE_DIR

    def handle(self, envelope: bytes) -> Received | None:
        """Verify and decrypt one envelope; None when it is a duplicate of one already filed."""
        filed = self.file(envelope)
        if filed.kind != "new":
            return None
        assert filed.path is not None
        return Received(filed.message_id, filed.device_id, filed.path, filed.size)

    def file(self, envelope: bytes) -> Filed:
        """Verify, decrypt and write one envelope. Raises EnvelopeError (nothing written) or
        OSError (the write failed: nothing counts as filed)."""
        opened = open_envelope(
            envelope, recipients=self.recipients, trusted_devices=self.trusted_devices
        )
        ids = {"recipient_key_id": opened.recipient_key_id,
               "signer_key_id": opened.signer_key_id}
        if opened.message_id in self._seen:
            return Filed("repeat", opened.message_id, opened.device_id, None, 0, **ids)
        try:
            ds = pydicom.dcmread(io.BytesIO(opened.plaintext), stop_before_pixels=True)
        except Exception as exc:  # pydicom raises many types for bad input
            reason = f"payload is not DICOM: {type(exc).__name__}"
            raise EnvelopeError("malformed", reason) from None
        path = (
            self.out_dir
            / _uid_of(ds, "StudyInstanceUID")
            / _uid_of(ds, "SeriesInstanceUID")
            / f"{_uid_of(ds, 'SOPInstanceUID')}.dcm"
        )
        size = len(opened.plaintext)
        if path.exists():
            self._seen.add(opened.message_id)
            return Filed("earlier", opened.message_id, opened.device_id, path, size, **ids)
        path.parent.mkdir(parents=True, exist_ok=True)
        _durable_write(path, opened.plaintext)
        # Only once the file is in place: a failed write must not turn the redelivery
        # into a "duplicate" that is acked and lost.
        self._seen.add(opened.message_id)
        return Filed("new", opened.message_id, opened.device_id, path, size, **ids)

    def quarantine(self, envelope: bytes) -> Path:
        """Keep an envelope that cannot be opened now (unknown recipient key or device, a
        bad signature, ...) in ``OUT/quarantine/<sha256>.iomt``, so that nothing the
        broker handed over is lost: ``retry_quarantine`` tries it again."""
        name = hashlib.sha256(envelope).hexdigest()[:32] + QUARANTINE_SUFFIX
        path = self.quarantine_dir / name
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            tmp.write_bytes(envelope)
            tmp.replace(path)
        return path

    def retry_quarantine(self) -> Iterator[tuple[Path, Filed | EnvelopeError]]:
        """Try each kept envelope again; one that is filed now (or was filed before) leaves
        the quarantine, one that still fails stays."""
        if not self.quarantine_dir.is_dir():
            return
        for path in sorted(self.quarantine_dir.glob("*" + QUARANTINE_SUFFIX)):
            try:
                filed = self.file(path.read_bytes())
            except EnvelopeError as exc:
                yield path, exc
                continue
            path.unlink()
            yield path, filed


def _durable_write(path: Path, data: bytes) -> None:
    """Write, fsync, rename, fsync the directory: once this returns the file survives a
    power cut, so the receipt that follows may let the agent forget the result."""
    tmp = path.with_suffix(".tmp")
    with tmp.open("wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def receiver_from_config(config: Config, out_dir: Path) -> ResultReceiver:
    if config.receiver is None:
        raise ConfigError("config", ["receiver: section required for `iomt-agent receive`"])
    recipients = keyring.load_recipient_keys(config.receiver.recipient_key_files())
    trusted = keyring.load_device_keys(config.receiver.device_key_files())
    return ResultReceiver(recipients=recipients, trusted_devices=trusted, out_dir=out_dir)
