"""De-identification: the PS3.15 Annex E Basic Application Level Confidentiality Profile.

``Deidentifier`` applies Table E.1-1 (``agent.dicom.deid_table``) to DICOM elements and
datasets, inside sequences too; private elements, curves and overlays are removed. It is
keyed by the site secret:

- a UID is replaced by ``2.25.<the first 128 bits of HMAC-SHA256(secret, "uid\\n" + uid)>``
  (a UUID-derived UID, PS3.5 B.2): the same source UID always maps to the same pseudonym on
  one site, so studies and series stay whole; without the secret no one can link a
  pseudonym to its source, and the site maps back by computing the pseudonyms of its own
  UIDs;
- with Retain Longitudinal Temporal Information with Modified Dates (113107), dates move
  back by a per-patient offset, 1 to 3650 days, from HMAC-SHA256(secret, the PatientID), so
  intervals within one patient's studies are kept.

What it adds: Patient Identity Removed = YES, De-identification Method, its Code Sequence
(113100, plus 113107 / 113108 / 113109 for the options in use) and Longitudinal Temporal
Information Modified (MODIFIED with 113107, REMOVED without).
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import date, timedelta

from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence
from pydicom.uid import UID

from agent.dicom.deid_table import RULES

BASIC_PROFILE = ("113100", "Basic Application Confidentiality Profile")
OPTION_CODES = {
    "dates": ("113107", "Retain Longitudinal Temporal Information Modified Dates Option"),
    "patient": ("113108", "Retain Patient Characteristics Option"),
    "device": ("113109", "Retain Device Identity Option"),
}
MAX_DATE_SHIFT_DAYS = 3650
# D: a dummy value of the VR (PS3.15 E.1.1 leaves its choice to the implementation)
_DUMMY = {"PN": "ANONYMOUS", "DA": "19000101", "TM": "000000", "DT": "19000101000000",
          "AS": "000D", "IS": "0", "DS": "0", "US": 0, "SS": 0, "UL": 0, "SL": 0, "FL": 0.0,
          "FD": 0.0}  # fmt: skip
_DUMMY_TEXT = "ANONYMIZED"


@dataclass(frozen=True)
class DeidOptions:
    """The profile options a site turned on."""

    retain_modified_dates: bool = False  # 113107
    retain_patient_characteristics: bool = False  # 113108
    retain_device_identity: bool = False  # 113109

    @property
    def names(self) -> tuple[str, ...]:
        """The options in use, as Table E.1-1's column names (``deid_table.Rule``)."""
        chosen = (("dates", self.retain_modified_dates),
                  ("patient", self.retain_patient_characteristics),
                  ("device", self.retain_device_identity))
        return tuple(name for name, on in chosen if on)


def shift_date(value: str, days: int) -> str:
    """A DA value (or the date part of a DT value) ``days`` earlier; "" when it is no date."""
    text = value.strip()
    if len(text) < 8 or not text[:8].isdigit():
        return ""
    try:
        moved = date(int(text[:4]), int(text[4:6]), int(text[6:8])) - timedelta(days=days)
    except (ValueError, OverflowError):
        return ""
    return f"{moved:%Y%m%d}" + text[8:]


class Deidentifier:
    """Table E.1-1 with the site's options, keyed by the site secret. Thread-safe (no
    state beyond the secret and options)."""

    def __init__(self, secret: bytes, options: DeidOptions | None = None,
                 type2: Iterable[str] = ()) -> None:
        """``type2``: keywords that are type 2 in the output IOD, so a combined action
        (X/Z...) leaves them empty instead of removing them."""
        if len(secret) < 16:
            raise ValueError("the de-identification secret must be at least 16 bytes")
        self._secret = secret
        self.options = options or DeidOptions()
        self._retained = frozenset(self.options.names)
        self._type2 = frozenset(type2)

    def _mac(self, purpose: str, text: str) -> bytes:
        return hmac.new(self._secret, f"{purpose}\n{text}".encode(), hashlib.sha256).digest()

    def uid(self, uid: str) -> str:
        """The site's pseudonym of a UID (see the module docstring)."""
        return "2.25." + str(int.from_bytes(self._mac("uid", str(uid).strip("\0 "))[:16], "big"))

    def date_offset(self, source: Dataset) -> int:
        """The days the dates of ``source``'s patient move back (113107); 0 without it."""
        if "dates" not in self._retained:
            return 0
        try:
            patient_id = str(source.get("PatientID", "") or "")
        except Exception:  # unreadable PatientID: one offset for all such instances
            patient_id = ""
        mac = self._mac("date-offset", patient_id)
        return 1 + int.from_bytes(mac[:4], "big") % MAX_DATE_SHIFT_DAYS

    def action(self, tag: int) -> str:
        """The one action (D, Z, X, K, C, U or U*) for an attribute of the output."""
        rule = RULES.get(tag)
        if rule is None:
            return "K"
        if rule.retained_by & self._retained:
            return "C" if "dates" in rule.retained_by & self._retained else "K"
        choices = rule.action.split("/")
        if len(choices) == 1:
            return choices[0]
        if "U*" in choices:
            return "U*"
        if "X" in choices and (rule.keyword not in self._type2 or "Z" not in choices):
            return "X"
        return "Z" if "Z" in choices else "D"

    def element(self, elem: DataElement, offset: int = 0) -> DataElement | None:
        """``elem`` de-identified (a new element), or None when it is removed. ``offset``:
        ``date_offset`` of the instance's patient."""
        tag = int(elem.tag)
        group = tag >> 16
        if group % 2 or group & 0xFF00 == 0x5000:
            return None  # private elements and creators; curve data
        if group & 0xFF00 == 0x6000 and tag & 0xFFFF in (0x3000, 0x4000):
            return None  # overlay data and comments
        action = self.action(tag)
        vr = elem.VR
        if action == "X":
            return None
        if action == "Z":
            return DataElement(tag, vr, Sequence() if vr == "SQ" else "")
        if action == "D":
            dummy = Sequence() if vr == "SQ" else _DUMMY.get(vr, _DUMMY_TEXT)
            return DataElement(tag, vr, dummy)
        if action == "U" or (vr == "UI" and tag not in RULES):
            return DataElement(tag, vr, self._uids(elem.value, always=action == "U"))
        if action == "C" and vr in ("DA", "DT"):
            return DataElement(tag, vr, self._dates(elem.value, offset))
        if vr == "SQ":  # K, U* (and C): the items de-identified
            return DataElement(tag, vr, Sequence([self.dataset(item, offset)
                                                  for item in elem.value]))
        return DataElement(tag, vr, elem.value)

    def dataset(self, ds: Dataset, offset: int | None = None) -> Dataset:
        """A de-identified copy of ``ds`` (its elements only: no file meta, no markers).
        ``offset`` defaults to ``date_offset(ds)``."""
        if offset is None:
            offset = self.date_offset(ds)
        out = Dataset()
        for elem in ds:  # converts raw elements
            new = self.element(elem, offset)
            if new is not None:
                out.add(new)
        return out

    def _uids(self, value: object, *, always: bool) -> object:
        """U: every UID mapped; K on a UI element (the safety net for UIDs the table does
        not list): every UID mapped unless it is a registered (well-known) UID."""
        def one(v: object) -> str:
            text = str(v)
            if not text or (not always and UID(text).name != text):  # a registered UID
                return text
            return self.uid(text)

        if isinstance(value, MultiValue | list | tuple):
            return [one(v) for v in value]
        return one(value) if value is not None else value

    @staticmethod
    def _dates(value: object, offset: int) -> object:
        if isinstance(value, MultiValue | list | tuple):
            return [shift_date(str(v), offset) for v in value]
        return shift_date(str(value), offset) if value else value

    def codes(self) -> list[tuple[str, str]]:
        """The De-identification Method codes in use: 113100, then one per option."""
        return [BASIC_PROFILE, *(OPTION_CODES[name] for name in self.options.names)]

    def summary(self) -> dict[str, object]:
        """For the status: on, and the method codes in use (never the secret)."""
        return {"enabled": True, "codes": [value for value, _ in self.codes()]}

    def mark(self, ds: Dataset) -> None:
        """Add what the profile records: Patient Identity Removed, the method and its codes,
        and whether dates were kept (modified) or removed."""
        ds.PatientIdentityRemoved = "YES"
        codes = self.codes()
        ds.DeidentificationMethod = [meaning for _, meaning in codes]  # LO, 1-n
        items = []
        for value, meaning in codes:
            item = Dataset()
            item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, "DCM", meaning
            items.append(item)
        ds.DeidentificationMethodCodeSequence = Sequence(items)
        ds.LongitudinalTemporalInformationModified = (
            "MODIFIED" if "dates" in self._retained else "REMOVED")

