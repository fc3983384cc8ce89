"""Image quality metrics on the target scale: PSNR, SSIM (numpy), MAE.

Conventions used in the model card:
- data range L = maximum of the reference over the evaluated set (1.0 = CSF here);
- "brain region" = pixels where the T1 input or the T2 reference is non-zero (the MNI
  template is skull-stripped, so this is the head support, background excluded);
- SSIM: Gaussian window 11 x 11, sigma 1.5, K1 = 0.01, K2 = 0.03, map computed on the full
  slice and averaged over the region.
"""

from __future__ import annotations

import numpy as np


def psnr(
    pred: np.ndarray, ref: np.ndarray, data_range: float, mask: np.ndarray | None = None
) -> float:
    """Peak signal-to-noise ratio in dB; MSE pooled over ``mask`` (all pixels if None)."""
    err = (np.asarray(pred, np.float64) - np.asarray(ref, np.float64)) ** 2
    mse = float(err[mask].mean() if mask is not None else err.mean())
    if mse == 0:
        return float("inf")
    return float(10.0 * np.log10(data_range**2 / mse))


def mae(pred: np.ndarray, ref: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Mean absolute error on the target scale."""
    err = np.abs(np.asarray(pred, np.float64) - np.asarray(ref, np.float64))
    return float(err[mask].mean() if mask is not None else err.mean())


def _gaussian_kernel(size: int = 11, sigma: float = 1.5) -> np.ndarray:
    x = np.arange(size, dtype=np.float64) - (size - 1) / 2
    k: np.ndarray = np.exp(-(x**2) / (2 * sigma**2))
    return k / float(k.sum())


def _blur(image: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """Separable 'same' convolution with zero padding, over the last two axes."""
    pad = len(kernel) // 2
    out = np.asarray(image, np.float64)
    for axis in (-2, -1):
        widths = [(0, 0)] * out.ndim
        widths[axis] = (pad, pad)
        padded = np.pad(out, widths)
        n = out.shape[axis]
        acc = np.zeros_like(out)
        for j, w in enumerate(kernel):
            acc += w * np.take(padded, np.arange(j, j + n), axis=axis)
        out = acc
    return out


def ssim_map(pred: np.ndarray, ref: np.ndarray, data_range: float) -> np.ndarray:
    """Per-pixel SSIM (Wang et al. 2004) of 2D images or stacks [..., H, W]."""
    k = _gaussian_kernel()
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    x, y = np.asarray(pred, np.float64), np.asarray(ref, np.float64)
    mx, my = _blur(x, k), _blur(y, k)
    sxx = _blur(x * x, k) - mx * mx
    syy = _blur(y * y, k) - my * my
    sxy = _blur(x * y, k) - mx * my
    num = (2 * mx * my + c1) * (2 * sxy + c2)
    den = (mx * mx + my * my + c1) * (sxx + syy + c2)
    out: np.ndarray = num / den
    return out


def ssim(
    pred: np.ndarray, ref: np.ndarray, data_range: float, mask: np.ndarray | None = None
) -> float:
    """Mean SSIM over ``mask`` (all pixels if None)."""
    m = ssim_map(pred, ref, data_range)
    return float(m[mask].mean() if mask is not None else m.mean())
