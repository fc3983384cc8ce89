"""The fixture the quantize tests share: DICOMs to calibrate on."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.demo.sample_series import build_series, load_demo_slab


@pytest.fixture(scope="module")
def dicoms(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The MNI slab as 24 DICOM files, plus two that are not usable."""
    root = tmp_path_factory.mktemp("dicoms")
    slab = load_demo_slab()
    series = build_series(slab.t1, spacing_mm=slab.spacing_mm,
                          first_slice_z_mm=slab.first_slice_z_mm)
    for i, payload in enumerate(series):
        (root / f"IM{i:04d}.dcm").write_bytes(payload)
    (root / "notes.txt").write_text("not a DICOM file")
    (root / "IM9999.dcm").write_bytes(series[0][:600])  # truncated: header, no pixels
    return root
