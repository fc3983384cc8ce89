"""The input normalisation of the bundle contract (``robust_max``), in numpy and torch.

model input = slice / percentile(slice[slice > 0], 99.5), clipped to [0, 1.5];
an all-zero slice stays all zeros. A 2.5D stack of neighbouring slices is divided by the
percentile of its centre slice, so that the neighbours keep their intensities relative to
it. The agent applies exactly this before inference (``agent.model.preprocess.normalise``).
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
    """Normalise one 2D slice, or a [C, H, W] stack by its centre slice, to float32."""
    image = np.asarray(image, dtype=np.float32)
    centre = image[image.shape[0] // 2] if image.ndim == 3 else image
    positive = centre[centre > 0]
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
    """Normalise each item of an [N, C, H, W] batch independently by its centre channel
    (training path)."""
    out = torch.zeros_like(batch)
    middle = batch.shape[1] // 2
    for i in range(batch.shape[0]):
        centre = batch[i, middle]
        positive = centre[centre > 0]
        if positive.numel() == 0:
            continue
        # np.percentile's default ('linear') equals torch.quantile's default interpolation.
        ref = torch.quantile(positive, percentile / 100.0)
        if ref > 0:
            out[i] = (batch[i] / ref).clamp(0.0, clip_max)
    return out
