"""DICOM in and out: decode a scan under a budget, check it against the model's input
contract, and write the derived (synthetic) instance with new UIDs and provenance.

Nothing here may leak PHI: every ``ScanRejected`` message names tag keywords, numbers and
standard codes only, never values a scanner copied from the patient or the study.
Input is hostile until proven otherwise: every failure of pydicom or numpy on a payload
becomes a ``ScanRejected`` with a reason code, so the daemon's loop never dies on input.
"""

from __future__ import annotations

import contextvars
import hashlib
import itertools
import logging
import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from io import BytesIO
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import generate_fragments
from pydicom.filereader import read_dataset, read_preamble
from pydicom.pixels.decoders.base import get_decoder
from pydicom.uid import (
    HTJ2K,
    JPEG2000,
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)

from agent.bundle import InputContract
from agent.native_pixels import native_pixels

REASONS = frozenset({
    "not_dicom", "payload_too_large", "missing_tag", "no_pixel_data", "wrong_modality",
    "series_mismatch", "unsupported_photometric", "unsupported_bits", "pixel_budget_exceeded",
    "multiframe_unsupported", "unsupported_transfer_syntax", "pixel_decode_failed",
    "bad_geometry", "duplicate_position", "series_too_large",
})  # fmt: skip
JPEG_EXTRA_HINT = 'pip install "iomt-edge-agent[jpeg]"'
# Compressed syntaxes and the package of the `jpeg` extra that decodes each (through
# pylibjpeg, pydicom's plugin). RLE also decodes without the extra (pydicom's own numpy
# decoder); pylibjpeg-rle is only faster.
_JPEG_FAMILY = (JPEGBaseline8Bit, JPEGExtended12Bit, JPEGLossless, JPEGLosslessSV1,
                JPEGLSLossless, JPEGLSNearLossless)
_J2K_FAMILY = (JPEG2000Lossless, JPEG2000, HTJ2KLossless, HTJ2KLosslessRPCL, HTJ2K)
EXTRA_PLUGIN = {
    **dict.fromkeys(_JPEG_FAMILY, "pylibjpeg-libjpeg"),
    **dict.fromkeys(_J2K_FAMILY, "pylibjpeg-openjpeg"),
    RLELossless: "pylibjpeg-rle",
}
_RLE_MAX_SEGMENT_FACTOR = 2  # a segment may decode to at most 2 x Rows x Columns bytes
# Header values are echoed in messages only when they are one of these standard codes.
_MODALITIES = frozenset({
    "AR", "ASMT", "AU", "BDUS", "BI", "BMD", "CR", "CT", "CTPROTOCOL", "DG", "DOC", "DX",
    "ECG", "EPS", "ES", "FID", "GM", "HC", "HD", "IO", "IOL", "IVOCT", "IVUS", "KER", "KO",
    "LEN", "LS", "MG", "MR", "M3D", "NM", "OAM", "OCT", "OP", "OPM", "OPT", "OPTBSV", "OPTENF",
    "OPV", "OSS", "OT", "PLAN", "PR", "PT", "PX", "REG", "RESP", "RF", "RG", "RTDOSE",
    "RTIMAGE", "RTPLAN", "RTRECORD", "RTSTRUCT", "RWV", "SEG", "SM", "SMR", "SR", "SRF",
    "STAIN", "TG", "US", "VA", "XA", "XC",
})  # fmt: skip
_PHOTOMETRICS = frozenset({
    "MONOCHROME1", "MONOCHROME2", "RGB", "YBR_FULL", "YBR_FULL_422", "YBR_PARTIAL_420",
    "YBR_PARTIAL_422", "YBR_ICT", "YBR_RCT", "XYB", "PALETTE COLOR",
})  # fmt: skip
_UID_CHARS = re.compile(r"[0-9.]{1,64}")
_SPACING_RANGE_MM = (0.01, 100.0)
_FIRST_PIXEL_TAG = 0x7FE00008  # Float Pixel Data; Pixel Data is (7FE0,0010)


class ScanRejected(Exception):
    """A payload that cannot be served. ``reason`` is a short code from ``REASONS``; the
    message is safe to log and publish (no PHI). ``payload_sha256`` is set by
    ``decode_scan``."""

    def __init__(self, reason: str, message: str, payload_sha256: str | None = None) -> None:
        if reason not in REASONS:
            raise ValueError(f"unknown rejection reason {reason!r}")
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.payload_sha256 = payload_sha256


@dataclass
class Scan:
    """One decoded single-frame instance that satisfies the input contract."""

    dataset: Dataset  # full parse, pixel data included
    pixels: np.ndarray  # float32 (rows, cols) after Rescale; MONOCHROME1 flipped to MONOCHROME2
    sop_instance_uid: str
    sop_class_uid: str
    series_instance_uid: str
    study_instance_uid: str
    pixel_spacing: tuple[float, float]  # (row, col) mm
    pixel_spacing_assumed: bool  # True when PixelSpacing was absent and 1.0 mm was assumed
    payload_sha256: str


def _known(value: object, allowed: frozenset[str]) -> str:
    """Echo a header value in a message only when it is a standard code."""
    text = str(value).strip().upper()
    return text if text in allowed else "<non-standard value>"


_QUIET = contextvars.ContextVar("iomt_dicom_quiet", default=False)


class _DropWhileQuiet(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not _QUIET.get()


# pydicom logs its warnings too, and they can quote element values (names, IDs).
for _name in ("pydicom", "pydicom.pixels.utils", "pydicom.pixels.decoders.base"):
    logging.getLogger(_name).addFilter(_DropWhileQuiet())


@contextmanager
def quiet_pydicom() -> Iterator[None]:
    """Silence pydicom's warnings and log records while it handles a payload."""
    token = _QUIET.set(True)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        _QUIET.reset(token)


def _value(ds: Dataset, keyword: str) -> Any:
    try:
        return ds.get(keyword)
    except Exception:
        raise ScanRejected("missing_tag", f"{keyword} is present but unreadable") from None


def _required_int(ds: Dataset, keyword: str) -> int:
    value = _value(ds, keyword)
    if value is None or value == "":
        raise ScanRejected("missing_tag", f"required tag {keyword} is missing")
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ScanRejected("missing_tag", f"{keyword} is not a single integer") from None


def _required_text(ds: Dataset, keyword: str) -> str:
    value = _value(ds, keyword)
    if value is None or str(value).strip() == "":
        raise ScanRejected("missing_tag", f"required tag {keyword} is missing")
    return str(value).strip()


def _required_uid(ds: Dataset, keyword: str) -> str:
    uid = _required_text(ds, keyword)
    if not _UID_CHARS.fullmatch(uid):
        raise ScanRejected("missing_tag", f"{keyword} is not a valid UID")
    return uid


def _read_instance(payload: bytes) -> tuple[Dataset, str]:
    """Parse the payload once (pixel data as bytes, not decoded); return the dataset and
    its transfer syntax. Only the file meta group is read before, to refuse a deflated
    dataset before pydicom would inflate it."""
    try:
        fp = BytesIO(payload)
        has_preamble = read_preamble(fp, force=True) is not None
        meta = read_dataset(fp, False, True, stop_when=lambda tag, vr, length: tag >> 16 != 2)
        syntax = str(meta.get("TransferSyntaxUID", "")).strip() or None
    except Exception:
        raise ScanRejected("not_dicom", "payload is not a DICOM instance") from None
    if syntax == DeflatedExplicitVRLittleEndian:  # inflating it has no bound: refuse
        raise ScanRejected(
            "unsupported_transfer_syntax", "Deflated Explicit VR Little Endian is not accepted"
        )
    try:
        # The payload is in memory already (and capped), so reading the pixel data
        # element costs one copy; decoding it waits until every header check has passed.
        ds = pydicom.dcmread(BytesIO(payload), force=True)
        # (a Dataset iterates over its elements, converting each: ask for its tags)
        keys = [int(k) for k in ds.keys() if k < _FIRST_PIXEL_TAG]  # noqa: SIM118
    except Exception:
        raise ScanRejected("not_dicom", "payload is not a DICOM instance") from None
    # A preamble vouches for an instance; without one, random bytes can parse as elements.
    if not keys or (not has_preamble and not {0x00080016, 0x00080060} & set(keys)):
        raise ScanRejected("not_dicom", "payload is not a DICOM instance")
    if syntax is not None:
        return ds, syntax
    implicit, little = ds.original_encoding  # no file meta: what the reader worked out
    if implicit:
        return ds, ImplicitVRLittleEndian
    return ds, ExplicitVRLittleEndian if little else ExplicitVRBigEndian


def _check_contract(ds: Dataset, contract: InputContract, pixel_budget: int) -> None:
    modality = _required_text(ds, "Modality")
    if modality.upper() != contract.modality.upper():
        raise ScanRejected(
            "wrong_modality",
            f"Modality {_known(modality, _MODALITIES)}, the model expects {contract.modality}",
        )
    if contract.series_description_pattern:
        description = _value(ds, "SeriesDescription")
        if not description or not re.search(
            contract.series_description_pattern, str(description), re.IGNORECASE
        ):
            raise ScanRejected(
                "series_mismatch",
                "SeriesDescription is absent or does not match the model's pattern "
                f"{contract.series_description_pattern!r}",
            )
    photometric = _required_text(ds, "PhotometricInterpretation").upper()
    if photometric not in contract.photometric_interpretations:
        allowed = ", ".join(contract.photometric_interpretations)
        raise ScanRejected(
            "unsupported_photometric",
            f"PhotometricInterpretation {_known(photometric, _PHOTOMETRICS)}, "
            f"the model accepts {allowed}",
        )
    bits = _required_int(ds, "BitsAllocated")
    stored = _value(ds, "BitsStored")
    representation = _value(ds, "PixelRepresentation")
    if (
        bits not in contract.bits_allocated
        or (stored is not None and not (isinstance(stored, int) and 1 <= stored <= bits))
        or representation not in (None, 0, 1)
    ):
        allowed = ", ".join(str(b) for b in contract.bits_allocated)
        raise ScanRejected(
            "unsupported_bits",
            f"BitsAllocated {bits} (BitsStored {stored}, PixelRepresentation "
            f"{representation}); the model accepts BitsAllocated {allowed}",
        )
    samples = _required_int(ds, "SamplesPerPixel")
    if samples != 1:
        raise ScanRejected("unsupported_photometric", f"SamplesPerPixel {samples}, expected 1")
    frames = _value(ds, "NumberOfFrames")
    try:
        n_frames = 1 if frames in (None, "") else int(frames)
    except (TypeError, ValueError):
        raise ScanRejected("bad_geometry", "NumberOfFrames is not an integer") from None
    if n_frames > 1:
        raise ScanRejected("multiframe_unsupported", f"NumberOfFrames {n_frames}: one frame only")
    rows, cols = _required_int(ds, "Rows"), _required_int(ds, "Columns")
    if rows < 1 or cols < 1 or n_frames < 1:
        raise ScanRejected("bad_geometry", f"Rows {rows}, Columns {cols}, frames {n_frames}")
    if rows * cols * n_frames > pixel_budget:
        raise ScanRejected(
            "pixel_budget_exceeded",
            f"Rows {rows} x Columns {cols} x {n_frames} frame(s) = {rows * cols * n_frames} "
            f"pixels, budget {pixel_budget}",
        )


def _check_syntax(syntax: str) -> None:
    """Refuse a transfer syntax that no installed pydicom plugin decodes.

    Availability is pydicom's own answer for this syntax (``Decoder.is_available``: some
    plugin's dependencies are importable), so it is right per syntax: with only
    pylibjpeg-libjpeg installed, JPEG and JPEG-LS decode and JPEG 2000 is refused."""
    uid = UID(syntax)
    name = uid.name if uid.is_transfer_syntax else "an unrecognised transfer syntax"
    try:
        decoder = get_decoder(uid)
    except Exception:
        raise ScanRejected(
            "unsupported_transfer_syntax", f"pixel data in {name} cannot be decoded"
        ) from None
    if not decoder.is_available:
        plugin = EXTRA_PLUGIN.get(uid)
        needs = f"a decoder plugin ({plugin})" if plugin else "a decoder plugin"
        raise ScanRejected(
            "unsupported_transfer_syntax", f"pixel data in {name} needs {needs}: {JPEG_EXTRA_HINT}"
        )


def _pixel_spacing(ds: Dataset) -> tuple[tuple[float, float], bool]:
    value = _value(ds, "PixelSpacing")
    if value is None or value == "":
        return (1.0, 1.0), True
    try:
        row, col = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ScanRejected("bad_geometry", "PixelSpacing must hold two numbers") from None
    low, high = _SPACING_RANGE_MM
    if not (low <= row <= high and low <= col <= high):
        raise ScanRejected("bad_geometry", f"PixelSpacing {row:g}\\{col:g} mm out of range")
    return (row, col), False


def _number(ds: Dataset, keyword: str, default: float) -> float:
    value = ds.get(keyword)
    return default if value is None or value == "" else float(value)


def _jpeg_frame_header(data: bytes) -> tuple[int, int, int] | None:
    """(rows, columns, components) from the SOF segment of a JPEG or JPEG-LS codestream."""
    if data[:2] != b"\xff\xd8":
        return None
    pos = 2
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if 0xD0 <= marker <= 0xD7 or marker == 0x01:  # markers without a length
            pos += 2
            continue
        if marker in (0xDA, 0xD9):  # scan or end before any frame header
            return None
        if (0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC)) or marker == 0xF7:
            if pos + 10 > len(data):
                return None
            rows = int.from_bytes(data[pos + 5 : pos + 7], "big")
            cols = int.from_bytes(data[pos + 7 : pos + 9], "big")
            return rows, cols, data[pos + 9]
        length = int.from_bytes(data[pos + 2 : pos + 4], "big")
        if length < 2:
            return None
        pos += 2 + length
    return None


def _j2k_frame_header(data: bytes) -> tuple[int, int, int] | None:
    """(rows, columns, components) from the SIZ segment of a JPEG 2000 codestream (bare, or
    in the JP2 boxes some writers wrap it in)."""
    pos = 0
    if data.startswith(b"\x00\x00\x00\x0cjP  "):
        pos = 12
        while pos + 8 <= len(data) and data[pos + 4 : pos + 8] != b"jp2c":
            length = int.from_bytes(data[pos : pos + 4], "big")
            if length == 1:
                length = int.from_bytes(data[pos + 8 : pos + 16], "big")
            if length < 8:
                return None
            pos += length
        pos += 8
    siz = pos + 4
    if data[pos:siz] != b"\xff\x4f\xff\x51" or siz + 40 > len(data):
        return None
    x, y, x0, y0 = (int.from_bytes(data[siz + i : siz + i + 4], "big") for i in (4, 8, 12, 16))
    return y - y0, x - x0, int.from_bytes(data[siz + 36 : siz + 38], "big")


def _rle_segment_bound(segment: bytes, limit: int) -> int:
    """Bytes a PackBits segment decodes to, counted without decoding; stops past ``limit``."""
    pos, out, end = 0, 0, len(segment)
    while pos < end and out <= limit:
        header = segment[pos]
        if header < 128:  # literal run of header + 1 bytes
            out += min(header + 1, end - pos - 1)
            pos += header + 2
        elif header > 128:  # the next byte repeated 257 - header times
            out += 257 - header if pos + 1 < end else 0
            pos += 2
        else:  # no-op
            pos += 1
    return out


def _check_rle(frame: bytes, rows: int, cols: int, samples: int, bits: int) -> None:
    """pydicom's numpy RLE decoder decodes every segment in full whatever its declared
    size, and a run of two bytes becomes 128: bound both before it starts."""
    expected = rows * cols
    if bits % 8 or len(frame) < 64:
        raise ScanRejected("pixel_decode_failed", f"RLE frame of {len(frame)} bytes, "
                           f"BitsAllocated {bits}: not decodable")
    count = int.from_bytes(frame[:4], "little")
    offsets = [int.from_bytes(frame[4 + 4 * i : 8 + 4 * i], "little") for i in range(15)]
    if count != samples * bits // 8 or not 1 <= count <= 15:
        raise ScanRejected("pixel_decode_failed", f"RLE header has {count} segments, "
                           f"{samples * bits // 8} expected")
    bounds = [*offsets[:count], len(frame)]
    limit = _RLE_MAX_SEGMENT_FACTOR * expected
    for start, stop in itertools.pairwise(bounds):
        if not 64 <= start < stop or stop - start > 2 * expected + 64:
            raise ScanRejected("pixel_decode_failed", "RLE segment offsets are not usable")
        if _rle_segment_bound(frame[start:stop], limit) > limit:
            raise ScanRejected("pixel_decode_failed", f"an RLE segment decodes to more than "
                               f"{limit} bytes for {rows} x {cols} pixels")


def _check_codestream(ds: Dataset, syntax: UID) -> None:
    """Check the compressed frame against Rows, Columns and SamplesPerPixel *before* a
    decoder sees it: a decoder allocates what the codestream declares, so a 64 x 64 header
    over a 40000 x 40000 codestream would otherwise cost gigabytes (the pixel budget only
    saw the header)."""
    rows, cols = int(ds.Rows), int(ds.Columns)
    samples = int(ds.SamplesPerPixel)
    try:
        items = generate_fragments(ds.PixelData)
        next(items)  # the Basic Offset Table
        frame = b"".join(items)  # one frame: every fragment after it
    except Exception:
        raise ScanRejected("pixel_decode_failed", "encapsulated pixel data is malformed") from None
    if syntax == RLELossless:
        _check_rle(frame, rows, cols, samples, int(ds.BitsAllocated))
        return
    if syntax in _JPEG_FAMILY:
        found = _jpeg_frame_header(frame)
    elif syntax in _J2K_FAMILY:
        found = _j2k_frame_header(frame)
    else:
        return
    if found is None:
        raise ScanRejected("pixel_decode_failed", f"no frame header found in the {syntax.name} "
                           "codestream")
    if found != (rows, cols, samples):
        raise ScanRejected(
            "pixel_decode_failed",
            f"codestream is {found[0]} x {found[1]} with {found[2]} component(s), the header "
            f"says Rows {rows}, Columns {cols}, SamplesPerPixel {samples}",
        )


def _decode_pixels(ds: Dataset, syntax: str) -> np.ndarray:
    if "PixelData" not in ds:
        raise ScanRejected("no_pixel_data", "the instance has no PixelData (7FE0,0010)")
    ds.file_meta = ds.file_meta if isinstance(ds.file_meta, FileMetaDataset) else FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = UID(syntax)
    if UID(syntax).is_encapsulated:
        _check_codestream(ds, UID(syntax))
    try:
        native = native_pixels(ds, syntax)
        raw = ds.pixel_array if native is None else native
        slope = _number(ds, "RescaleSlope", 1.0)
        intercept = _number(ds, "RescaleIntercept", 0.0)
        signed = int(ds.get("PixelRepresentation", 0) or 0) == 1
        stored_bits = int(ds.get("BitsStored", ds.BitsAllocated) or ds.BitsAllocated)
        inverted = str(ds.PhotometricInterpretation).strip().upper() == "MONOCHROME1"
    except Exception as exc:  # class name only: pydicom messages may quote values
        raise ScanRejected(
            "pixel_decode_failed", f"pixel data could not be decoded ({type(exc).__name__})"
        ) from None
    except BaseException as exc:
        # A Rust plugin's panic (PyO3's PanicException; pylibjpeg-rle 2.2 panics on some
        # corrupt segments) is a BaseException: left alone it would end the loop, and the
        # scan, still in the inbox, would end it again at every restart.
        if isinstance(exc, KeyboardInterrupt | SystemExit | GeneratorExit):
            raise
        raise ScanRejected(
            "pixel_decode_failed", f"the decoder plugin panicked ({type(exc).__name__})"
        ) from None
    if raw.shape != (int(ds.Rows), int(ds.Columns)):
        raise ScanRejected("pixel_decode_failed", f"decoded pixel array has shape {raw.shape}")
    if not (np.isfinite(slope) and np.isfinite(intercept) and slope != 0.0):
        raise ScanRejected("pixel_decode_failed", "RescaleSlope/RescaleIntercept not usable")
    pixels = raw.astype(np.float32)
    if inverted:  # only when the contract lists it: flip within the stored range
        pixels = np.float32(-1 if signed else 2**stored_bits - 1) - pixels
    if slope != 1.0 or intercept != 0.0:
        pixels *= np.float32(slope)
        pixels += np.float32(intercept)
    return pixels


def decode_scan(
    payload: bytes,
    contract: InputContract,
    *,
    pixel_budget: int,
    max_payload_bytes: int,
    payload_sha256: str | None = None,
) -> Scan:
    """Decode one Part-10 payload and check it against ``contract``.

    Order matters for resource bounds: the size cap first, then one parse (pixel data kept
    as bytes), every contract check and the pixel budget (Rows x Columns x frames) before
    any pixel data is decoded. Raises ``ScanRejected`` (and nothing else) for any payload
    it cannot serve. ``payload_sha256``: the payload's sha256 (hex) when the caller has it
    already (the inbox does), so it is not hashed twice.
    """
    digest = payload_sha256 or hashlib.sha256(payload).hexdigest()
    try:
        if len(payload) > max_payload_bytes:
            raise ScanRejected(
                "payload_too_large", f"payload {len(payload)} bytes, cap {max_payload_bytes}"
            )
        with quiet_pydicom():
            ds, syntax = _read_instance(payload)
            sop_instance = _required_uid(ds, "SOPInstanceUID")
            sop_class = _required_uid(ds, "SOPClassUID")
            series = _required_uid(ds, "SeriesInstanceUID")
            study = _required_uid(ds, "StudyInstanceUID")
            _check_contract(ds, contract, pixel_budget)
            spacing, assumed = _pixel_spacing(ds)
            _check_syntax(syntax)
            pixels = _decode_pixels(ds, syntax)
    except ScanRejected as exc:
        exc.payload_sha256 = digest
        raise
    except Exception as exc:  # last line of defence: the loop must go on
        raise ScanRejected(
            "pixel_decode_failed", f"unexpected decoder failure ({type(exc).__name__})", digest
        ) from None
    return Scan(
        dataset=ds,
        pixels=pixels,
        sop_instance_uid=sop_instance,
        sop_class_uid=sop_class,
        series_instance_uid=series,
        study_instance_uid=study,
        pixel_spacing=spacing,
        pixel_spacing_assumed=assumed,
        payload_sha256=digest,
    )
