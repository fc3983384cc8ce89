"""The cloud consumer: verify, decrypt, de-duplicate and file sealed results.

Library use::

    r = ResultReceiver(recipients={k.key_id: k}, trusted_devices={"node-1": pub}, out_dir=p)
    r.handle(envelope_bytes)   # -> Received | None (duplicate) ; raises EnvelopeError
"""

from __future__ import annotations

import io
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import pydicom
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from agent.config import Config, ConfigError
from agent.crypto import keys
from agent.crypto.seal import EnvelopeError, open_envelope
from agent.log import get_logger
from agent.transport.mqtt import Connection, Message
from agent.transport.topics import Topics

log = get_logger("agent.receive")


@dataclass(frozen=True)
class Received:
    message_id: str
    device_id: str
    path: Path
    size: int


def _uid_path_part(value: object, what: str) -> str:
    text = str(value or "")
    if not text or not all(c.isdigit() or c == "." for c in text) or len(text) > 64:
        raise EnvelopeError("malformed", f"result has an invalid {what}")
    return text


class ResultReceiver:
    """Opens envelopes and writes DIR/<Study>/<Series>/<SOP>.dcm, dropping duplicates."""

    def __init__(
        self,
        *,
        recipients: Mapping[str, keys.RecipientPrivateKey],
        trusted_devices: Mapping[str, Ed25519PublicKey],
        out_dir: Path,
    ) -> None:
        self.recipients = dict(recipients)
        self.trusted_devices = dict(trusted_devices)
        self.out_dir = out_dir
        self._seen: set[str] = set()

    def handle(self, envelope: bytes) -> Received | None:
        """Verify and decrypt one envelope; None when it is a duplicate of one already filed."""
        opened = open_envelope(
            envelope, recipients=self.recipients, trusted_devices=self.trusted_devices
        )
        if opened.message_id in self._seen:
            return None
        try:
            ds = pydicom.dcmread(io.BytesIO(opened.plaintext), stop_before_pixels=True)
        except Exception as exc:  # pydicom raises many types for bad input
            reason = f"payload is not DICOM: {type(exc).__name__}"
            raise EnvelopeError("malformed", reason) from None
        path = (
            self.out_dir
            / _uid_path_part(ds.get("StudyInstanceUID"), "StudyInstanceUID")
            / _uid_path_part(ds.get("SeriesInstanceUID"), "SeriesInstanceUID")
            / f"{_uid_path_part(ds.get('SOPInstanceUID'), 'SOPInstanceUID')}.dcm"
        )
        if path.exists():
            self._seen.add(opened.message_id)
            return None  # filed by an earlier run
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(opened.plaintext)
        tmp.replace(path)
        # Only once the file is in place: a failed write must not turn the redelivery
        # into a "duplicate" that is acked and lost.
        self._seen.add(opened.message_id)
        return Received(opened.message_id, opened.device_id, path, len(opened.plaintext))


def receiver_from_config(config: Config, out_dir: Path) -> ResultReceiver:
    if config.receiver is None:
        raise ConfigError("config", ["receiver: section required for `iomt-agent receive`"])
    key = keys.load_recipient_private_key(config.receiver.recipient_private_key)
    trusted = {d: keys.load_verify_key(p) for d, p in config.receiver.trusted_devices.items()}
    return ResultReceiver(recipients={key.key_id: key}, trusted_devices=trusted, out_dir=out_dir)


def receive(
    config: Config, out_dir: Path, *, count: int | None, timeout: float | None
) -> tuple[int, int, int]:
    """Subscribe to the site's results and file them until ``count`` arrived or ``timeout``
    seconds passed. Returns (filed, duplicates, rejected)."""
    receiver = receiver_from_config(config, out_dir)
    topics = Topics(config.agent.site, config.agent.device_id)
    lock = threading.Lock()
    done = threading.Event()
    tally = {"filed": 0, "duplicates": 0, "rejected": 0}

    def on_message(msg: Message) -> None:
        try:
            got = receiver.handle(msg.payload)
        except OSError as exc:
            # Not acked: the broker delivers it again after the next reconnect.
            log.error("cannot_write_result", error=exc.strerror, fix="check free disk and "
                      "permissions of the --out directory")
            return
        except EnvelopeError as exc:
            with lock:
                tally["rejected"] += 1
            log.warning("result_rejected", reason=exc.reason, detail=str(exc), topic=msg.topic)
        else:
            with lock:
                if got is None:
                    tally["duplicates"] += 1
                    log.info("duplicate_dropped", topic=msg.topic)
                else:
                    tally["filed"] += 1
                    log.info("result_received", message_id=got.message_id,
                             device_id=got.device_id, bytes=got.size,
                             path=str(got.path.relative_to(out_dir)), n=tally["filed"])
                if count is not None and tally["filed"] >= count:
                    done.set()
        conn.ack(msg)

    rcfg = config.receiver
    client_id = (rcfg.client_id if rcfg and rcfg.client_id
                 else f"iomt-{config.agent.site}-cloud-receiver")
    conn = Connection(config.cloud, client_id, name="cloud", manual_ack=True,
                      subscriptions=(topics.results_filter(all_devices=True),),
                      on_message=on_message)
    conn.start()
    deadline = None if timeout is None else time.monotonic() + timeout
    try:
        while not done.is_set():
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                break
            done.wait(min(left, 1.0) if left is not None else 1.0)
    finally:
        conn.stop()
    return tally["filed"], tally["duplicates"], tally["rejected"]
