"""DICOM in: decode a scan under a budget and check it against the model's input contract
(one parse; compressed frames are checked by ``agent.dicom.codestream`` before a decoder sees
them, uncompressed ones are read by ``agent.dicom.native_pixels``). The derived instance is
``agent.dicom.derive``'s.

Nothing here may leak PHI: every ``ScanRejected`` message names tag keywords, numbers and
standard codes only, never values a scanner copied from the patient or the study.
Input is hostile until proven otherwise: every failure of pydicom or numpy on a payload
becomes a ``ScanRejected`` with a reason code, so the daemon's loop never dies on input.
"""

from __future__ import annotations

import contextvars
import hashlib
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
from pydicom.filereader import read_dataset, read_preamble
from pydicom.pixels.decoders.base import get_decoder
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    RLELossless,
)

from agent.dicom import header_values
from agent.dicom.codestream import J2K_FAMILY, JPEG_FAMILY, CodestreamError, check_codestream
from agent.dicom.native_pixels import native_pixels, short_pixel_data
from agent.errors import SCAN_REASONS, ReasonedError
from agent.model.bundle import InputContract

REASONS = frozenset(SCAN_REASONS)  # what a scan can be reported with (agent.errors)
JPEG_EXTRA_HINT = 'pip install "iomt-edge-agent[jpeg]"'
# Compressed syntaxes and the package of the `jpeg` extra that decodes each (through
# pylibjpeg, pydicom's plugin). RLE also decodes without the extra (pydicom's own numpy
# decoder); pylibjpeg-rle is only faster.
EXTRA_PLUGIN = {
    **dict.fromkeys(JPEG_FAMILY, "pylibjpeg-libjpeg"),
    **dict.fromkeys(J2K_FAMILY, "pylibjpeg-openjpeg"),
    RLELossless: "pylibjpeg-rle",
}
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


class ScanRejected(ReasonedError):
    """A payload that cannot be served. ``reason`` is a short code from ``REASONS``; the
    message is safe to log and publish (no PHI). ``payload_sha256`` is set by
    ``decode_scan``."""

    def __init__(self, reason: str, message: str, payload_sha256: str | None = None) -> None:
        if reason not in REASONS:
            raise ValueError(f"unknown rejection reason {reason!r}")
        super().__init__(reason, message)
        self.payload_sha256 = payload_sha256


@dataclass
class Scan:
    """One decoded single-frame instance that satisfies the input contract."""

    dataset: Dataset  # full parse, pixel data included (not from the decoder process)
    pixels: np.ndarray  # float32 (rows, cols) after Rescale; MONOCHROME1 flipped to MONOCHROME2
    sop_instance_uid: str
    sop_class_uid: str
    series_instance_uid: str
    study_instance_uid: str
    pixel_spacing: tuple[float, float]  # (row, col) mm
    pixel_spacing_assumed: bool  # True when PixelSpacing was absent and 1.0 mm was assumed
    payload_sha256: str
    decoder_cpu_ms: float = 0.0  # CPU the decoder process spent on it (0: decoded in-process)


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
        return header_values.get(ds, keyword)
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
    value = header_values.get(ds, keyword)
    return default if value is None or value == "" else float(value)


def _decode_pixels(ds: Dataset, syntax: str) -> np.ndarray:
    if "PixelData" not in ds:
        raise ScanRejected("no_pixel_data", "the instance has no PixelData (7FE0,0010)")
    ds.file_meta = ds.file_meta if isinstance(ds.file_meta, FileMetaDataset) else FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = UID(syntax)
    if UID(syntax).is_encapsulated:
        try:
            check_codestream(ds.PixelData, UID(syntax), *(
                int(header_values.get(ds, k))
                for k in ("Rows", "Columns", "SamplesPerPixel", "BitsAllocated")))
        except CodestreamError as exc:
            raise ScanRejected("pixel_decode_failed", str(exc)) from None
    elif (short := short_pixel_data(ds)) is not None:
        raise ScanRejected("pixel_decode_failed", short)
    try:
        native = native_pixels(ds, syntax)
        raw = ds.pixel_array if native is None else native
        slope = _number(ds, "RescaleSlope", 1.0)
        intercept = _number(ds, "RescaleIntercept", 0.0)
        signed = int(header_values.get(ds, "PixelRepresentation") or 0) == 1
        bits = int(header_values.get(ds, "BitsAllocated"))
        stored_bits = int(header_values.get(ds, "BitsStored") or bits)
        photometric = header_values.get(ds, "PhotometricInterpretation")
        inverted = str(photometric).strip().upper() == "MONOCHROME1"
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
    if raw.shape != (int(header_values.get(ds, "Rows")), int(header_values.get(ds, "Columns"))):
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
    except MemoryError:  # in the decoder process: past decode.memory_bytes
        raise ScanRejected("decode_budget_exceeded",
                           "decoding needed more than decode.memory_bytes", digest) from None
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
