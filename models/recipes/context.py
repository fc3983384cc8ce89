"""2.5D context: each slice with its neighbours along the slice axis as input channels."""

from __future__ import annotations

import numpy as np


def context_stack(slices: np.ndarray, idx: np.ndarray, k: int) -> np.ndarray:
    """[len(idx), 2k + 1, H, W] from [Z, H, W] slices: slice ``idx[i]`` with ``k`` neighbours
    each side, in slice order. Past either end of the volume the edge slice repeats, which
    is how the agent pads the first and last slices of a series."""
    offsets = np.arange(-k, k + 1)
    z = np.clip(np.asarray(idx)[:, None] + offsets[None, :], 0, len(slices) - 1)
    stack: np.ndarray = slices[z]
    return stack


def model_inputs(t1_slices: np.ndarray, idx: np.ndarray, k: int) -> np.ndarray:
    """Normalised model inputs [len(idx), 2k + 1, H, W] float32 for slices ``idx``: each
    stack normalised by its centre slice, as the agent does."""
    from recipes.normalise import robust_max_np

    stacks = context_stack(t1_slices, idx, k)
    return np.stack([robust_max_np(s) for s in stacks]).astype(np.float32)
