"""The ``[gateway]`` section: the DICOM C-STORE gateway into MQTT (``iomt-agent gateway``).

Kept apart from ``agent.config`` (which only names the field). Nothing here imports
pynetdicom: SOP classes are given by keyword (the table below) or as dotted UIDs, and the
gateway resolves and checks them when it starts.
"""

from __future__ import annotations

import re

from pydantic import BaseModel, ConfigDict, Field, field_validator

from agent.transport.topics import TopicError, check_level

MIB = 1024 * 1024

# The image storage SOP classes a single-frame grayscale model can take (PS3.4 B.5).
STORAGE_CLASSES: dict[str, str] = {
    "MRImageStorage": "1.2.840.10008.5.1.4.1.1.4",
    "CTImageStorage": "1.2.840.10008.5.1.4.1.1.2",
    "SecondaryCaptureImageStorage": "1.2.840.10008.5.1.4.1.1.7",
    "MultiFrameGrayscaleWordSecondaryCaptureImageStorage": "1.2.840.10008.5.1.4.1.1.7.3",
    "EnhancedMRImageStorage": "1.2.840.10008.5.1.4.1.1.4.1",
    "EnhancedCTImageStorage": "1.2.840.10008.5.1.4.1.1.2.1",
    "PositronEmissionTomographyImageStorage": "1.2.840.10008.5.1.4.1.1.128",
    "DigitalXRayImageStorageForPresentation": "1.2.840.10008.5.1.4.1.1.1.1",
    "ComputedRadiographyImageStorage": "1.2.840.10008.5.1.4.1.1.1",
}
_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
# PS3.5 6.2, AE: up to 16 characters of the default repertoire, no backslash, no control
# characters; leading and trailing spaces are not significant (and not allowed here).
_AE_TITLE = re.compile(r"^[\x21-\x5B\x5D-\x7E]([\x20-\x5B\x5D-\x7E]{0,14}[\x21-\x5B\x5D-\x7E])?$")


def check_ae_title(value: str) -> str:
    if not _AE_TITLE.fullmatch(value):
        raise ValueError(
            f"AE title {value!r} is not valid: 1-16 printable ASCII characters, no backslash, "
            "no leading or trailing space")
    return value


def sop_class_uid(value: str) -> str:
    """The UID of a SOP class given by keyword (``STORAGE_CLASSES``) or as a dotted UID."""
    if value in STORAGE_CLASSES:
        return STORAGE_CLASSES[value]
    if _UID.fullmatch(value) and len(value) <= 64:
        return value
    known = ", ".join(STORAGE_CLASSES)
    raise ValueError(f"SOP class {value!r} is neither a dotted UID nor one of {known}")


class GatewaySection(BaseModel):
    """``iomt-agent gateway``: a Storage SCP whose instances go to the site's scan topic."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    ae_title: str = Field(
        "IOMT-GW", title="Gateway AE title",
        description="The called AE title modalities must address (1-16 characters)")
    host: str = Field(
        "0.0.0.0", title="Listen address",  # noqa: S104 - scanners are on the network
        description="Address the Storage SCP listens on (0.0.0.0: every interface)")
    port: int = Field(11112, ge=1, le=65535, title="DICOM port",
                      description="TCP port of the Storage SCP (11112 is DICOM's registered one)")
    allowed_calling_ae_titles: list[str] = Field(
        min_length=1, title="Allowed calling AE titles",
        description="Only associations from these calling AE titles are accepted; others are "
        "rejected (A-ASSOCIATE-RJ, calling AE title not recognised)")
    sop_classes: list[str] = Field(
        default_factory=lambda: ["MRImageStorage", "CTImageStorage"], min_length=1,
        title="Storage SOP classes",
        description="Accepted storage SOP classes, by keyword (MRImageStorage, CTImageStorage, "
        "SecondaryCaptureImageStorage, ...) or dotted UID; others are not negotiated")
    transfer_syntaxes: list[str] | None = Field(
        None, title="Transfer syntaxes",
        description="Accepted transfer syntax UIDs; default: every syntax the agent's decoders "
        "installed here can decode (native, RLE, and JPEG / JPEG-LS / JPEG 2000 with the jpeg "
        "extra); Deflated is never accepted")
    max_associations: int = Field(
        4, ge=1, le=64, title="Concurrent associations",
        description="More associations at once are rejected (transient: the modality retries)")
    max_pdu_bytes: int = Field(
        65536, ge=4096, le=4 * MIB, title="Maximum PDU size",
        description="Largest P-DATA PDU the gateway receives")
    network_timeout_s: float = Field(
        60.0, gt=0, le=3600, title="Network timeout",
        description="An idle association is closed after this many seconds")
    ack_timeout_s: float = Field(
        5.0, gt=0, le=600, title="Broker ack wait",
        description="How long a C-STORE waits for the edge broker's PUBACK before the instance "
        "goes to the gateway's spool instead (success is answered only after one of the two)")
    keep_until_accepted: bool = Field(
        True, title="Keep until the agent accepts",
        description="Keep each instance in the spool after the broker's PUBACK until an "
        "agent's `accepted` receipt (it is in the agent's inbox), and publish it again after "
        "every reconnect and when the receipt is overdue: nothing is lost to an edge broker "
        "that acks and then crashes. false: the PUBACK deletes it")
    accepted_timeout_s: float = Field(
        60.0, gt=0, le=3600, title="Accepted receipt wait",
        description="Seconds after the PUBACK before an instance with no `accepted` receipt "
        "is published again; the wait doubles per try, up to 1 h")
    spool_max_bytes: int = Field(
        4096 * MIB, ge=MIB, title="Spool cap",
        description="Bytes of instances kept while the broker is away; when full, C-STORE "
        "answers 0xA700 (out of resources) and the modality keeps the instance")
    source: str = Field(
        "gateway", title="Topic source level",
        description="Last level of the scan topic: iomt/<site>/scans/<source>")

    @field_validator("ae_title")
    @classmethod
    def _ae(cls, value: str) -> str:
        return check_ae_title(value)

    @field_validator("allowed_calling_ae_titles")
    @classmethod
    def _calling(cls, values: list[str]) -> list[str]:
        return [check_ae_title(v) for v in values]

    @field_validator("sop_classes")
    @classmethod
    def _classes(cls, values: list[str]) -> list[str]:
        for v in values:
            sop_class_uid(v)
        return values

    @field_validator("transfer_syntaxes")
    @classmethod
    def _syntaxes(cls, values: list[str] | None) -> list[str] | None:
        for v in values or ():
            if not (_UID.fullmatch(v) and len(v) <= 64):
                raise ValueError(f"transfer syntax {v!r} is not a dotted UID")
        if values is not None and not values:
            raise ValueError("give at least one transfer syntax, or leave the key out")
        return values

    @field_validator("source")
    @classmethod
    def _source(cls, value: str) -> str:
        try:
            return check_level(value, "source")
        except TopicError as exc:
            raise ValueError(str(exc)) from None

    def sop_class_uids(self) -> list[str]:
        return [sop_class_uid(v) for v in self.sop_classes]
