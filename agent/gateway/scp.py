"""The only module that imports pynetdicom: the Storage SCP of ``iomt-agent gateway``.

It negotiates the configured storage SOP classes (each with the accepted transfer
syntaxes) and Verification (C-ECHO), rejects associations from calling AE titles outside the
allow-list or to another called AE title (A-ASSOCIATE-RJ, permanent) and above the
association limit (transient), and hands each C-STORE to ``Intake.take``, answering with
the status it returns. pynetdicom's own logger is kept at ERROR: its debug output dumps
data sets (PHI).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from pynetdicom import AE, evt
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from agent.config_gateway import GatewaySection
from agent.gateway.intake import CANNOT_UNDERSTAND, Intake, Request
from agent.log import get_logger

log = get_logger("agent.gateway")


@dataclass(frozen=True)
class Listening:
    host: str
    port: int


class StorageScp:
    """One listening Storage SCP; ``start`` binds, ``stop`` closes every association."""

    def __init__(self, section: GatewaySection, intake: Intake, syntaxes: list[str]) -> None:
        logging.getLogger("pynetdicom").setLevel(logging.ERROR)
        self.section = section
        self.intake = intake
        ae = AE(ae_title=section.ae_title)
        ae.maximum_associations = section.max_associations
        ae.maximum_pdu_size = section.max_pdu_bytes
        ae.network_timeout = section.network_timeout_s
        ae.require_called_aet = True
        ae.require_calling_aet = list(section.allowed_calling_ae_titles)
        for uid in section.sop_class_uids():
            ae.add_supported_context(uid, syntaxes)
        ae.add_supported_context(Verification)
        self._ae = ae
        self._server: Any = None

    def start(self) -> Listening:
        """Bind and serve in pynetdicom's threads. Raises OSError (port taken, ...)."""
        handlers: list[Any] = [
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_ACCEPTED, self._on_accepted),
            (evt.EVT_REQUESTED, self._on_requested),
        ]
        self._server = self._ae.start_server(
            (self.section.host, self.section.port), block=False, evt_handlers=handlers)
        host, port = self._server.server_address[:2]
        return Listening(str(host), int(port))

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None

    # -- pynetdicom's handler threads ----------------------------------------------------
    def _on_store(self, event: Any) -> int:
        try:
            request = Request(
                sop_class_uid=str(event.request.AffectedSOPClassUID),
                sop_instance_uid=str(event.request.AffectedSOPInstanceUID),
                calling_ae=_ae_text(event.assoc.requestor.ae_title),
                transfer_syntax=str(event.context.transfer_syntax),
            )
            part10 = event.encoded_dataset(include_meta=True)
        except Exception as exc:  # a request pynetdicom could not hand over whole
            log.warning("cstore_refused", reason="not_dicom", status=f"0x{CANNOT_UNDERSTAND:04X}",
                        detail=f"the request cannot be read: {type(exc).__name__}")
            return CANNOT_UNDERSTAND
        return self.intake.take(request, part10).status

    def _on_echo(self, event: Any) -> int:
        log.info("cecho", calling_ae=_ae_text(event.assoc.requestor.ae_title))
        return 0x0000

    def _on_requested(self, event: Any) -> None:
        primitive = event.assoc.requestor.primitive  # the A-ASSOCIATE-RQ, before negotiation
        calling = _ae_text(getattr(primitive, "calling_ae_title", ""))
        called = _ae_text(getattr(primitive, "called_ae_title", ""))
        address = str(event.assoc.requestor.address)
        if calling not in self.section.allowed_calling_ae_titles:
            log.warning("association_refused", calling_ae=calling, address=address,
                        why="calling AE title not in gateway.allowed_calling_ae_titles",
                        fix="add it to the allow-list if this modality may send")
        elif called != self.section.ae_title:
            log.warning("association_refused", calling_ae=calling, address=address,
                        why=f"called AE title {called!r} is not gateway.ae_title "
                        f"{self.section.ae_title!r}", fix="configure the modality to call "
                        f"{self.section.ae_title!r}")

    def _on_accepted(self, event: Any) -> None:
        refused = sorted({_class_name(c.abstract_syntax)
                          for c in event.assoc.rejected_contexts})
        # Modalities (and storescu) propose many classes at once: name a few refused ones.
        extra = {"refused_contexts": len(refused), "refused_examples": refused[:4]} if (
            refused) else {}
        log.info("association_accepted", calling_ae=_ae_text(event.assoc.requestor.ae_title),
                 address=str(event.assoc.requestor.address),
                 contexts=len(event.assoc.accepted_contexts), **extra)


def _ae_text(value: object) -> str:
    text = value.decode("ascii", "replace") if isinstance(value, bytes) else str(value)
    return text.strip()


def _class_name(uid: object) -> str:
    from pydicom.uid import UID

    known = UID(str(uid))
    return str(known.name) if known.name != str(uid) else str(uid)
