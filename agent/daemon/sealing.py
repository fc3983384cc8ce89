"""The agent's seal keys, swappable while it runs (``systemctl reload``).

``Sealer`` holds the cloud's recipient public key and this node's signing key. A reload
reads ``[seal]`` again: new keys are loaded first and swapped in whole, so every result is
sealed either with the old pair or with the new one; keys that cannot be loaded are
refused and the running ones keep sealing. Log lines carry key ids only (public
fingerprints), never key bytes.

Rotation of the cloud key: the receiver holds both keys (``receiver.recipient_private_key``
as a list), the node's ``seal.recipient_public_key`` is pointed at the new public key, and
a reload makes every result sealed from then on go to the new key. A device key rotates the
same way (``receiver.trusted_devices`` lists both public keys). See ``docs/security.md``.

The AEAD (``seal.aead``, ``agent.crypto.aead_choice``) is resolved at start and at each
reload, and the envelope version (``seal.envelope_version``) read; the status and the
``seal_keys`` log line name both, and why that AEAD.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.config import BrokerConfig, SealSection
from agent.crypto import keys, seal
from agent.crypto.aead_choice import AeadChoice, choose_aead
from agent.log import get_logger

log = get_logger("agent.daemon.sealing")


@dataclass(frozen=True)
class SealKeys:
    recipient: keys.RecipientPublicKey
    signing_key: Ed25519PrivateKey

    @classmethod
    def load(cls, section: SealSection) -> SealKeys:
        """Both keys of ``[seal]``; raises ``KeyFileError`` naming the file and the fix."""
        return cls(keys.load_recipient_public_key(section.recipient_public_key),
                   keys.load_signing_key(section.device_signing_key))

    def ids(self) -> dict[str, str]:
        return {"recipient_key_id": self.recipient.key_id,
                "signing_key_id": keys.signing_key_id(self.signing_key)}


def refuse_open_secrets(*brokers: tuple[str, BrokerConfig]) -> None:
    """The secrets the agent hands to TLS and MQTT unread (client keys, password files):
    refuse to start when group or others may read one (``KeyFileError``, exit 2)."""
    for role, cfg in brokers:
        for name in ("key_file", "password_file"):
            path: Path | None = getattr(cfg, name)
            if path is not None:
                try:
                    keys.check_private_file(path)
                except keys.KeyFileError as exc:
                    raise keys.KeyFileError(f"{role}.{name}: {exc}") from None


class Sealer:
    """Seals results with the current keys; ``reload`` swaps them."""

    def __init__(self, section: SealSection, device_id: str) -> None:
        self._keys = SealKeys.load(section)
        self._aead: AeadChoice = choose_aead(section.aead)
        self._version = section.envelope_version
        self._device_id = device_id
        self._lock = threading.Lock()

    def __call__(self, plaintext: bytes, message_id: str) -> bytes:
        current = self._keys  # one read: a reload cannot mix the old and the new pair
        return seal.seal(plaintext, recipient=current.recipient,
                         signing_key=current.signing_key, device_id=self._device_id,
                         message_id=message_id, content_type="application/dicom",
                         aead=self._aead.aead, version=self._version)

    def summary(self) -> dict[str, str | int]:
        """Key ids, the suite and the envelope version, for the status and the log."""
        return {**self._keys.ids(),
                "suite": seal.suite_name(self._keys.recipient.kind, self._aead.aead),
                "aead_reason": self._aead.reason, "envelope_version": self._version}

    def reload(self, section: SealSection) -> bool:
        """Swap in the keys ``section`` (``[seal]`` read again on SIGHUP) names; False
        (logged, the current keys keep sealing) when a key cannot be used."""
        with self._lock:
            try:
                new = SealKeys.load(section)
            except keys.KeyFileError as exc:
                log.error("seal_keys_refused", reason=str(exc), serving=self.summary(),
                          fix="fix [seal] in the config or the key file named, then "
                          "`systemctl reload iomt-agent`; the current keys keep sealing")
                return False
            old, self._keys = self._keys.ids(), new
            aead, self._aead = self._aead, choose_aead(section.aead)
            self._version = section.envelope_version
        changed = {k: v for k, v in new.ids().items() if old[k] != v}
        if changed:
            log.info("seal_keys_rotated", **new.ids(),
                     previous={k: old[k] for k in changed})
        if aead.aead != self._aead.aead:
            log.info("seal_aead_changed", aead=self._aead.aead, previous=aead.aead,
                     reason=self._aead.reason)
        return True
