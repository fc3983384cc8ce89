"""Real-looking DICOM series from numpy volumes, for the demo, ``send`` and the tests.

``build_series`` writes one Part-10 instance per slice (axial, Explicit VR Little Endian)
with the patient, study, series, frame-of-reference, image-plane and pixel modules a
scanner gateway would send. ``load_demo_slab`` reads the packaged MNI152 slab
(``agent.demo.mni_sample`` makes it a series whose header places every voxel where it is).
Volume axes are ``[slice, row, col]`` and so are the spacings: ``(slice, row, col)`` mm.

Geometry follows DICOM's image plane module, in patient coordinates (LPS: x to the
patient's left, y posterior, z superior): the pixel at (row r, column c) of a slice lies at
``ImagePositionPatient + c * column_spacing * row_cosines + r * row_spacing * column_cosines``,
where ``ImageOrientationPatient`` = row cosines (the direction along a row, as the column
index grows) then column cosines (down a column, as the row index grows), and
``PixelSpacing`` = (row spacing, column spacing).
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from importlib import resources

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    MRImageStorage,
    generate_uid,
)

DEMO_SLAB = "mni152_t1w_slab.npz"  # under agent/samples/
# Rows run to the patient's left (+x), columns posterior (+y): the usual axial display.
AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
_SOP_CLASS = {"MR": MRImageStorage, "CT": CTImageStorage}


@dataclass(frozen=True)
class DemoSlab:
    """A slab of the MNI152 template: T1w input and the simulated T2w reference."""

    t1: np.ndarray  # uint16 [slices, rows, cols]
    t2_reference: np.ndarray  # uint16 [slices, rows, cols]
    spacing_mm: tuple[float, float, float]  # (slice, row, col)
    first_slice_z_mm: float


def demo_slab_available() -> bool:
    """Whether the packaged demo slab is installed."""
    return resources.files("agent").joinpath("samples", DEMO_SLAB).is_file()


def load_demo_slab() -> DemoSlab:
    """Read ``agent/samples/mni152_t1w_slab.npz`` from the installed package.

    Raises FileNotFoundError when the package was built without it."""
    resource = resources.files("agent").joinpath("samples", DEMO_SLAB)
    if not resource.is_file():
        raise FileNotFoundError(f"demo slab agent/samples/{DEMO_SLAB} is not installed")
    with resource.open("rb") as f, np.load(io.BytesIO(f.read()), allow_pickle=False) as npz:
        spacing = [float(v) for v in np.asarray(npz["spacing_mm"]).ravel()]
        if len(spacing) != 3:
            raise ValueError(f"{DEMO_SLAB}: spacing_mm must hold 3 values, got {spacing}")
        return DemoSlab(
            t1=np.asarray(npz["t1"], dtype=np.uint16),
            t2_reference=np.asarray(npz["t2_reference"], dtype=np.uint16),
            spacing_mm=(spacing[0], spacing[1], spacing[2]),
            first_slice_z_mm=float(npz["first_slice_z_mm"]),
        )


def _common(
    *,
    modality: str,
    patient_name: str,
    patient_id: str,
    series_description: str,
    study_uid: str,
    series_uid: str,
    frame_uid: str,
    now: datetime,
) -> Dataset:
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SOPClassUID = _SOP_CLASS[modality]
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = now.strftime("%Y%m%d")
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = now.strftime("%H%M%S")
    ds.AccessionNumber = ""
    ds.Modality = modality
    ds.Manufacturer = "iomt-edge-agent sample"
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = "Brain (sample)"
    ds.SeriesDescription = series_description
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    ds.PatientBirthDate = ""
    ds.PatientSex = "O"
    ds.BodyPartExamined = "HEAD"
    ds.PatientPosition = "HFS"
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.StudyID = "1"
    ds.SeriesNumber = 1
    ds.FrameOfReferenceUID = frame_uid
    ds.PositionReferenceIndicator = ""
    if modality == "MR":  # MR Image module: a template, not a real acquisition
        ds.ScanningSequence, ds.SequenceVariant = "RM", "NONE"
        ds.ScanOptions, ds.MRAcquisitionType = "", "3D"
        ds.EchoTime = ds.RepetitionTime = ds.EchoTrainLength = ""
    else:
        ds.KVP, ds.AcquisitionNumber, ds.RescaleType = "", "", "HU"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.RescaleIntercept, ds.RescaleSlope = "0", "1"
    return ds


def build_series(
    volume: np.ndarray,
    *,
    spacing_mm: Sequence[float] = (1.0, 1.0, 1.0),
    first_slice_z_mm: float = 0.0,
    patient_name: str = "DEMO^PATIENT",
    patient_id: str = "DEMO-0001",
    series_description: str = "T1w 3D axial (MNI152 template)",
    modality: str = "MR",
    study_instance_uid: str | None = None,
    series_instance_uid: str | None = None,
    orientation: Sequence[float] = AXIAL,
    first_pixel_mm: tuple[float, float] | None = None,
    image_comments: str | None = None,
) -> list[bytes]:
    """Write ``volume`` (uint16 ``[slices, rows, cols]``) as a series of single-frame
    Part-10 instances, one per slice, in slice order.

    ``spacing_mm`` is ``(slice, row, col)`` in mm. Slices are axial: ``orientation`` (the
    ImageOrientationPatient, default ``AXIAL``) must lie in the x-y plane. The first pixel
    of every slice is at (x, y) = ``first_pixel_mm`` (LPS mm; default: the middle of the
    matrix at x = y = 0), the first slice at z = ``first_slice_z_mm``, the next ones stepping
    by the slice spacing towards +z (superior). Study and series UIDs are fresh unless given;
    ``modality`` "MR" or "CT" picks the storage class; ``image_comments`` goes into
    ImageComments.
    """
    vol = np.asarray(volume)
    if vol.ndim != 3 or vol.dtype != np.uint16:
        raise ValueError(
            f"expected a uint16 [slices, rows, cols] volume, got {vol.dtype}{vol.shape}"
        )
    if modality not in _SOP_CLASS:
        raise ValueError(f"modality {modality!r} not supported (MR, CT)")
    if len(spacing_mm) != 3 or not all(float(s) > 0 for s in spacing_mm):
        raise ValueError(f"spacing_mm must be 3 positive numbers (slice, row, col): {spacing_mm}")
    dz, dy, dx = (float(s) for s in spacing_mm)
    row_dir, col_dir = _axial_cosines(orientation)
    n, rows, cols = vol.shape
    now = datetime.now()
    template = _common(
        modality=modality,
        patient_name=patient_name,
        patient_id=patient_id,
        series_description=series_description,
        study_uid=study_instance_uid or generate_uid(),
        series_uid=series_instance_uid or generate_uid(),
        frame_uid=generate_uid(),
        now=now,
    )
    template.Rows, template.Columns = rows, cols
    template.PixelSpacing = [f"{dy:g}", f"{dx:g}"]
    template.SliceThickness = template.SpacingBetweenSlices = f"{dz:g}"
    template.ImagesInAcquisition = n  # lets a 2.5D agent know when the series is complete
    template.ImageOrientationPatient = [f"{v + 0.0:g}" for v in (*row_dir, *col_dir)]
    if image_comments is not None:
        template.ImageComments = image_comments
    if first_pixel_mm is None:  # the middle of the matrix at x = y = 0
        centre = (cols - 1) / 2 * dx * row_dir + (rows - 1) / 2 * dy * col_dir
        x0, y0 = -float(centre[0]) + 0.0, -float(centre[1]) + 0.0
    else:
        x0, y0 = (float(v) for v in first_pixel_mm)
    out: list[bytes] = []
    for i in range(n):
        ds = Dataset()
        ds.update(template)
        z = first_slice_z_mm + i * dz
        ds.SOPInstanceUID = generate_uid()
        ds.InstanceNumber = i + 1
        ds.ImagePositionPatient = [f"{x0:.6g}", f"{y0:.6g}", f"{z:.6g}"]
        ds.SliceLocation = f"{z:.6g}"
        ds.PixelData = np.ascontiguousarray(vol[i]).astype("<u2", copy=False).tobytes()
        ds["PixelData"].VR = "OW"
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = UID(ds.SOPClassUID)
        ds.file_meta.MediaStorageSOPInstanceUID = UID(ds.SOPInstanceUID)
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        buffer = io.BytesIO()
        pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
        out.append(buffer.getvalue())
    return out


def _axial_cosines(orientation: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """(row cosines, column cosines) of an axial ImageOrientationPatient; ValueError unless
    they are two orthogonal unit vectors in the x-y plane."""
    iop = np.asarray([float(v) for v in orientation], dtype=np.float64)
    if iop.shape != (6,):
        raise ValueError(f"orientation must be 6 numbers (row, column cosines): {orientation}")
    row, col = iop[:3], iop[3:]
    unit = np.allclose([np.linalg.norm(row), np.linalg.norm(col)], 1.0, atol=1e-6)
    if not unit or abs(float(row @ col)) > 1e-6 or abs(row[2]) > 1e-6 or abs(col[2]) > 1e-6:
        raise ValueError(
            f"orientation {orientation}: expected two orthogonal unit vectors in the x-y plane "
            "(an axial slice)")
    return row, col
