"""Turn an axial slice upright for display, from its DICOM orientation.

The usual axial view (radiological convention) has columns running to the patient's left
(+x in DICOM's LPS coordinates: the patient's right on the left of the screen) and rows
running posterior (+y: anterior at the top), i.e. ImageOrientationPatient (1, 0, 0, 0, 1,
0). A slice stored with its rows or columns along other axis directions is transposed and
flipped into that view; the pixels are moved, never resampled.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

import numpy as np
import numpy.typing as npt

Pixel = TypeVar("Pixel", bound=np.generic)


def radiological(pixels: npt.NDArray[Pixel], orientation: Sequence[float]
                 ) -> npt.NDArray[Pixel]:
    """``pixels`` (rows, cols) of an axial slice with ImageOrientationPatient
    ``orientation``, rearranged so that columns run along +x and rows along +y (LPS).

    Raises ValueError unless the row and column cosines each lie along the x or y axis
    (within 1e-3), one along each: an oblique or non-axial slice has no such view."""
    iop = np.asarray([float(v) for v in orientation], dtype=np.float64)
    if iop.shape != (6,):
        raise ValueError(f"orientation must be 6 numbers, got {orientation!r}")
    row_axis, row_sign = _axis(iop[:3])  # where the column index runs
    col_axis, col_sign = _axis(iop[3:])  # where the row index runs
    if {row_axis, col_axis} != {0, 1}:
        raise ValueError(f"orientation {orientation!r} is not an axis-aligned axial slice")
    image = pixels
    if row_axis == 1:  # columns run along y: swap so that they run along x
        image, row_sign, col_sign = image.T, col_sign, row_sign
    if row_sign < 0:
        image = image[:, ::-1]
    if col_sign < 0:
        image = image[::-1, :]
    return np.ascontiguousarray(image)


def _axis(cosines: npt.NDArray[np.float64]) -> tuple[int, float]:
    """(axis index, sign) of a direction that lies along one patient axis."""
    axis = int(np.argmax(np.abs(cosines)))
    others = np.delete(cosines, axis)
    if abs(abs(float(cosines[axis])) - 1.0) > 1e-3 or np.any(np.abs(others) > 1e-3):
        raise ValueError(f"direction {cosines.tolist()} does not lie along x, y or z")
    return axis, float(np.sign(cosines[axis]))
