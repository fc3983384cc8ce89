"""header_value reads what pydicom would read, or leaves the element to pydicom."""

from __future__ import annotations

import io
import struct
import warnings
from typing import Any

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset

from agent.dicom.header_values import _ELEMENTS, UNREAD, get, header_value

VALUES: dict[str, list[bytes]] = {
    "US": [b"\x00\x01", b"\x10\x00", b"\xff\xff", b"\x01\x00\x02\x00", b"\x01"],
    "UI": [b"1.2.840.10008.5.1.4.1.1.4", b"1.2.3\x00", b"1.2.34", b" 1.2\x00", b"1.2\x00\x00",
           b"1.2.3 ", b"1..2", b"1.2\\3.4", b"9" * 64, b"9" * 65, b"abc", b"1.2\xff"],
    "CS": [b"MR", b"MR ", b" MR ", b"MONOCHROME2 ", b"MONOCHROME1", b"mr", b"M R",
           b"ORIGINAL\\PRIMARY", b"A" * 16, b"A" * 17 + b" ", b"\xc3\xa9T"],
    "DS": [b"0.8\\0.8 ", b"1", b"1.5 ", b" 1.5 ", b"-1024", b"+2.5e-3", b".5", b"5.",
           b"1e400", b"nan", b"inf", b"1_0", b"12345678901234567", b"0.5\\", b"1,5",
           b"0.9765625\\0.9765625", b"1\\2\\3"],
}


def _explicit(tag: int, vr: str, value: bytes) -> bytes:
    return struct.pack("<HH2sH", tag >> 16, tag & 0xFFFF, vr.encode(), len(value)) + value


def _implicit(tag: int, value: bytes) -> bytes:
    return struct.pack("<HHI", tag >> 16, tag & 0xFFFF, len(value)) + value


def _dataset(data: bytes) -> Dataset:
    return pydicom.dcmread(io.BytesIO(data), force=True)


def _as_used(keyword: str, vr: str, value: Any) -> Any:
    """pydicom's value in the form the decode checks use it."""
    if value is None or value == "":
        return value
    if vr == "US":
        return int(value)
    if vr in ("UI", "CS"):
        return str(value)
    if isinstance(value, pydicom.multival.MultiValue):
        return [float(v) for v in value]
    return float(value)


CASES = [(k, v) for k, (_, vr) in sorted(_ELEMENTS.items()) for v in VALUES[vr]]


@pytest.mark.parametrize(("keyword", "raw"), CASES)
@pytest.mark.parametrize("implicit", [False, True], ids=["explicit", "implicit"])
def test_same_value_as_pydicom_or_unread(keyword: str, raw: bytes, implicit: bool) -> None:
    tag, vr = _ELEMENTS[keyword]
    padded = raw + (b" " if len(raw) % 2 else b"")
    data = _implicit(tag, padded) if implicit else _explicit(tag, vr, padded)
    fast = header_value(_dataset(data), keyword)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            expected = _as_used(keyword, vr, _dataset(data).get(keyword))
        except Exception:  # pydicom cannot read it: it must not have been read here
            assert fast is UNREAD
            return
    if fast is not UNREAD:
        assert fast == expected
        assert type(fast) is type(expected)


def test_random_bytes_never_disagree_with_pydicom() -> None:
    rng = np.random.default_rng(7)
    alphabet = np.frombuffer(b"0123456789.\\ +-eEAMR_\x00", dtype=np.uint8)
    for i in range(400):
        keyword = sorted(_ELEMENTS)[i % len(_ELEMENTS)]
        tag, vr = _ELEMENTS[keyword]
        raw = bytes(rng.choice(alphabet, size=int(rng.integers(1, 20))).tolist())
        raw += b" " if len(raw) % 2 else b""
        data = _explicit(tag, vr, raw)
        fast = header_value(_dataset(data), keyword)
        if fast is UNREAD:
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            expected = _as_used(keyword, vr, _dataset(data).get(keyword))
        assert fast == expected, (keyword, raw)


def test_what_is_left_to_pydicom() -> None:
    tag, vr = _ELEMENTS["Rows"]
    big = struct.pack(">HH2sH", tag >> 16, tag & 0xFFFF, b"US", 2) + b"\x01\x00"
    big_ds = pydicom.dcmread(io.BytesIO(big), force=True)
    if not big_ds.original_encoding[1]:  # read as big endian: left to pydicom
        assert header_value(big_ds, "Rows") is UNREAD
    ds = _dataset(_explicit(tag, vr, b"\x00\x01"))
    assert header_value(ds, "Columns") is None  # absent
    assert header_value(ds, "SeriesDescription") is UNREAD  # not one of the table's
    assert ds.Rows == 256  # pydicom converts it now
    assert header_value(ds, "Rows") is UNREAD and get(ds, "Rows") == 256
    wrong_vr = _dataset(_explicit(tag, "SS", b"\x00\x01"))
    assert header_value(wrong_vr, "Rows") is UNREAD
