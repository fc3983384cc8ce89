"""The ``[receiver]`` section of the config: the keys of ``iomt-agent receive`` (the cloud
side). Kept apart from ``agent.config`` only for its size.

Both key settings take one file or a list of files, so keys rotate without downtime: the
receiver holds the old and the new recipient key (and trusts a device's old and new
signing key) until nothing sealed with the old one can still arrive. ``docs/security.md``,
"Key rotation", gives the order of the steps.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PlainValidator,
    WithJsonSchema,
    field_validator,
)


def _one_or_more(value: object) -> Path | list[Path]:
    if isinstance(value, str | Path) and str(value):
        return Path(value)
    if (isinstance(value, list) and value
            and all(isinstance(v, str | Path) and str(v) for v in value)):
        return [Path(v) for v in value]
    raise ValueError("expected a file path or a non-empty list of file paths")


_SCHEMA = {"anyOf": [{"type": "string"},
                     {"type": "array", "items": {"type": "string"}, "minItems": 1}]}
# One file, or several while a key rotates.
OneOrMore = Annotated[Path | list[Path], PlainValidator(_one_or_more), WithJsonSchema(_SCHEMA)]


def as_list(value: OneOrMore) -> list[Path]:
    """The files of a one-or-more setting, in the order written."""
    return list(value) if isinstance(value, list) else [value]


class ReceiverSection(BaseModel):
    """Keys for ``iomt-agent receive``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    recipient_private_key: OneOrMore = Field(
        title="Recipient private key(s)",
        description="The cloud's HPKE private key (0600), or a list of them while the key "
        "rotates: an envelope opens with whichever key its header names by key id",
    )
    trusted_devices: dict[str, OneOrMore] = Field(
        title="Trusted devices",
        description="device id -> its Ed25519 public key file, or a list of them while the "
        "device's signing key rotates: a signature by any of them is accepted",
    )
    client_id: str | None = Field(None, title="Client id", description="Receiver client id")

    @field_validator("trusted_devices")
    @classmethod
    def _some_device(cls, value: dict[str, Any]) -> dict[str, Any]:
        if not value:
            raise ValueError('empty: name each device with its signing public key, e.g. '
                             '{ "node-1" = "keys/node-1.pub" } (with none, every result is '
                             "quarantined)")
        return value

    def recipient_key_files(self) -> list[Path]:
        return as_list(self.recipient_private_key)

    def device_key_files(self) -> dict[str, list[Path]]:
        return {device: as_list(v) for device, v in self.trusted_devices.items()}

    def resolved(self, fix: Callable[[Path], Path]) -> ReceiverSection:
        """A copy with every path passed through ``fix`` (``Config.resolve``)."""

        def each(value: OneOrMore) -> OneOrMore:
            return [fix(p) for p in value] if isinstance(value, list) else fix(value)

        return self.model_copy(update={
            "recipient_private_key": each(self.recipient_private_key),
            "trusted_devices": {d: each(v) for d, v in self.trusted_devices.items()},
        })
