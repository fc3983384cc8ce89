"""Compressed pixel data checked against its header before any decoder sees it.

A decoder allocates what the codestream declares, not what the DICOM header says, and
pydicom's RLE decoder decodes every segment in full: these checks read the frame header
of JPEG, JPEG-LS and JPEG 2000 codestreams and bound RLE segments without decoding, so
the pixel budget that the header passed also holds for the decode. Messages hold numbers
and syntax names only (no PHI).
"""

from __future__ import annotations

import itertools

from pydicom.encaps import generate_fragments
from pydicom.uid import (
    HTJ2K,
    JPEG2000,
    UID,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)

from agent.errors import AgentError

JPEG_FAMILY = (JPEGBaseline8Bit, JPEGExtended12Bit, JPEGLossless, JPEGLosslessSV1,
               JPEGLSLossless, JPEGLSNearLossless)
J2K_FAMILY = (JPEG2000Lossless, JPEG2000, HTJ2KLossless, HTJ2KLosslessRPCL, HTJ2K)
_RLE_MAX_SEGMENT_FACTOR = 2  # a segment may decode to at most 2 x Rows x Columns bytes


class CodestreamError(AgentError, ValueError):
    """The compressed frame does not match its header or is malformed (message: no PHI)."""


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
        raise CodestreamError(f"RLE frame of {len(frame)} bytes, "
                           f"BitsAllocated {bits}: not decodable")
    count = int.from_bytes(frame[:4], "little")
    offsets = [int.from_bytes(frame[4 + 4 * i : 8 + 4 * i], "little") for i in range(15)]
    if count != samples * bits // 8 or not 1 <= count <= 15:
        raise CodestreamError(f"RLE header has {count} segments, "
                           f"{samples * bits // 8} expected")
    bounds = [*offsets[:count], len(frame)]
    limit = _RLE_MAX_SEGMENT_FACTOR * expected
    for start, stop in itertools.pairwise(bounds):
        if not 64 <= start < stop or stop - start > 2 * expected + 64:
            raise CodestreamError("RLE segment offsets are not usable")
        if _rle_segment_bound(frame[start:stop], limit) > limit:
            raise CodestreamError(f"an RLE segment decodes to more than "
                               f"{limit} bytes for {rows} x {cols} pixels")


def check_codestream(pixel_data: bytes, syntax: UID, rows: int, cols: int, samples: int,
                     bits: int) -> None:
    """Check the compressed frame against Rows, Columns and SamplesPerPixel *before* a
    decoder sees it: a decoder allocates what the codestream declares, so a 64 x 64 header
    over a 40000 x 40000 codestream would otherwise cost gigabytes (the pixel budget only
    saw the header). Raises ``CodestreamError``."""
    try:
        items = generate_fragments(pixel_data)
        next(items)  # the Basic Offset Table
        frame = b"".join(items)  # one frame: every fragment after it
    except Exception:
        raise CodestreamError("encapsulated pixel data is malformed") from None
    if syntax == RLELossless:
        _check_rle(frame, rows, cols, samples, bits)
        return
    if syntax in JPEG_FAMILY:
        found = _jpeg_frame_header(frame)
    elif syntax in J2K_FAMILY:
        found = _j2k_frame_header(frame)
    else:
        return
    if found is None:
        raise CodestreamError(f"no frame header found in the {syntax.name} "
                           "codestream")
    if found != (rows, cols, samples):
        raise CodestreamError(
            f"codestream is {found[0]} x {found[1]} with {found[2]} component(s), the header "
            f"says Rows {rows}, Columns {cols}, SamplesPerPixel {samples}",
        )
