"""Image quality metrics on the target scale: PSNR and SSIM (the agent's own,
``agent.model.fidelity``), MAE.

Conventions used in the model card:
- data range L = maximum of the reference over the evaluated set (1.0 = CSF here);
- "brain region" = pixels where the T1 input or the T2 reference is non-zero (the MNI
  template is skull-stripped, so this is the head support, background excluded);
- SSIM: Gaussian window 11 x 11, sigma 1.5, K1 = 0.01, K2 = 0.03, map computed on the full
  slice and averaged over the region.
"""

from __future__ import annotations

import numpy as np

from agent.model.fidelity import psnr, ssim, ssim_map

__all__ = ["mae", "psnr", "ssim", "ssim_map"]


def mae(pred: np.ndarray, ref: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Mean absolute error on the target scale."""
    err = np.abs(np.asarray(pred, np.float64) - np.asarray(ref, np.float64))
    return float(err[mask].mean() if mask is not None else err.mean())
