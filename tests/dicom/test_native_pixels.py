"""The native pixel fast path gives exactly pydicom's ``pixel_array``, or steps aside."""

from __future__ import annotations

import io

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    MRImageStorage,
    generate_uid,
)

from agent.dicom.native_pixels import native_pixels


def instance(rows: int, cols: int, bits: int, stored: int, signed: int, syntax: str,
             seed: int = 0) -> Dataset:
    """An instance whose pixel bytes are random, unused high bits included."""
    rng = np.random.default_rng(seed)
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, generate_uid()
    ds.Rows, ds.Columns, ds.SamplesPerPixel = rows, cols, 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = bits, stored, stored - 1
    ds.PixelRepresentation = signed
    data = rng.integers(0, 256, size=rows * cols * bits // 8, dtype=np.uint8).tobytes()
    ds.PixelData = data + (b"\0" if len(data) % 2 else b"")
    ds["PixelData"].VR = "OB" if bits == 8 else "OW"
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = syntax
    out = io.BytesIO()
    pydicom.dcmwrite(out, ds, enforce_file_format=True)
    return pydicom.dcmread(io.BytesIO(out.getvalue()))


CASES = [
    (bits, stored, signed)
    for bits, stored_values in ((8, (8, 7, 1)), (16, (16, 12, 10, 1)))
    for stored in stored_values
    for signed in (0, 1)
]


@pytest.mark.parametrize(("bits", "stored", "signed"), CASES)
@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
def test_same_array_as_pydicom(bits: int, stored: int, signed: int, syntax: str) -> None:
    for seed, (rows, cols) in enumerate([(7, 5), (16, 16), (3, 33)]):
        ds = instance(rows, cols, bits, stored, signed, syntax, seed)
        fast = native_pixels(ds, syntax)
        assert fast is not None
        expected = ds.pixel_array
        assert fast.dtype == expected.dtype
        np.testing.assert_array_equal(fast, expected)


def test_pydicom_test_files() -> None:
    handled = {"MR_small.dcm": True, "MR_small_implicit.dcm": True, "CT_small.dcm": True,
               "MR_small_padded.dcm": False, "MR_small_bigendian.dcm": False,
               "MR_small_RLE.dcm": False}  # shipped with pydicom; padded: excess bytes
    for name, fast_path in handled.items():
        path = get_testdata_file(name, download=False)
        assert path is not None
        ds = pydicom.dcmread(path)
        fast = native_pixels(ds, str(ds.file_meta.TransferSyntaxUID))
        assert (fast is not None) == fast_path, name
        if fast is not None:
            np.testing.assert_array_equal(fast, ds.pixel_array)
            assert fast.dtype == ds.pixel_array.dtype


def test_steps_aside_for_what_it_does_not_handle() -> None:
    ds = instance(8, 8, 16, 12, 0, ExplicitVRLittleEndian)
    assert native_pixels(ds, ExplicitVRBigEndian) is None
    assert native_pixels(ds, "1.2.840.10008.1.2.4.50") is None  # JPEG baseline
    for change in (
        lambda d: setattr(d, "PixelData", d.PixelData + b"\0\0"),  # excess bytes
        lambda d: setattr(d, "PixelData", d.PixelData[:-2]),  # too short
        lambda d: setattr(d, "NumberOfFrames", 2),
        lambda d: setattr(d, "SamplesPerPixel", 3),
        lambda d: setattr(d, "BitsAllocated", 32),
        lambda d: delattr(d, "BitsStored"),
        lambda d: setattr(d, "BitsStored", 17),
        lambda d: delattr(d, "PixelRepresentation"),
    ):
        other = instance(8, 8, 16, 12, 0, ExplicitVRLittleEndian)
        change(other)
        assert native_pixels(other, ExplicitVRLittleEndian) is None
