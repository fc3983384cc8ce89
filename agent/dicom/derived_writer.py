"""The derived instance, written per slice from a per-series template.

Encoding a whole pydicom Dataset per slice costs milliseconds of pure Python (one Dataset
with about 60 elements built, then every element converted and encoded). Almost all of it
is the same for every slice of a series, so ``DerivedWriter`` keeps it encoded:

- a **template** per output series (model, output contract, device, source series, grid,
  character set): the bytes of the agent's own elements that do not change per slice, cut
  out of one instance that pydicom wrote as a whole (``derive.derived_dataset`` ->
  ``derive.encode_generic``), so they are pydicom's bytes by construction;
- a **memo** of the copied source elements (patient, study, frame of reference...), keyed
  by the source element's own raw bytes (or, once pydicom has converted it, by its VR and
  value strings, which are what pydicom's writer encodes): a value that changes between
  slices is simply a new key, so a reused encoding is never a stale one;
- per slice it writes only what changes: SOP Instance UID (also in the file meta), the
  source references, the window, the pixel data, and the copied per-slice elements
  (InstanceNumber, ImagePositionPatient, SliceLocation) through pydicom's element writer.

Every element is then joined in tag order. The result is the same bytes as
``derive.derive_instance_generic`` (tests compare them, and validate the instance).

De-identifying (``deid``, ``agent.dicom.deid``), the template is built from the
de-identified generic dataset, once per series (it then holds the de-identification
markers); the copied elements go through the same ``Deidentifier.element`` as in the
generic path, memoised under keys that include the de-identifier and the patient's date
offset; the source references and the SOP Instance UID use the source UIDs' pseudonyms.
"""

from __future__ import annotations

import struct
import threading
from collections import OrderedDict
from functools import cache
from operator import itemgetter
from typing import Any

import numpy as np
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_data_element
from pydicom.multival import MultiValue

from agent.dicom.decode import Scan, quiet_pydicom
from agent.dicom.deid import Deidentifier
from agent.dicom.derive import (
    COPIED,
    COPIED_DEID,
    DOMAIN_TAGS,
    TYPE2_EMPTY,
    DomainMark,
    ModelIdentity,
    check_arguments,
    deidentified,
    derived_dataset,
    derived_uids,
    domain_elements,
    encode_generic,
    format_ds,
    output_series_number,
    source_uid,
    to_uint16,
    window,
)
from agent.dicom.header_values import canonical_number_string
from agent.model.bundle import OutputContract

Element = tuple[int, bytes]  # (tag, encoded element: tag, VR, length and value)

_LONG_VRS = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN",
                       b"UR", b"UT", b"UV"})  # fmt: skip
_PREAMBLE = bytes(128) + b"DICM"
_DEFAULT_ENCODING = "iso8859"  # pydicom's default when SpecificCharacterSet is absent
_META_GROUP_LENGTH, _MEDIA_SOP_INSTANCE = 0x00020000, 0x00020003
_SOP_INSTANCE = 0x00080018
_REFERENCED_IMAGES, _SOURCE_IMAGES = 0x00081140, 0x00082112
_WINDOW_CENTER, _WINDOW_WIDTH, _PIXEL_DATA = 0x00281050, 0x00281051, 0x7FE00010
# The agent's own elements that change per slice (written here by hand, checked against
# pydicom's bytes by the tests).
_PER_SLICE = frozenset({_SOP_INSTANCE, _REFERENCED_IMAGES, _SOURCE_IMAGES, _WINDOW_CENTER,
                        _WINDOW_WIDTH, _PIXEL_DATA, *DOMAIN_TAGS})  # fmt: skip
# Copied source elements that differ in every slice: encoded each time, never memoised
# (a plainly valid IS/DS value is its own encoding; see header_values).
_NUMBER_VR = {"InstanceNumber": "IS", "ImagePositionPatient": "DS", "SliceLocation": "DS"}
_UNIQUE_PER_SLICE = frozenset(_NUMBER_VR)


def _tag(keyword: str) -> int:
    tag = tag_for_keyword(keyword)
    if tag is None:
        raise ValueError(f"{keyword} is not a DICOM keyword")
    return tag


CopiedTag = tuple[int, bool, bool, str | None]


def _copied_tags(keywords: tuple[str, ...]) -> tuple[CopiedTag, ...]:
    """(tag, type-2: written empty when absent, memoised, VR of a per-slice number or None)
    of each copied keyword."""
    return tuple((_tag(k), k in TYPE2_EMPTY, k not in _UNIQUE_PER_SLICE, _NUMBER_VR.get(k))
                 for k in keywords)


# Copied as they are, and de-identified (``derive.copied_keywords``). The per-slice numbers
# (InstanceNumber, ImagePositionPatient, SliceLocation) are kept (K) by the profile, so
# their fast path is the same either way.
_COPIED_TAGS = _copied_tags(COPIED)
_COPIED_TAGS_DEID = _copied_tags(COPIED_DEID)
_MEMO_LIMIT = 4096  # distinct copied values kept (cleared when full and per new series)
_TEMPLATE_LIMIT = 16  # output series whose templates are kept
_SCALARS = (str, int, float)
_MISSING = b"<not in the memo>"  # a marker: memo values are encoded bytes or None


def element(tag: int, vr: bytes, value: bytes) -> bytes:
    """One Explicit VR Little Endian element with a defined length."""
    group, number = tag >> 16, tag & 0xFFFF
    if vr in _LONG_VRS:
        return struct.pack("<HH2sHI", group, number, vr, 0, len(value)) + value
    return struct.pack("<HH2sH", group, number, vr, len(value)) + value


def _ui(uid: str) -> bytes:
    raw = uid.encode("ascii")
    return raw + b"\0" if len(raw) % 2 else raw


def _ascii_text(text: str) -> bytes:
    raw = text.encode("ascii")
    return raw + b" " if len(raw) % 2 else raw


def _item(body: bytes) -> bytes:
    return struct.pack("<HHI", 0xFFFE, 0xE000, len(body)) + body


@cache
def _purpose_of_reference() -> bytes:
    """PurposeOfReferenceCodeSequence: CID 7202 "Source image for image processing
    operation" (the same in every instance)."""
    code = (element(0x00080100, b"SH", _ascii_text("121322"))
            + element(0x00080102, b"SH", _ascii_text("DCM"))
            + element(0x00080104, b"LO",
                      _ascii_text("Source image for image processing operation")))
    return element(0x0040A170, b"SQ", _item(code))


def _references(scan: Scan, deid: Deidentifier | None) -> list[Element]:
    """SourceImageSequence and ReferencedImageSequence: one item naming the source."""
    refs = (element(0x00081150, b"UI", _ui(scan.sop_class_uid))
            + element(0x00081155, b"UI", _ui(source_uid(scan.sop_instance_uid, deid))))
    return [(_REFERENCED_IMAGES, element(_REFERENCED_IMAGES, b"SQ", _item(refs))),
            (_SOURCE_IMAGES,
             element(_SOURCE_IMAGES, b"SQ", _item(refs + _purpose_of_reference())))]


def split_elements(data: bytes, start: int = 0, end: int | None = None) -> list[Element]:
    """The top-level elements of Explicit VR Little Endian bytes with defined lengths (what
    pydicom writes for a dataset it built), each with its encoded bytes.
    Raises ValueError for bytes that are not that."""
    stop = len(data) if end is None else end
    out: list[Element] = []
    pos = start
    while pos < stop:
        group, number = struct.unpack_from("<HH", data, pos)
        vr = data[pos + 4 : pos + 6]
        if vr in _LONG_VRS:
            (length,), header = struct.unpack_from("<I", data, pos + 8), 12
        else:
            (length,), header = struct.unpack_from("<H", data, pos + 6), 8
        if length == 0xFFFFFFFF:
            raise ValueError("an element of undefined length")
        end_of = pos + header + length
        if end_of > stop:
            raise ValueError("an element runs past the end")
        out.append(((group << 16) | number, data[pos:end_of]))
        pos = end_of
    return out


def encode_element(elem: DataElement, encodings: Any) -> bytes:
    """One element as pydicom's dataset writer encodes it in Explicit VR Little Endian."""
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    write_data_element(fp, elem, encodings)
    return fp.getvalue()


def _value_key(elem: DataElement) -> tuple[object, ...] | None:
    """A key for a converted element's encoding: pydicom writes text, IS and DS from their
    ``str`` and binary numbers from their value, so (VR, type, str) of each value decides
    the bytes (with the character set, which the caller adds). None for other values."""
    value = elem.value
    values = list(value) if isinstance(value, MultiValue | list | tuple) else [value]
    if not all(isinstance(v, _SCALARS) for v in values):
        return None
    return (elem.VR, isinstance(value, MultiValue | list | tuple),
            tuple((type(v).__name__, str(v)) for v in values))


def _encodings(src: Dataset) -> Any:
    """The character sets the generic writer encodes with: the copied
    SpecificCharacterSet's value, or pydicom's default when it has none."""
    try:
        charset_elem = src["SpecificCharacterSet"]
    except Exception:  # unreadable: the generic path omits it too
        return _DEFAULT_ENCODING
    return charset_elem.value


class _Template:
    """The encoded parts of one output series that every slice shares."""

    def __init__(self, generic: bytes, copied_tags: tuple[CopiedTag, ...]) -> None:
        meta_length = struct.unpack_from("<I", generic, len(_PREAMBLE) + 8)[0]
        meta_end = len(_PREAMBLE) + 12 + meta_length
        meta = split_elements(generic, len(_PREAMBLE), meta_end)
        self.meta_before = b"".join(b for t, b in meta
                                    if _META_GROUP_LENGTH < t < _MEDIA_SOP_INSTANCE)
        self.meta_after = b"".join(b for t, b in meta if t > _MEDIA_SOP_INSTANCE)
        copied = {tag for tag, *_ in copied_tags}
        self.elements = [(t, b) for t, b in split_elements(generic, meta_end)
                         if t not in _PER_SLICE and t not in copied]


class DerivedWriter:
    """Writes derived instances; keeps per-series templates and the copied-element memo.

    Safe to share between threads: a lock guards the templates (built outside it), and the
    memo is one dict whose single operations are atomic."""

    def __init__(self) -> None:
        self._templates: OrderedDict[tuple[object, ...], _Template] = OrderedDict()
        self._memo: dict[tuple[object, ...], bytes | None] = {}
        self._lock = threading.Lock()

    def write(
        self,
        scan: Scan,
        stored: np.ndarray,
        model: ModelIdentity,
        output: OutputContract,
        *,
        device_id: str,
        software_version: str,
        deid: Deidentifier | None = None,
        domain: DomainMark | None = None,
    ) -> bytes:
        """The derived instance of ``scan`` (see ``derive.derive_instance``). With ``deid``
        the template is de-identified once per series (it holds the agent's elements and
        the markers); per slice only the copied elements go through ``deid``, memoised."""
        modality = check_arguments(scan, stored, output)
        pixels = np.ascontiguousarray(to_uint16(stored), dtype="<u2")
        sop_uid, series_uid = derived_uids(scan, model.digest, deid)
        with quiet_pydicom():
            encodings = _encodings(scan.dataset)
            charset = str(encodings)
            key = (modality, output, model, device_id, software_version, series_uid,
                   output_series_number(scan), pixels.shape, charset, deid)
            template = self._template(key, scan, pixels, model, output, device_id,
                                      software_version, deid)
            offset = 0 if deid is None else deid.date_offset(scan.dataset)
            copied = self._copied(scan.dataset, encodings, charset, deid, offset)
            marks = [_mark(e, encodings) for e in domain_elements(domain)]
        center, width = window(pixels, output)
        elements = [*template.elements, *copied, *marks, *_references(scan, deid),
                    (_SOP_INSTANCE, element(_SOP_INSTANCE, b"UI", _ui(sop_uid))),
                    (_WINDOW_CENTER, element(_WINDOW_CENTER, b"DS",
                                             _ascii_text(format_ds(center)))),
                    (_WINDOW_WIDTH, element(_WINDOW_WIDTH, b"DS",
                                            _ascii_text(format_ds(width))))]
        elements.sort(key=itemgetter(0))
        media_uid = element(_MEDIA_SOP_INSTANCE, b"UI", _ui(sop_uid))
        meta_length = len(template.meta_before) + len(media_uid) + len(template.meta_after)
        pixel_header = struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OW", 0, pixels.nbytes)
        return b"".join([
            _PREAMBLE, element(_META_GROUP_LENGTH, b"UL", struct.pack("<I", meta_length)),
            template.meta_before, media_uid, template.meta_after,
            *(b for _, b in elements), pixel_header, pixels.data,
        ])

    def _template(self, key: tuple[object, ...], scan: Scan, pixels: np.ndarray,
                  model: ModelIdentity, output: OutputContract, device_id: str,
                  software_version: str, deid: Deidentifier | None) -> _Template:
        with self._lock:
            template = self._templates.get(key)
            if template is not None:
                self._templates.move_to_end(key)
                return template
        ds = derived_dataset(scan, pixels, model, output, device_id=device_id,
                             software_version=software_version, deid=deid)
        template = _Template(encode_generic(ds), _tags_for(deid))
        with self._lock:
            # A new output series: the memo (which holds patient values) starts afresh, so
            # it keeps only the values of the series being written, not of past patients.
            self._memo.clear()
            self._templates[key] = template
            while len(self._templates) > _TEMPLATE_LIMIT:
                self._templates.popitem(last=False)
        return template

    def _copied(self, src: Dataset, encodings: Any, charset: str, deid: Deidentifier | None,
                offset: int) -> list[Element]:
        """The encoded copied elements present in the output (de-identified with ``deid``;
        ``offset``: its date shift for this patient, part of every memo key)."""
        out: list[Element] = []
        for tag, type2, memoised, number_vr in _tags_for(deid):
            key: tuple[object, ...] | None = None
            if number_vr is not None:
                value = canonical_number_string(src.get_item(tag), number_vr)
                if value is not None:
                    out.append((tag, element(tag, number_vr.encode(), value)))
                    continue
            if memoised:
                raw = src.get_item(tag)
                if isinstance(raw, RawDataElement):
                    key = (tag, charset, deid, offset, raw.VR, raw.value,
                           raw.is_little_endian, raw.is_implicit_VR)
                elif raw is None:
                    key = (tag, charset, deid, offset, None)
                else:
                    value_key = _value_key(raw)
                    key = (None if value_key is None
                           else (tag, charset, deid, offset, value_key))
                hit = _MISSING if key is None else self._memo.get(key, _MISSING)
                if hit is not _MISSING:  # (one get: another thread may clear the memo)
                    if hit is not None:
                        out.append((tag, hit))
                    continue
            encoded = self._encode_copied(src, tag, type2, encodings, deid, offset)
            if key is not None:
                if len(self._memo) >= _MEMO_LIMIT:
                    self._memo.clear()
                self._memo[key] = encoded
            if encoded is not None:
                out.append((tag, encoded))
        return out

    @staticmethod
    def _encode_copied(src: Dataset, tag: int, type2: bool, encodings: Any,
                       deid: Deidentifier | None, offset: int) -> bytes | None:
        """What the generic path writes for one copied element: the source's (then
        de-identified), an empty type-2 element when it has none (or one pydicom cannot
        read, or the profile removes it), or nothing."""
        try:
            elem: DataElement | None = deidentified(src[tag], deid, offset)
        except Exception:
            elem = None
        if elem is None:
            if not type2:
                return None
            elem = DataElement(tag, dictionary_VR(tag), "")
        return encode_element(elem, encodings)


def _mark(elem: DataElement, encodings: Any) -> Element:
    """One element of the domain mark (``derive.domain_elements``: text VRs holding ASCII
    the agent wrote, which every character set encodes as itself; a DS as the string it was
    made from, as pydicom writes it), encoded by hand; any other value goes through
    pydicom's writer."""
    value = elem.value
    text = value if isinstance(value, str) else getattr(value, "original_string", None)
    if isinstance(text, str) and text.isascii() and elem.VR in ("LT", "LO", "DS", "CS"):
        return int(elem.tag), element(int(elem.tag), elem.VR.encode(), _ascii_text(text))
    return int(elem.tag), encode_element(elem, encodings)


def _tags_for(deid: Deidentifier | None) -> tuple[CopiedTag, ...]:
    return _COPIED_TAGS if deid is None else _COPIED_TAGS_DEID


_DEFAULT: DerivedWriter | None = None
_DEFAULT_LOCK = threading.Lock()


def default_writer() -> DerivedWriter:
    """The writer ``derive_instance`` uses when the caller keeps none."""
    global _DEFAULT
    with _DEFAULT_LOCK:
        if _DEFAULT is None:
            _DEFAULT = DerivedWriter()
        return _DEFAULT
