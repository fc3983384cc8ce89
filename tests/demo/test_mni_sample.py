"""The sample series' header agrees with its pixels: a voxel at a known MNI position lands
where ImagePositionPatient + ImageOrientationPatient + PixelSpacing put it, the anatomy
lies where MNI space has it, the slices run inferior to superior along their normal (the
order the 2.5D model was trained on), and the model sees the slab as it was trained."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pydicom
import pytest

from agent.cli import main
from agent.demo.display import radiological
from agent.demo.mni_sample import as_stored, notice, sample_series, slab_to_mni, write_sample
from agent.demo.sample_series import DemoSlab, demo_slab_available, load_demo_slab
from agent.dicom.decode import decode_scan
from agent.dicom.series import slice_position
from agent.model.bundle import load_bundle

LITE = Path(__file__).resolve().parents[2] / "models" / "t1w-to-t2w-lite"
pytestmark = pytest.mark.skipif(not demo_slab_available(), reason="demo slab not installed")

# From models/recipes/simulate.py and nilearn's template header (sform: 1 mm, origin
# (-98, -134, -72) mm): slab row = template x index + 29, column = y index + 11.
ORIGIN_RAS, PAD = (-98, -134, -72), (29, 11)


def read(payload: bytes) -> pydicom.Dataset:
    return pydicom.dcmread(io.BytesIO(payload))


def patient_position(ds: pydicom.Dataset, row: float, col: float) -> np.ndarray:
    """DICOM's image plane equation: where pixel (row, col) of this slice lies (LPS mm)."""
    iop = np.array(ds.ImageOrientationPatient, dtype=float)
    ipp = np.array(ds.ImagePositionPatient, dtype=float)
    row_spacing, col_spacing = (float(v) for v in ds.PixelSpacing)
    return ipp + col * col_spacing * iop[:3] + row * row_spacing * iop[3:]


def with_marker(slab: DemoSlab, mni: tuple[int, int, int]) -> DemoSlab:
    """A copy of the slab with one bright voxel at MNI ``mni`` (RAS mm)."""
    t1 = slab.t1.copy()
    x, y, z = mni
    t1[z - int(slab.first_slice_z_mm), x - ORIGIN_RAS[0] + PAD[0], y - ORIGIN_RAS[1] + PAD[1]] = (
        60000)
    return DemoSlab(t1, slab.t2_reference, slab.spacing_mm, slab.first_slice_z_mm)


@pytest.mark.parametrize("mni", [(40, -20, 5), (-60, 30, -6), (0, 0, 17), (25, -90, 0)])
def test_a_marker_lands_at_its_mni_position(mni: tuple[int, int, int]) -> None:
    payloads = sample_series(slab=with_marker(load_demo_slab(), mni))
    hits = []
    for payload in payloads:
        ds = read(payload)
        for row, col in zip(*np.nonzero(ds.pixel_array == 60000), strict=True):
            hits.append(patient_position(ds, row, col))
    assert len(hits) == 1
    x, y, z = mni
    np.testing.assert_allclose(hits[0], [-x, -y, z], atol=1e-4)  # RAS -> LPS


def test_slab_to_mni_is_the_grid_the_header_describes() -> None:
    slab = load_demo_slab()
    ds = read(sample_series(3, slab)[2])
    rows = slab.t1.shape[1]
    for row, col in [(0, 0), (29, 11), (127, 145), (200, 31)]:
        x, y, z = slab_to_mni(slab, 2, row, col)
        assert (x, y) == (ORIGIN_RAS[0] + row - PAD[0], ORIGIN_RAS[1] + col - PAD[1])
        stored_row = rows - 1 - row  # as_stored flips the rows
        np.testing.assert_allclose(patient_position(ds, stored_row, col), [-x, -y, z], atol=1e-4)
        assert ds.pixel_array[stored_row, col] == slab.t1[2, row, col]


def test_the_anatomy_lies_where_mni_space_has_it() -> None:
    ds = read(sample_series()[12])
    rows, cols = np.nonzero(ds.pixel_array > 0.2 * ds.pixel_array.max())
    lps = patient_position(ds, rows[:, None], cols[:, None])
    left_right, back_front = lps[:, 0], lps[:, 1]
    # The brain is longer front to back than it is wide, and symmetric about x = 0 ...
    assert np.ptp(back_front) > np.ptp(left_right) + 20
    assert abs(left_right.min() + left_right.max()) <= 2
    # ... and the MNI origin (the anterior commissure) lies nearer the frontal pole
    # (about 70 mm anterior, LPS y < 0) than the occipital one (about 105 mm posterior).
    assert -80 < back_front.min() < -65 and 100 < back_front.max() < 112


def test_slices_run_superior_along_their_normal_in_slab_order() -> None:
    slab = load_demo_slab()
    slices = [read(p) for p in sample_series(slab=slab)]
    positions = [slice_position(ds.ImageOrientationPatient, ds.ImagePositionPatient)
                 for ds in slices]
    assert positions == sorted(positions)  # the agent's order is the slab's order
    iop = np.array(slices[0].ImageOrientationPatient, dtype=float)
    np.testing.assert_allclose(np.cross(iop[:3], iop[3:]), [0, 0, 1])  # superior
    assert [float(ds.ImagePositionPatient[2]) for ds in slices] == [
        slab.first_slice_z_mm + k for k in range(len(slices))]


def test_model_input_is_the_slab_as_trained_up_to_a_trained_flip() -> None:
    """The agent decodes the slab's pixels flipped top to bottom, one of the flips of the
    models' training augmentation; nothing is transposed or resampled."""
    slab = load_demo_slab()
    contract = load_bundle(LITE).input
    for k, payload in enumerate(sample_series(4, slab)):
        scan = decode_scan(payload, contract, pixel_budget=1 << 20, max_payload_bytes=1 << 22)
        np.testing.assert_array_equal(scan.pixels[::-1, :], slab.t1[k].astype(np.float32))
    np.testing.assert_array_equal(as_stored(slab.t2_reference)[:, ::-1, :], slab.t2_reference)


def test_radiological_view_puts_anterior_up_and_the_right_side_left() -> None:
    ds = read(sample_series(slab=with_marker(load_demo_slab(), (40, 60, 5)))[11])
    view = radiological(ds.pixel_array, ds.ImageOrientationPatient)
    (row,), (col,) = np.nonzero(view == 60000)
    # the marker sits in the patient's right (x = +40 RAS) anterior (y = +60) quarter
    assert col < view.shape[1] // 2 and row < view.shape[0] // 2


def test_each_file_carries_the_template_notice() -> None:
    ds = read(sample_series(1)[0])
    assert "McConnell Brain Imaging Centre" in ds.ImageComments
    assert ds.ImageComments == notice()
    assert "not for diagnostic use" in notice()


def test_sample_command_writes_a_series_for_send(tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "scans"
    assert main(["sample", str(out), "--count", "5"]) == 0
    files = sorted(out.iterdir())
    assert [f.name for f in files] == [f"slice{i:03d}.dcm" for i in range(1, 6)]
    series = {read(f.read_bytes()).SeriesInstanceUID for f in files}
    assert len(series) == 1
    assert "iomt-agent send" in capsys.readouterr().out
    assert main(["sample", str(out)]) == 1  # not empty: would mix two series
    assert main(["sample", str(tmp_path / "b"), "--count", "0"]) == 2
    assert main(["sample", str(tmp_path / "c"), "--count", "25"]) == 2
    assert not (tmp_path / "b").exists() and not (tmp_path / "c").exists()
    assert len(write_sample(tmp_path / "d")) == 24  # all of the slab by default
