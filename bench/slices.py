"""The scans of the end-to-end benchmark: the packaged MNI152 slab as DICOM series at two
matrices, 256 x 256 at 1.0 mm and 320 x 320 at 0.8 mm (the same field of view, so the agent
resamples the second to the model's 1 mm grid and back), and the model inputs of the raw
backend phase."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from agent.demo.sample_series import build_series, load_demo_slab
from agent.model.bundle import ModelBundle
from agent.model.preprocess import normalise, to_model_grid


@dataclass(frozen=True)
class Volume:
    """One slab at one matrix."""

    t1: np.ndarray  # uint16 [slices, rows, cols]
    spacing_mm: tuple[float, float, float]  # (slice, row, col)

    @property
    def matrix(self) -> int:
        return int(self.t1.shape[-1])


def volumes(matrices: tuple[int, ...] = (256, 320)) -> list[Volume]:
    """The demo slab resampled in-plane (bilinear) to each matrix over its field of view."""
    slab = load_demo_slab()
    dz, dy, dx = slab.spacing_mm
    out = []
    for m in matrices:
        zy, zx = m / slab.t1.shape[1], m / slab.t1.shape[2]
        t1 = slab.t1 if (zy, zx) == (1.0, 1.0) else np.clip(
            ndimage.zoom(slab.t1.astype(np.float32), (1.0, zy, zx), order=1), 0, 65535)
        out.append(Volume(np.round(t1).astype(np.uint16), (dz, dy / zy, dx / zx)))
    return out


def payloads(vols: list[Volume], count: int) -> list[bytes]:
    """``count`` Part-10 instances, whole series taking turns between the matrices, every
    instance with fresh UIDs (so no result is a duplicate of an earlier round's)."""
    out: list[bytes] = []
    turn = 0
    while len(out) < count:
        vol = vols[turn % len(vols)]
        out += build_series(vol.t1, spacing_mm=vol.spacing_mm)
        turn += 1
    return out[:count]


def model_inputs(vols: list[Volume], bundle: ModelBundle) -> list[np.ndarray]:
    """What the agent feeds the model for every slice of ``vols`` (batch of one), built with
    the agent's own preprocessing; a 2.5D model gets each slice with its neighbours."""
    inputs = []
    k = bundle.input.context_slices
    for vol in vols:
        grids = [to_model_grid(sl.astype(np.float32), vol.spacing_mm[1:], bundle.input)[0]
                 for sl in vol.t1]
        for i in range(len(grids)):
            stack = np.stack([grids[min(max(i + d, 0), len(grids) - 1)]
                              for d in range(-k, k + 1)])
            inputs.append(normalise(stack, bundle.input.normalisation)[None])
    return inputs
