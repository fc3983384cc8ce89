"""The input normalisation of the bundle contract (``robust_max``), in numpy and torch.

model input = slice / percentile(slice[slice > 0], 99.5), clipped to [0, 1.5];
an all-zero slice stays all zeros. The agent applies exactly this before inference.
"""

from __future__ import annotations

import numpy as np
import torch

from recipes import config


def robust_max_np(
    image: np.ndarray,
    percentile: float = config.NORM_PERCENTILE,
    clip_max: float = config.NORM_CLIP_MAX,
) -> np.ndarray:
    """Normalise one 2D slice (any dtype) to float32 model input."""
    image = np.asarray(image, dtype=np.float32)
    positive = image[image > 0]
    if positive.size == 0:
        return np.zeros_like(image, dtype=np.float32)
    ref = float(np.percentile(positive, percentile))
    if ref <= 0:
        return np.zeros_like(image, dtype=np.float32)
    return np.clip(image / ref, 0.0, clip_max).astype(np.float32)


def robust_max_torch(
    batch: torch.Tensor,
    percentile: float = config.NORM_PERCENTILE,
    clip_max: float = config.NORM_CLIP_MAX,
) -> torch.Tensor:
    """Normalise each slice of an [N, 1, H, W] batch independently (training path)."""
    out = torch.zeros_like(batch)
    for i in range(batch.shape[0]):
        positive = batch[i][batch[i] > 0]
        if positive.numel() == 0:
            continue
        # np.percentile's default ('linear') equals torch.quantile's default interpolation.
        ref = torch.quantile(positive, percentile / 100.0)
        if ref > 0:
            out[i] = (batch[i] / ref).clamp(0.0, clip_max)
    return out
