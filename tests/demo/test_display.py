"""agent.demo.display.radiological: every axis-aligned axial orientation turns into the same
upright view (columns to the patient's left, rows posterior), checked through DICOM files
that build_series writes with that orientation."""

from __future__ import annotations

import io
import itertools

import numpy as np
import pydicom
import pytest

from agent.demo.display import radiological
from agent.demo.sample_series import build_series


def _orientations() -> list[tuple[float, ...]]:
    axes = [(1.0, 0.0, 0.0), (0.0, 1.0, 0.0)]
    out = []
    for row_axis, col_axis in itertools.permutations(axes):
        for rs, cs in itertools.product((1.0, -1.0), repeat=2):
            row = tuple(rs * v + 0.0 for v in row_axis)
            out.append(row + tuple(cs * v + 0.0 for v in col_axis))
    return out


@pytest.mark.parametrize("iop", _orientations())
def test_every_axial_orientation_gives_the_same_view(iop: tuple[float, ...]) -> None:
    # A 5 x 7 patch of patient space (x -2..2, y -3..3 mm); pixel value = 100 * (y + 3) +
    # (x + 2) + 1, laid out in the stored orientation, must come back in one layout.
    rows, cols = (5, 7) if iop[1] != 0 else (7, 5)  # (x, y) extents 5 and 7 mm
    ds = pydicom.dcmread(io.BytesIO(build_series(
        np.zeros((1, rows, cols), np.uint16), orientation=iop)[0]))
    ipp = np.array(ds.ImagePositionPatient, dtype=float)
    r, c = np.mgrid[0:rows, 0:cols]
    row_cos, col_cos = (np.array(v)[:, None, None] for v in (iop[:3], iop[3:]))
    pos = ipp[:, None, None] + c * row_cos + r * col_cos
    values = (100 * (pos[1] + 3) + (pos[0] + 2) + 1).round().astype(np.uint16)
    view = radiological(values, ds.ImageOrientationPatient)
    want = 100 * np.arange(7)[:, None] + np.arange(5)[None, :] + 1  # rows: y up to down, cols: x
    np.testing.assert_array_equal(view, want)


@pytest.mark.parametrize("iop", [(1, 0, 0, 0, 0, -1), (0.8, 0.6, 0, -0.6, 0.8, 0), (1, 0, 0)])
def test_non_axial_or_oblique_slices_are_refused(iop: tuple[float, ...]) -> None:
    with pytest.raises(ValueError):
        radiological(np.zeros((2, 2)), iop)
