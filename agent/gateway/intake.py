"""What the gateway does with one received instance, apart from the DIMSE wire.

``Intake.take`` checks an instance (size, parse, SOP class and instance against the C-STORE
request), hands it to the ``Forwarder`` and returns the DIMSE status to answer with and, for
a refusal, a reason code from ``GATEWAY_REASONS`` (agent.errors). Every refusal is logged as
``cstore_refused`` with the reason, the status and figures, never a header value (no PHI).
"""

from __future__ import annotations

import hashlib
import sqlite3
import warnings
from dataclasses import dataclass
from io import BytesIO

import pydicom
from pydicom.uid import (
    UID,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    RLELossless,
)

from agent.dicom.codestream import J2K_FAMILY, JPEG_FAMILY
from agent.errors import GATEWAY_REASONS
from agent.gateway.forwarder import BrokerRefused, Forwarder, Outcome
from agent.gateway.spool import SpoolFull
from agent.log import get_logger

log = get_logger("agent.gateway")

# DIMSE C-STORE statuses (PS3.4 Annex B.2.3, PS3.7 Annex C).
SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
DATASET_MISMATCH = 0xA900  # data set does not match SOP class
CANNOT_UNDERSTAND = 0xC000
SOP_CLASS_NOT_SUPPORTED = 0x0122

NATIVE_SYNTAXES = (ImplicitVRLittleEndian, ExplicitVRLittleEndian, ExplicitVRBigEndian)


def decodable_syntaxes() -> list[str]:
    """Every transfer syntax whose pixel data the agent can decode with what is installed
    here (pydicom's own answer per syntax); Deflated never (agent.dicom.decode refuses it)."""
    from pydicom.pixels.decoders.base import get_decoder

    found = [str(s) for s in NATIVE_SYNTAXES]
    for syntax in (RLELossless, *JPEG_FAMILY, *J2K_FAMILY):
        try:
            if get_decoder(syntax).is_available:
                found.append(str(syntax))
        except Exception:  # pydicom has no decoder for it at all  # noqa: S112
            continue
    return found


def syntax_name(uid: str) -> str:
    known = UID(uid)
    return str(known.name) if known.is_transfer_syntax else uid


@dataclass(frozen=True)
class Answer:
    status: int
    reason: str | None = None  # a GATEWAY_REASONS code for a refusal
    outcome: Outcome | None = None


@dataclass(frozen=True)
class Request:
    """What the C-STORE request says, and who sent it."""

    sop_class_uid: str
    sop_instance_uid: str
    calling_ae: str
    transfer_syntax: str


class Intake:
    def __init__(self, forwarder: Forwarder, *, sop_classes: list[str],
                 max_instance_bytes: int) -> None:
        self.forwarder = forwarder
        self.sop_classes = frozenset(sop_classes)
        self.max_instance_bytes = max_instance_bytes

    def take(self, request: Request, part10: bytes) -> Answer:
        """Check one instance (a Part-10 encoding) and make it safe; the status to answer."""
        if request.sop_class_uid not in self.sop_classes:
            return self._refuse(SOP_CLASS_NOT_SUPPORTED, "sop_class_not_supported", request,
                                part10, f"SOP class {_class_name(request.sop_class_uid)} is "
                                "not in gateway.sop_classes")
        if len(part10) > self.max_instance_bytes:
            return self._refuse(OUT_OF_RESOURCES, "instance_too_large", request, part10,
                                f"{len(part10)} bytes, limits.max_payload_bytes is "
                                f"{self.max_instance_bytes}")
        try:
            with warnings.catch_warnings():  # pydicom's warnings about bad input: not logged
                warnings.simplefilter("ignore")
                ds = pydicom.dcmread(BytesIO(part10), stop_before_pixels=True)
                sop_class = str(ds.get("SOPClassUID", "") or "")
                sop_instance = str(ds.get("SOPInstanceUID", "") or "")
        except Exception:  # pydicom raises many kinds for bad input
            return self._refuse(CANNOT_UNDERSTAND, "not_dicom", request, part10,
                                "the data set cannot be parsed")
        if not (sop_class and sop_instance):
            return self._refuse(CANNOT_UNDERSTAND, "not_dicom", request, part10,
                                "the data set has no SOPClassUID or SOPInstanceUID")
        if sop_class != request.sop_class_uid or sop_instance != request.sop_instance_uid:
            which = "SOPClassUID" if sop_class != request.sop_class_uid else "SOPInstanceUID"
            return self._refuse(DATASET_MISMATCH, "dataset_mismatch", request, part10,
                                f"the data set's {which} is not the one in the C-STORE "
                                "request")
        try:
            outcome = self.forwarder.store(sop_instance, part10)
        except SpoolFull as exc:
            return self._refuse(OUT_OF_RESOURCES, "spool_full", request, part10, str(exc))
        except BrokerRefused as exc:
            return self._refuse(OUT_OF_RESOURCES, "broker_refused", request, part10, str(exc))
        except (OSError, sqlite3.Error) as exc:
            return self._refuse(OUT_OF_RESOURCES, "spool_failed", request, part10,
                                f"{type(exc).__name__}: {exc}")
        log.info("cstore_accepted", calling_ae=request.calling_ae, bytes=len(part10),
                 sop_class=_class_name(sop_class), outcome=outcome.value,
                 sha256=hashlib.sha256(part10).hexdigest()[:16])
        return Answer(SUCCESS, outcome=outcome)

    def _refuse(self, status: int, reason: str, request: Request, part10: bytes,
                detail: str) -> Answer:
        assert reason in GATEWAY_REASONS, reason
        log.warning("cstore_refused", reason=reason, status=f"0x{status:04X}", detail=detail,
                    calling_ae=request.calling_ae, bytes=len(part10),
                    transfer_syntax=syntax_name(request.transfer_syntax),
                    sha256=hashlib.sha256(part10).hexdigest()[:16])
        return Answer(status, reason)


def _class_name(uid: str) -> str:
    known = UID(uid)
    return str(known.name) if known.name != uid else uid
