"""Paired training data: the MNI152 2009 T1 template and a simulated T2-weighted partner.

The T2-weighted image is SIMULATED from the template's tissue probability maps with the
spin-echo signal equation ``S = PD * (1 - exp(-TR/T1)) * exp(-TE/T2)`` and BrainWeb 1.5 T
tissue parameters, mixing the tissue signals by their probabilities (as BrainWeb does).
CSF probability = brain mask - GM - WM, clipped at 0. The T2 image is divided by the pure
CSF signal (one global constant), so CSF == 1.0.

Output (``build/data.npz``): every axial slice of the template, zero-padded (centred) from
197 x 233 to 256 x 256 at 1 mm. Array axes per slice: rows = MNI x (left -> right),
columns = MNI y (posterior -> anterior).
"""

from __future__ import annotations

import time

import numpy as np
from nilearn import datasets

from recipes import config
from recipes.timing import record_timing


def spin_echo_signal(tissue: config.Tissue, tr_ms: float, te_ms: float) -> float:
    """Spin-echo signal of a pure tissue (arbitrary units)."""
    return float(tissue.pd * (1.0 - np.exp(-tr_ms / tissue.t1_ms)) * np.exp(-te_ms / tissue.t2_ms))


def tissue_signals_relative_to_csf() -> dict[str, float]:
    """T2-weighted signal of each tissue on the target scale (CSF == 1.0)."""
    raw = {
        name: spin_echo_signal(t, config.TR_MS, config.TE_MS) for name, t in config.TISSUES.items()
    }
    return {name: s / raw["csf"] for name, s in raw.items()}


def simulate_t2(gm: np.ndarray, wm: np.ndarray, brain: np.ndarray) -> np.ndarray:
    """Mix tissue signals by their probabilities; returns the T2 volume (CSF == 1.0)."""
    csf = np.clip(brain - gm - wm, 0.0, None)
    s = tissue_signals_relative_to_csf()
    t2: np.ndarray = (s["gm"] * gm + s["wm"] * wm + s["csf"] * csf).astype(np.float32)
    return t2


def pad_offsets(shape: tuple[int, int], grid: int = config.GRID) -> tuple[int, int]:
    """Rows/columns of zero padding before the data when centring ``shape`` in the grid."""
    return (grid - shape[0]) // 2, (grid - shape[1]) // 2


def to_axial_slices(volume: np.ndarray, grid: int = config.GRID) -> np.ndarray:
    """[X, Y, Z] volume -> [Z, grid, grid] float32 axial slices, zero-padded, centred."""
    nx, ny, nz = volume.shape
    r0, c0 = pad_offsets((nx, ny), grid)
    out = np.zeros((nz, grid, grid), dtype=np.float32)
    out[:, r0 : r0 + nx, c0 : c0 + ny] = np.moveaxis(volume, 2, 0)
    return out


def split_indices(brain_pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(train, holdout) slice indices. The holdout slab and its gaps never reach training."""
    first, last = config.HOLDOUT_FIRST, config.HOLDOUT_FIRST + config.HOLDOUT_COUNT
    holdout = np.arange(first, last)
    excluded = np.arange(first - config.HOLDOUT_GAP, last + config.HOLDOUT_GAP)
    candidates = np.flatnonzero(brain_pixels >= config.MIN_BRAIN_PIXELS)
    train = np.setdiff1d(candidates, excluded)
    return train, holdout


def main() -> None:
    start = time.perf_counter()
    t1_img = datasets.load_mni152_template(resolution=1)
    t1 = t1_img.get_fdata(dtype=np.float32)
    gm = datasets.load_mni152_gm_template(resolution=1).get_fdata(dtype=np.float32)
    wm = datasets.load_mni152_wm_template(resolution=1).get_fdata(dtype=np.float32)
    brain = datasets.load_mni152_brain_mask(resolution=1).get_fdata(dtype=np.float32)
    t2 = simulate_t2(gm, wm, brain)

    t1_slices = to_axial_slices(t1)
    t2_slices = to_axial_slices(t2)
    region = (t1_slices > 0) | (t2_slices > 0)
    train, holdout = split_indices(region.sum(axis=(1, 2)))
    affine = np.asarray(t1_img.affine, dtype=np.float64)
    z_mm = affine[2, 3] + affine[2, 2] * np.arange(t1.shape[2], dtype=np.float64)

    config.BUILD_DIR.mkdir(parents=True, exist_ok=True)
    np.savez(
        config.DATA_NPZ,
        t1=t1_slices,
        t2=t2_slices,
        region=region,
        z_mm=z_mm,
        train_idx=train,
        holdout_idx=holdout,
        pad=np.array(pad_offsets(t1.shape[:2]), dtype=np.int64),
        volume_shape=np.array(t1.shape, dtype=np.int64),
        affine=affine,
    )
    signals = tissue_signals_relative_to_csf()
    print(
        f"simulated T2 (CSF=1): GM={signals['gm']:.3f} WM={signals['wm']:.3f}; "
        f"{len(train)} training slices, holdout z index {holdout[0]}..{holdout[-1]} "
        f"(MNI z {z_mm[holdout[0]]:+.0f}..{z_mm[holdout[-1]]:+.0f} mm)"
    )
    record_timing("simulate", time.perf_counter() - start)


if __name__ == "__main__":
    main()
