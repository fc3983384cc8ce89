"""The hostile corpus: payloads made deterministically from a seed, for the decoder and for
the running agent (docs/reliability.md, "Hostile input").

``payload(i)`` is payload ``i`` of the corpus; the same seed and index give the same bytes
on every machine. Families (``FAMILIES``, chosen by ``i``):

* mutations of real DICOM: pydicom's own test files and the project's MNI sample series
  (relabelled to pass the model's contract, so mutations reach the pixel decoders): bit
  flips, truncation, inserted and deleted runs;
* huge declared lengths and wrong VRs, patched into real element headers;
* broken transfer syntaxes: the file meta says one syntax, the data is in another;
* deep sequence nesting, thousands of levels, with undefined and defined lengths;
* compressed frames that lie: codestream sizes patched against the header, RLE headers
  and segments that promise more than they hold, fragment lengths past the end;
* element floods (hundreds of thousands of tiny elements) and non-DICOM bytes.
"""

from __future__ import annotations

import functools
import io
import random
from collections.abc import Callable
from pathlib import Path

import pydicom
import pydicom.data
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    RLELossless,
)

SEED = 20261202
SIZE = 10_000
TEST_FILES = Path(pydicom.data.__file__).parent / "test_files"
BASE_NAMES = (
    "MR_small.dcm", "MR_small_RLE.dcm", "MR_small_jp2klossless.dcm",
    "MR_small_jpeg_ls_lossless.dcm", "MR_small_bigendian.dcm", "MR_small_implicit.dcm",
    "CT_small.dcm", "JPEG2000.dcm", "JPGExtended.dcm", "SC_rgb_rle.dcm", "SC_rgb_jpeg.dcm",
    "693_J2KI.dcm", "rtplan.dcm", "rtdose_rle_1frame.dcm", "nested_priv_SQ.dcm",
    "image_dfl.dcm", "badVR.dcm", "UN_sequence.dcm", "liver_1frame.dcm",
)  # fmt: skip
_VRS = (b"SQ", b"OB", b"OW", b"UN", b"US", b"UL", b"FD", b"DS", b"IS", b"UI", b"LO", b"AT",
        b"OF", b"UT", b"ZZ", b"\x00\x00")
_LONG_VRS = frozenset({b"OB", b"OW", b"OF", b"OD", b"OL", b"OV", b"SQ", b"UC", b"UN",
                       b"UR", b"UT", b"SV", b"UV"})
_SYNTAXES = (ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian,
             DeflatedExplicitVRLittleEndian, JPEGBaseline8Bit, JPEG2000Lossless, RLELossless,
             "1.2.840.10008.1.2.4.201", "1.2.3.4", "", "not-a-uid")


def _mr(ds: pydicom.Dataset) -> pydicom.Dataset:
    """Relabel an instance so that it passes the reference model's contract up to the
    pixel decode (MR, a 't1' series description, MONOCHROME2)."""
    ds.Modality = "MR"
    ds.SeriesDescription = "t1 hostile"
    for kw, uid in (("SOPInstanceUID", "1.2.3.4.5"), ("SeriesInstanceUID", "1.2.3.4.6"),
                    ("StudyInstanceUID", "1.2.3.4.7"),
                    ("SOPClassUID", "1.2.840.10008.5.1.4.1.1.4")):
        if kw not in ds:
            setattr(ds, kw, uid)
    return ds


def _encode(ds: pydicom.Dataset) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=False)
    return buf.getvalue()


@functools.cache
def bases() -> tuple[bytes, ...]:
    """Real instances the mutations start from: pydicom's files as they are, the
    grayscale ones relabelled to pass the contract, and slices of the project's series."""
    from agent.demo.sample_series import build_series, load_demo_slab

    out: list[bytes] = []
    for name in BASE_NAMES:
        raw = (TEST_FILES / name).read_bytes()
        out.append(raw)
        ds = pydicom.dcmread(io.BytesIO(raw), force=True)
        if ds.get("PhotometricInterpretation") == "MONOCHROME2":
            out.append(_encode(_mr(ds)))
    slab = load_demo_slab().t1
    out += build_series(slab[::8][:3, ::4, ::4].copy())  # 64 x 64: small and served
    out += build_series(slab[:1])  # 256 x 256: the model's grid
    return tuple(out)


# -- element headers in a real instance --------------------------------------------------
def _element_offsets(data: bytes) -> list[tuple[int, bool]]:
    """(offset, explicit VR) of top-level elements after the file meta (little endian)."""
    offsets: list[tuple[int, bool]] = []
    pos = 132 if data[128:132] == b"DICM" else 0
    while pos + 8 <= len(data) and len(offsets) < 400:
        group = int.from_bytes(data[pos:pos + 2], "little")
        vr = data[pos + 4:pos + 6]
        explicit = vr.isalpha() and vr.isupper()
        if explicit and vr in _LONG_VRS:
            length, head = int.from_bytes(data[pos + 8:pos + 12], "little"), 12
        elif explicit:
            length, head = int.from_bytes(data[pos + 6:pos + 8], "little"), 8
        else:
            length, head = int.from_bytes(data[pos + 4:pos + 8], "little"), 8
        if group != 2:
            offsets.append((pos, explicit))
        if length == 0xFFFFFFFF:
            break  # undefined length: stop walking here
        pos += head + length
    return offsets


def _huge_length(rng: random.Random, data: bytes) -> bytes:
    found = _element_offsets(data)
    if not found:
        return data + b"\xe0\x7f\x10\x00OB\x00\x00\xf0\xff\xff\x7f"
    pos, explicit = rng.choice(found)
    value = rng.choice((0xFFFFFFF0, 0x7FFFFFFF, 0xFFFFFFFF, 0xFFFE, len(data) * 16,
                        rng.getrandbits(32)))
    out = bytearray(data)
    vr = bytes(out[pos + 4:pos + 6])
    if explicit and vr not in _LONG_VRS:
        out[pos + 6:pos + 8] = (value & 0xFFFF).to_bytes(2, "little")
    elif explicit:
        out[pos + 8:pos + 12] = value.to_bytes(4, "little")
    else:
        out[pos + 4:pos + 8] = value.to_bytes(4, "little")
    return bytes(out)


def _wrong_vr(rng: random.Random, data: bytes) -> bytes:
    found = [p for p, explicit in _element_offsets(data) if explicit]
    if not found:
        return _flip(rng, data)
    out = bytearray(data)
    for pos in rng.sample(found, min(len(found), rng.randint(1, 4))):
        out[pos + 4:pos + 6] = rng.choice(_VRS)
    return bytes(out)


# -- mutations of bytes ------------------------------------------------------------------
def _flip(rng: random.Random, data: bytes) -> bytes:
    out = bytearray(data)
    for _ in range(rng.randint(1, 32)):
        out[rng.randrange(len(out))] ^= 1 << rng.randrange(8)
    return bytes(out)


def _truncate(rng: random.Random, data: bytes) -> bytes:
    return data[:rng.randrange(len(data))]


def _splice(rng: random.Random, data: bytes) -> bytes:
    a = rng.randrange(len(data))
    if rng.random() < 0.5:
        return data[:a] + data[a + rng.randint(1, 512):]
    return data[:a] + rng.randbytes(rng.randint(1, 512)) + data[a:]


def _syntax(rng: random.Random, data: bytes) -> bytes:
    ds = pydicom.dcmread(io.BytesIO(data), force=True)
    if not hasattr(ds, "file_meta"):
        ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = UID(rng.choice(_SYNTAXES))
    buf = io.BytesIO()
    try:  # the meta says one syntax, the data set keeps the encoding it was read with
        ds.save_as(buf, enforce_file_format=False, implicit_vr=ds.original_encoding[0],
                   little_endian=ds.original_encoding[1])
    except Exception:
        return _flip(rng, data)
    return buf.getvalue()


# -- constructed payloads ----------------------------------------------------------------
def _nested(rng: random.Random, data: bytes) -> bytes:
    """A sequence nested ``depth`` levels deep inserted before the pixel data."""
    depth = rng.choice((200, 1000, 3000, 5000, 20000))
    sq = b"\x08\x00\x15\x11SQ\x00\x00"  # (0008,1115) ReferencedSeriesSequence
    item, item_end = b"\xfe\xff\x00\xe0", b"\xfe\xff\x0d\xe0\x00\x00\x00\x00"
    seq_end = b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"
    if rng.random() < 0.5:  # undefined lengths
        body = (sq + b"\xff\xff\xff\xff" + item + b"\xff\xff\xff\xff") * depth
        body += (item_end + seq_end) * depth
    else:  # defined lengths: level k from the inside holds 16 * k bytes
        body = b"".join(sq + (16 * k - 8).to_bytes(4, "little")
                        + item + (16 * (k - 1)).to_bytes(4, "little")
                        for k in range(depth, 0, -1))
    pos = next((p for p, _ in _element_offsets(data)
                if data[p:p + 2] >= b"\x08\x00" and data[p + 2:p + 4] > b"\x15\x11"
                and data[p:p + 2] == b"\x08\x00"), None)
    if pos is None:
        return data[:132] + body + data[132:]
    return data[:pos] + body + data[pos:]


def _flood(rng: random.Random, data: bytes) -> bytes:
    """Hundreds of thousands of empty private elements: work per element, no size."""
    count = rng.choice((50_000, 200_000, 600_000))
    group = rng.choice((0x0009, 0x0029, 0x7FDF)).to_bytes(2, "little")
    elements = b"".join(group + (0x1000 + i % 0xEFFF).to_bytes(2, "little") + b"LO\x00\x00"
                        for i in range(count))
    return data[:132] + elements + data[132:] if data[128:132] == b"DICM" else elements + data


def _lying_codestream(rng: random.Random, _data: bytes) -> bytes:
    """A compressed instance whose header, codestream or fragments disagree."""
    name = rng.choice(("MR_small_RLE.dcm", "MR_small_jp2klossless.dcm",
                       "MR_small_jpeg_ls_lossless.dcm", "JPEG2000.dcm", "JPGExtended.dcm",
                       "SC_rgb_rle.dcm", "693_J2KI.dcm"))
    ds = _mr(pydicom.dcmread(TEST_FILES / name, force=True))
    pixel = bytearray(ds.PixelData)
    how = rng.randrange(6)
    if how == 0:  # header small, codestream as it is (or the reverse)
        ds.Rows, ds.Columns = rng.choice(((8, 8), (1, 65535), (65535, 65535), (64, 64)))
    elif how == 1:  # patch a size inside the codestream
        for marker in (b"\xff\xc0", b"\xff\xc1", b"\xff\xc3", b"\xff\xf7", b"\xff\x51"):
            at = pixel.find(marker)
            if at >= 0:
                off = at + (5 if marker != b"\xff\x51" else 8)
                pixel[off:off + 4] = rng.randbytes(4)
                break
        else:  # RLE: a segment offset or count that lies
            base = pixel.find(b"\xfe\xff\x00\xe0", 8) + 8
            pixel[base:base + 4] = rng.choice((15, 0, 255)).to_bytes(4, "little")
    elif how == 2:  # a fragment longer than what follows
        at = pixel.find(b"\xfe\xff\x00\xe0", 8)
        pixel[at + 4:at + 8] = rng.choice((0xFFFFFFF0, len(pixel) * 4)).to_bytes(4, "little")
    elif how == 3:  # RLE runs that decode to far more than the frame
        runs = (b"\x81\x00" * 4096)
        seg = (1).to_bytes(4, "little") + (64).to_bytes(4, "little") + bytes(56) + runs
        pixel = bytearray(b"\xfe\xff\x00\xe0\x00\x00\x00\x00\xfe\xff\x00\xe0"
                          + len(seg).to_bytes(4, "little") + seg)
        ds.file_meta.TransferSyntaxUID = RLELossless
    elif how == 4:  # the codestream body replaced by noise
        keep = min(len(pixel), 64)
        pixel[keep:] = rng.randbytes(len(pixel) - keep)
    else:  # bit flips in the codestream only
        for _ in range(rng.randint(1, 16)):
            pixel[rng.randrange(16, len(pixel))] ^= 1 << rng.randrange(8)
    ds.PixelData = bytes(pixel)
    try:
        return _encode(ds)
    except Exception:
        return bytes(pixel)


def _not_dicom(rng: random.Random, _data: bytes) -> bytes:
    kind = rng.randrange(6)
    if kind == 0:
        return rng.randbytes(rng.randint(0, 8192))
    if kind == 1:
        return bytes(128) + b"DICM" + rng.randbytes(rng.randint(0, 4096))
    if kind == 2:
        return b"\x89PNG\r\n\x1a\n" + rng.randbytes(512)
    if kind == 3:
        return b"{\"patient\": \"nobody\"}" * rng.randint(1, 200)
    if kind == 4:
        return b""
    return bytes(rng.randint(1, 70_000))


Mutation = Callable[[random.Random, bytes], bytes]
FAMILIES: tuple[tuple[str, Mutation, int], ...] = (  # name, mutation, weight
    ("bit_flips", _flip, 22), ("truncated", _truncate, 10), ("spliced", _splice, 10),
    ("huge_length", _huge_length, 14), ("wrong_vr", _wrong_vr, 12),
    ("transfer_syntax", _syntax, 8), ("deep_nesting", _nested, 4),
    ("lying_codestream", _lying_codestream, 12), ("element_flood", _flood, 1),
    ("not_dicom", _not_dicom, 7),
)
_WHEEL = [name for name, _, weight in FAMILIES for _ in range(weight)]
_BY_NAME = {name: fn for name, fn, _ in FAMILIES}


def family(i: int, seed: int = SEED) -> str:
    """Which family payload ``i`` belongs to."""
    return _WHEEL[random.Random(f"{seed}:{i}:family").randrange(len(_WHEEL))]


def payload(i: int, seed: int = SEED) -> bytes:
    """Payload ``i`` of the corpus of ``seed`` (deterministic)."""
    rng = random.Random(f"{seed}:{i}")
    base = rng.choice(bases())
    return _BY_NAME[family(i, seed)](rng, base)


def distinct(n: int = SIZE, seed: int = SEED) -> dict[str, tuple[int, bytes]]:
    """The corpus proper: the first ``n`` payloads of the stream that differ from every
    earlier one (some mutations repeat, e.g. an empty payload), by sha256."""
    import hashlib

    out: dict[str, tuple[int, bytes]] = {}
    i = 0
    while len(out) < n:
        p = payload(i, seed)
        out.setdefault(hashlib.sha256(p).hexdigest(), (i, p))
        i += 1
    return out


def sample(n: int, seed: int = SEED, size: int = SIZE) -> list[int]:
    """A seeded subset of ``n`` indices that holds every family."""
    picked = sorted(random.Random(f"{seed}:sample").sample(range(size), n))
    have = {family(i, seed) for i in picked}
    for name, _, _ in FAMILIES:
        if name not in have:
            picked.append(next(i for i in range(size) if family(i, seed) == name))
    return sorted(set(picked))
