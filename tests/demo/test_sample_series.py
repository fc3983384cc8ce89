"""Generated series look like what a scanner gateway sends, and decode as such."""

from __future__ import annotations

import io

import numpy as np
import pydicom
import pytest
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, MRImageStorage, generate_uid

from agent.demo.sample_series import build_series, demo_slab_available, load_demo_slab
from agent.dicom.decode import decode_scan
from agent.dicom.derive import ModelIdentity, derive_instance
from agent.model.bundle import InputContract, OutputContract
from agent.model.preprocess import from_model_grid, normalise, to_model_grid


def phantom(n: int = 4, rows: int = 48, cols: int = 40) -> np.ndarray:
    rng = np.random.default_rng(3)
    return rng.integers(0, 4096, size=(n, rows, cols), dtype=np.uint16)


def read(payload: bytes) -> pydicom.Dataset:
    return pydicom.dcmread(io.BytesIO(payload))


def test_series_structure_and_geometry() -> None:
    volume = phantom()
    payloads = build_series(volume, spacing_mm=(2.5, 0.9, 0.8), first_slice_z_mm=-30.0)
    assert len(payloads) == 4
    slices = [read(p) for p in payloads]
    first = slices[0]
    assert first.preamble is not None
    assert first.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert first.SOPClassUID == MRImageStorage == first.file_meta.MediaStorageSOPClassUID
    assert first.Modality == "MR"
    assert str(first.PatientName) == "DEMO^PATIENT" and first.PatientID == "DEMO-0001"
    assert first.SeriesDescription == "T1w 3D axial (MNI152 template)"
    assert len({s.StudyInstanceUID for s in slices}) == 1
    assert len({s.SeriesInstanceUID for s in slices}) == 1
    assert len({s.FrameOfReferenceUID for s in slices}) == 1
    assert len({s.SOPInstanceUID for s in slices}) == 4
    assert [s.InstanceNumber for s in slices] == [1, 2, 3, 4]
    assert [float(s.ImagePositionPatient[2]) for s in slices] == [-30.0, -27.5, -25.0, -22.5]
    assert [float(s.SliceLocation) for s in slices] == [-30.0, -27.5, -25.0, -22.5]
    # centred in x and y: the middle of the matrix sits at 0 mm
    x0, y0 = float(first.ImagePositionPatient[0]), float(first.ImagePositionPatient[1])
    assert x0 + (40 - 1) / 2 * 0.8 == pytest.approx(0.0, abs=1e-4)
    assert y0 + (48 - 1) / 2 * 0.9 == pytest.approx(0.0, abs=1e-4)
    assert [float(v) for v in first.ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
    assert [float(v) for v in first.PixelSpacing] == [0.9, 0.8]
    assert float(first.SliceThickness) == 2.5
    assert (first.Rows, first.Columns) == (48, 40)
    assert (first.BitsAllocated, first.BitsStored, first.HighBit) == (16, 16, 15)
    assert first.PixelRepresentation == 0 and first.PhotometricInterpretation == "MONOCHROME2"
    assert (float(first.RescaleSlope), float(first.RescaleIntercept)) == (1.0, 0.0)
    for k, s in enumerate(slices):
        np.testing.assert_array_equal(s.pixel_array, volume[k])


def test_given_uids_patient_and_ct() -> None:
    study, series = generate_uid(), generate_uid()
    payloads = build_series(
        phantom(2),
        modality="CT",
        patient_name="OTHER^PERSON",
        patient_id="X-9",
        series_description="CT head",
        study_instance_uid=study,
        series_instance_uid=series,
    )
    ds = read(payloads[1])
    assert ds.SOPClassUID == CTImageStorage and ds.Modality == "CT"
    assert (ds.StudyInstanceUID, ds.SeriesInstanceUID) == (study, series)
    assert str(ds.PatientName) == "OTHER^PERSON" and ds.PatientID == "X-9"


def test_two_builds_get_fresh_uids() -> None:
    a, b = read(build_series(phantom(1))[0]), read(build_series(phantom(1))[0])
    assert a.StudyInstanceUID != b.StudyInstanceUID
    assert a.SeriesInstanceUID != b.SeriesInstanceUID


def test_generated_slices_pass_a_t1w_contract() -> None:
    contract = InputContract(
        modality="MR",
        shape=(256, 256),
        pixel_spacing_mm=(1.0, 1.0),
        series_description_pattern=r"\bT1w?\b",
    )
    volume = phantom(2, 256, 256)
    for k, payload in enumerate(build_series(volume)):
        scan = decode_scan(payload, contract, pixel_budget=1 << 20, max_payload_bytes=1 << 22)
        np.testing.assert_array_equal(scan.pixels, volume[k].astype(np.float32))


@pytest.mark.parametrize(
    "bad", [np.zeros((4, 4), np.uint16), np.zeros((1, 4, 4), np.float32), np.zeros((1, 4, 4))]
)
def test_rejects_bad_volumes(bad: np.ndarray) -> None:
    with pytest.raises(ValueError):
        build_series(bad)


@pytest.mark.parametrize("spacing", [(1.0, 1.0), (0.0, 1.0, 1.0), (1.0, -1.0, 1.0)])
def test_rejects_bad_spacing(spacing: tuple[float, ...]) -> None:
    with pytest.raises(ValueError, match="spacing"):
        build_series(phantom(1), spacing_mm=spacing)


def test_rejects_unknown_modality() -> None:
    with pytest.raises(ValueError, match="modality"):
        build_series(phantom(1), modality="US")


@pytest.mark.skipif(not demo_slab_available(), reason="agent/samples/mni152_t1w_slab.npz absent")
def test_demo_slab_builds_a_series() -> None:
    slab = load_demo_slab()
    assert slab.t1.dtype == np.uint16 and slab.t1.ndim == 3
    assert slab.t2_reference.shape == slab.t1.shape
    assert len(slab.spacing_mm) == 3 and all(s > 0 for s in slab.spacing_mm)
    payloads = build_series(
        slab.t1[:2], spacing_mm=slab.spacing_mm, first_slice_z_mm=slab.first_slice_z_mm
    )
    ds = read(payloads[1])
    assert float(ds.ImagePositionPatient[2]) == pytest.approx(
        slab.first_slice_z_mm + slab.spacing_mm[0], abs=1e-4
    )
    np.testing.assert_array_equal(ds.pixel_array, slab.t1[1])


@pytest.mark.skipif(not demo_slab_available(), reason="agent/samples/mni152_t1w_slab.npz absent")
def test_demo_slab_through_decode_grid_and_derive() -> None:
    slab = load_demo_slab()
    contract = InputContract(
        modality="MR",
        shape=(256, 256),
        pixel_spacing_mm=(1.0, 1.0),
        series_description_pattern="T1w",
    )
    output = OutputContract(modality="MR", scale=1000.0)
    model = ModelIdentity("identity", "0", "00" * 32)
    payloads = build_series(slab.t1[10:13], spacing_mm=slab.spacing_mm)
    series_uids = set()
    for k, payload in enumerate(payloads):
        scan = decode_scan(payload, contract, pixel_budget=1 << 20, max_payload_bytes=1 << 22)
        grid, gmap = to_model_grid(scan.pixels, scan.pixel_spacing, contract)
        x = normalise(grid, contract.normalisation)
        assert x.min() >= 0.0 and x.max() <= contract.normalisation.clip_max
        stored = from_model_grid(grid, gmap)  # an identity "model" on the raw values
        derived = read(
            derive_instance(scan, stored, model, output, device_id="e", software_version="v")
        )
        np.testing.assert_array_equal(derived.pixel_array, slab.t1[10 + k])
        series_uids.add(derived.SeriesInstanceUID)
    assert len(series_uids) == 1


def test_load_demo_slab_reports_a_missing_file() -> None:
    if demo_slab_available():
        pytest.skip("the demo slab is installed")
    with pytest.raises(FileNotFoundError, match="mni152_t1w_slab"):
        load_demo_slab()


def test_orientation_first_pixel_and_comments() -> None:
    iop = (0.0, -1.0, 0.0, 1.0, 0.0, 0.0)
    payloads = build_series(phantom(2), spacing_mm=(2.0, 0.9, 0.8), first_slice_z_mm=4.0,
                            orientation=iop, first_pixel_mm=(-30.0, 20.0), image_comments="hi")
    first, second = read(payloads[0]), read(payloads[1])
    assert [float(v) for v in first.ImageOrientationPatient] == list(iop)
    assert [float(v) for v in second.ImagePositionPatient] == [-30.0, 20.0, 6.0]
    assert first.ImageComments == "hi"
    # centred by default in any orientation: the middle pixel at x = y = 0
    ds = read(build_series(phantom(1), spacing_mm=(1.0, 0.9, 0.8), orientation=iop)[0])
    ipp = np.array(ds.ImagePositionPatient, dtype=float)
    middle = ipp + (40 - 1) / 2 * 0.8 * np.array(iop[:3]) + (48 - 1) / 2 * 0.9 * np.array(iop[3:])
    np.testing.assert_allclose(middle[:2], [0.0, 0.0], atol=1e-4)
    assert "ImageComments" not in ds


@pytest.mark.parametrize("iop", [(1, 0, 0, 0, 0, 1), (1, 0, 0, 1, 0, 0), (2, 0, 0, 0, 1, 0),
                                 (1, 0, 0, 0, 1)])
def test_rejects_non_axial_orientations(iop: tuple[float, ...]) -> None:
    with pytest.raises(ValueError, match="orientation"):
        build_series(phantom(1), orientation=iop)
