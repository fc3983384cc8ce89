"""Native (uncompressed) pixel data straight from its bytes, for the common case.

pydicom's ``Dataset.pixel_array`` goes through its decoder framework (a runner, option
validation, plugin lookup) even for uncompressed data: about half a millisecond per slice
of pure Python around what is a ``np.frombuffer``. ``native_pixels`` does that directly for
the images an edge node mostly sees (one frame, one sample, 8 or 16 bits allocated, little
endian, a buffer of exactly the expected length) and returns the same array pydicom would:
the same dtype, unused high bits cleared (unsigned) or sign-extended (signed), as pydicom
does by default (``correct_unused_bits``). Anything else returns None and pydicom decodes
it, so odd inputs keep pydicom's behaviour, warnings and errors.
"""

from __future__ import annotations

import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

from agent.dicom import header_values

_LITTLE_ENDIAN_NATIVE = frozenset({ExplicitVRLittleEndian, ImplicitVRLittleEndian})


def _int(ds: Dataset, keyword: str) -> int | None:
    value = header_values.get(ds, keyword)
    return value if isinstance(value, int) else None


def native_pixels(ds: Dataset, syntax: str) -> np.ndarray | None:
    """The stored values of ``ds``'s single frame as ``ds.pixel_array`` gives them (possibly
    a read-only view of the payload), or None when the image is not the simple native
    case (the caller then asks pydicom)."""
    if syntax not in _LITTLE_ENDIAN_NATIVE:
        return None
    bits, stored = _int(ds, "BitsAllocated"), _int(ds, "BitsStored")
    representation, samples = _int(ds, "PixelRepresentation"), _int(ds, "SamplesPerPixel")
    rows, cols = _int(ds, "Rows"), _int(ds, "Columns")
    frames = ds.get("NumberOfFrames")
    if (
        bits not in (8, 16)
        or stored is None
        or not 1 <= stored <= bits
        or representation not in (0, 1)
        or samples != 1
        or frames not in (None, "", 1, "1")
        or rows is None
        or cols is None
        or rows < 1
        or cols < 1
    ):
        return None
    data = ds.get("PixelData")
    if not isinstance(data, bytes):
        return None
    count = rows * cols
    expected = count * bits // 8
    if len(data) != expected + expected % 2:  # an odd length is padded to even
        return None
    dtype = np.dtype(f"<{'i' if representation else 'u'}{bits // 8}")
    arr = np.frombuffer(data, dtype=dtype, count=count).reshape(rows, cols)
    shift = bits - stored
    if shift:  # the bits above BitsStored are not part of the value (PS3.5 8.1.1)
        arr = arr.copy()  # frombuffer gives a read-only view of the payload
        np.left_shift(arr, shift, out=arr)
        np.right_shift(arr, shift, out=arr)  # arithmetic for signed: sign extension
    return arr


def short_pixel_data(ds: Dataset) -> str | None:
    """Why uncompressed ``PixelData`` is too short for the header's image, in numbers, or
    None (pydicom would raise a ValueError that says nothing a site engineer can use)."""
    data = ds.get("PixelData")
    if not isinstance(data, bytes):
        return None
    dims = [_int(ds, k) or 1 for k in ("Rows", "Columns", "SamplesPerPixel")]
    bits = _int(ds, "BitsAllocated") or 0
    needed = (dims[0] * dims[1] * dims[2] * bits + 7) // 8
    if len(data) >= needed:
        return None
    return (f"PixelData holds {len(data)} bytes, but Rows x Columns x SamplesPerPixel x "
            f"BitsAllocated ({' x '.join(map(str, dims))} x {bits} bits) needs {needed}: the "
            "header and the pixel data disagree")
