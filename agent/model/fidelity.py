"""The one fidelity metric: PSNR and SSIM as the guard, ``bench`` and the model recipes
compute them.

* data range L = max(reference) - min(0, min(reference)) over the whole reference set (1.0
  when that is not positive);
* PSNR = 10 log10(L^2 / MSE), infinite for identical outputs;
* the guard's figure is the worst of the pooled PSNR and every per-input PSNR;
* SSIM (Wang et al. 2004): Gaussian window 11 x 11, sigma 1.5, K1 = 0.01, K2 = 0.03,
  zero padding, computed per pixel over the last two axes.
"""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt

Floats = npt.NDArray[np.float64]


def data_range(reference: npt.NDArray[np.floating]) -> float:
    """L for a reference set (see the module docstring)."""
    ref = np.asarray(reference, np.float64)
    value = float(ref.max() - min(0.0, float(ref.min())))
    return value if math.isfinite(value) and value > 0 else 1.0


def psnr_from_mse(mse: float, data_range: float) -> float:
    return math.inf if mse == 0 else 10.0 * math.log10(data_range**2 / mse)


def psnr(pred: npt.ArrayLike, ref: npt.ArrayLike, data_range: float,
         mask: npt.NDArray[np.bool_] | None = None) -> float:
    """PSNR in dB with the MSE pooled over ``mask`` (all values if None)."""
    err = (np.asarray(pred, np.float64) - np.asarray(ref, np.float64)) ** 2
    return psnr_from_mse(float(err[mask].mean() if mask is not None else err.mean()),
                         data_range)


def worst_psnr(outputs: Floats, reference: Floats, data_range: float) -> tuple[float, float]:
    """(pooled, worst of pooled and per input) PSNR of outputs [N, ...] vs the reference."""
    err = np.asarray(outputs, np.float64) - np.asarray(reference, np.float64)
    pooled = psnr_from_mse(float(np.mean(err**2)), data_range)
    per_input = [psnr_from_mse(float(np.mean(err[i] ** 2)), data_range) for i in range(len(err))]
    return pooled, min(pooled, *per_input)


def _gaussian_kernel(size: int = 11, sigma: float = 1.5) -> Floats:
    x = np.arange(size, dtype=np.float64) - (size - 1) / 2
    kernel: Floats = np.exp(-(x**2) / (2 * sigma**2))
    return kernel / float(kernel.sum())


def _blur(image: Floats, kernel: Floats) -> Floats:
    """Separable 'same' convolution with zero padding over the last two axes."""
    pad = len(kernel) // 2
    out = image
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


def ssim_map(pred: npt.ArrayLike, ref: npt.ArrayLike, data_range: float) -> Floats:
    """Per-pixel SSIM of images or stacks [..., H, W]."""
    k = _gaussian_kernel()
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    x, y = np.asarray(pred, np.float64), np.asarray(ref, np.float64)
    mx, my = _blur(x, k), _blur(y, k)
    sxx = _blur(x * x, k) - mx * mx
    syy = _blur(y * y, k) - my * my
    sxy = _blur(x * y, k) - mx * my
    num = (2 * mx * my + c1) * (2 * sxy + c2)
    den = (mx * mx + my * my + c1) * (sxx + syy + c2)
    out: Floats = num / den
    return out


def ssim(pred: npt.ArrayLike, ref: npt.ArrayLike, data_range: float,
         mask: npt.NDArray[np.bool_] | None = None) -> float:
    """Mean SSIM over ``mask`` (all pixels if None)."""
    m = ssim_map(pred, ref, data_range)
    return float(m[mask].mean() if mask is not None else m.mean())
