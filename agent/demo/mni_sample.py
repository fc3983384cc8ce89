"""The packaged MNI152 slab as a sample T1w series whose header says where each voxel is.

The slab (``agent/samples/mni152_t1w_slab.npz``, made by ``models/recipes/sample.py``)
holds axial slices of the MNI ICBM152 2009a template as the reference models were trained
on them: ``[slice, row, col]`` with rows along MNI x (the patient's left to right) and
columns along MNI y (posterior to anterior), each slice 197 x 233 zero-padded to 256 x 256.

MNI space is RAS (x to the patient's right, y anterior, z superior); DICOM patient
coordinates are LPS (x to the left, y posterior, z superior), so x and y change sign.
Seen as an image, a slab slice is a mirror image: rows along +x (RAS) and columns along
+y (RAS) make a slice normal (row cosines x column cosines) that points inferior. A header
that described these pixels as they are would therefore order a series from the top of
the head down, and a 2.5D model would get its neighbours the other way round from how it
was trained (inferior to superior; measured on the held-out slab: -0.14 dB for
t1w-to-t2w-full). Instead the series stores each slice flipped top to bottom, a flip the
models were trained with ("random flips of both axes" in their model cards; -0.02 to +0.03
dB measured), so that rows run from the patient's right to left (+x LPS), columns from
posterior to anterior (-y LPS), and the normal points superior as a scanner's axial series
does. ImageOrientationPatient is then ``STORED_ORIENTATION`` = (0, -1, 0, 1, 0, 0). A
viewer shows the slice turned 90 degrees (anterior to the right) with the right labels;
``agent.demo.display.radiological`` turns it upright. Turning the pixels themselves into the
usual axial layout (anterior up) would show the models an orientation they never saw in
training (-1.5 dB measured), so the pixels keep their trained orientation.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import numpy as np

from agent.demo.sample_series import DemoSlab, build_series, load_demo_slab

# The slab's voxel grid in MNI space (RAS, mm), as nilearn's
# mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz declares it (sform: unit spacing,
# origin (-98, -134, -72) mm) with the slab's padding of 29 rows and 11 columns.
TEMPLATE_ORIGIN_MM = (-98.0, -134.0, -72.0)
SLAB_PADDING = (29, 11)  # (rows, columns) of zeros before the template's first voxel
STORED_ORIENTATION = (0.0, -1.0, 0.0, 1.0, 0.0, 0.0)
SAMPLE_DESCRIPTION = "T1w 3D axial (MNI152 template)"


def slab_to_mni(slab: DemoSlab, index: int, row: float, col: float) -> tuple[float, float, float]:
    """MNI (RAS, mm) position of slab voxel ``[index, row, col]`` (slab array indices)."""
    dz, dy, dx = slab.spacing_mm
    x = TEMPLATE_ORIGIN_MM[0] + (row - SLAB_PADDING[0]) * dy
    y = TEMPLATE_ORIGIN_MM[1] + (col - SLAB_PADDING[1]) * dx
    return x, y, slab.first_slice_z_mm + index * dz


def as_stored(slab_array: np.ndarray) -> np.ndarray:
    """A slab array ``[slices, rows, cols]`` as the sample series stores its pixels."""
    return np.ascontiguousarray(np.asarray(slab_array)[:, ::-1, :])


def notice() -> str:
    """The template's copyright notice (its licence asks for it in all copies)."""
    text = resources.files("agent").joinpath("samples", "NOTICE.txt").read_text("utf-8")
    marker = "distributed under this notice:"
    licence = text.split(marker, 1)[1] if marker in text else text
    return ("Derived from the MNI ICBM152 2009a template (a sample, not for diagnostic use). "
            + " ".join(licence.split()))


def sample_series(count: int | None = None, slab: DemoSlab | None = None) -> list[bytes]:
    """The first ``count`` slices (default: all) of the packaged slab as a T1w series:
    Part-10 instances in slice order, inferior to superior, fresh UIDs."""
    slab = slab or load_demo_slab()
    n = slab.t1.shape[0] if count is None else count
    if not 1 <= n <= slab.t1.shape[0]:
        raise ValueError(f"count must be 1 to {slab.t1.shape[0]}, got {n}")
    rows = slab.t1.shape[1]
    last_row_x, first_col_y, _ = slab_to_mni(slab, 0, rows - 1, 0)
    return build_series(
        as_stored(slab.t1[:n]),
        spacing_mm=slab.spacing_mm,
        first_slice_z_mm=slab.first_slice_z_mm,
        series_description=SAMPLE_DESCRIPTION,
        orientation=STORED_ORIENTATION,
        first_pixel_mm=(-last_row_x, -first_col_y),  # stored row 0 is slab row rows - 1
        image_comments=notice(),
    )


def write_sample(directory: Path, count: int | None = None) -> list[Path]:
    """Write the sample series as ``DIR/slice001.dcm``... (the directory may exist but
    must hold no files, so that ``send DIR`` sends just this series)."""
    if directory.exists() and (not directory.is_dir() or any(directory.iterdir())):
        raise FileExistsError(f"{directory} exists and is not an empty directory")
    payloads = sample_series(count)
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, payload in enumerate(payloads, start=1):
        path = directory / f"slice{i:03d}.dcm"
        path.write_bytes(payload)
        paths.append(path)
    return paths
