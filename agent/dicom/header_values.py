"""The few header values that decode checks, read from the raw element bytes.

Each value pydicom converts costs it 10-20 us of Python (raw element -> converter hooks ->
value validation -> a new DataElement stored back in the dataset); decode reads about 20.
``header_value`` reads the common, plainly valid encodings of those elements directly and
leaves the element raw in the dataset: US as two little-endian bytes, UI, CS and DS as
short ASCII strings that match their VR's grammar exactly. For those bytes the result is
the value pydicom would give (``tests/dicom/test_header_values.py`` checks it against pydicom on
valid, odd and random bytes). Anything else (big endian, an element pydicom has converted
already, a value outside the strict grammar, a VR other than the dictionary's) is left to
pydicom, so unusual input keeps pydicom's behaviour, warnings and errors.
"""

from __future__ import annotations

import re
from typing import Any

from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset

# keyword -> (tag, VR) for the elements decode reads on every scan.
_ELEMENTS: dict[str, tuple[int, str]] = {
    "SOPClassUID": (0x00080016, "UI"),
    "SOPInstanceUID": (0x00080018, "UI"),
    "StudyInstanceUID": (0x0020000D, "UI"),
    "SeriesInstanceUID": (0x0020000E, "UI"),
    "Modality": (0x00080060, "CS"),
    "PhotometricInterpretation": (0x00280004, "CS"),
    "SamplesPerPixel": (0x00280002, "US"),
    "Rows": (0x00280010, "US"),
    "Columns": (0x00280011, "US"),
    "BitsAllocated": (0x00280100, "US"),
    "BitsStored": (0x00280101, "US"),
    "PixelRepresentation": (0x00280103, "US"),
    "PixelSpacing": (0x00280030, "DS"),
    "RescaleIntercept": (0x00281052, "DS"),
    "RescaleSlope": (0x00281053, "DS"),
}
# Strict grammars (PS3.5 6.2): a value that matches converts the same way in pydicom.
_UI = re.compile(rb"[0-9][0-9.]{0,63}\x00?")
_CS = re.compile(rb"[A-Z0-9_]{1,16} ?")
_DS_ONE = rb"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?"
_DS = re.compile(rb"(?:%s)(?:\\(?:%s))* ?" % (_DS_ONE, _DS_ONE))
_IS = re.compile(rb"[+-]?[0-9]{1,12}(?:\\[+-]?[0-9]{1,12})* ?")


class _Unread:
    """The marker for "not read here: ask pydicom"."""


UNREAD = _Unread()


def _ds_values(raw: bytes) -> Any:
    parts = raw.rstrip(b" ").split(b"\\")
    if any(len(p) > 16 for p in parts):  # a DS value is at most 16 bytes
        return UNREAD
    values = [float(p) for p in parts]
    return values[0] if len(values) == 1 else values


def header_value(ds: Dataset, keyword: str) -> Any:
    """The value of ``keyword`` as the decode checks use it (int for US, str for UI and CS,
    float or a list of floats for DS, None when absent), or ``UNREAD`` when pydicom must
    read it. Never converts the element in ``ds``."""
    entry = _ELEMENTS.get(keyword)
    if entry is None:
        return UNREAD
    tag, vr = entry
    raw = ds.get_item(tag)
    if raw is None:
        return None
    if not isinstance(raw, RawDataElement) or not raw.is_little_endian:
        return UNREAD
    if raw.VR not in (None, vr):  # None: implicit VR, the dictionary's VR applies
        return UNREAD
    value = raw.value
    if not isinstance(value, bytes) or not value:
        return UNREAD
    if vr == "US":
        return int.from_bytes(value, "little") if len(value) == 2 else UNREAD
    if vr == "UI":
        return value.rstrip(b"\x00").decode("ascii") if _UI.fullmatch(value) else UNREAD
    if vr == "CS":
        return value.rstrip(b" ").decode("ascii") if _CS.fullmatch(value) else UNREAD
    return _ds_values(value) if _DS.fullmatch(value) else UNREAD


def get(ds: Dataset, keyword: str) -> Any:
    """``header_value`` when it can read the element, else ``ds.get(keyword)``."""
    value = header_value(ds, keyword)
    return ds.get(keyword) if value is UNREAD else value


def canonical_number_string(raw: object, vr: str) -> bytes | None:
    """The value bytes pydicom writes back for a raw IS or DS element it read (the value
    with its trailing space padding restored), when the raw value is plainly valid; None
    otherwise (the caller then lets pydicom convert and encode it).

    pydicom reads such a value into IS/DSfloat objects that keep their original string
    and writes ``str()`` of each, so a valid value round-trips to its own bytes."""
    if not isinstance(raw, RawDataElement) or not raw.is_little_endian:
        return None
    if raw.VR not in (None, vr) or not isinstance(raw.value, bytes):
        return None
    value = raw.value
    grammar = _DS if vr == "DS" else _IS
    if not grammar.fullmatch(value):
        return None
    text = value.rstrip(b" ")
    if vr == "DS" and any(len(p) > 16 for p in text.split(b"\\")):
        return None
    return text + b" " if len(text) % 2 else text
