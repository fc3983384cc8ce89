"""Training loss: L1 plus an SSIM term (same window as recipes.metrics: Gaussian 11 x 11,
sigma 1.5), on the target scale."""

from __future__ import annotations

import torch
import torch.nn.functional as F

DATA_RANGE = 1.0  # target scale: CSF == 1.0


def _gaussian(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float32) - (size - 1) / 2
    k = torch.exp(-(x**2) / (2 * sigma**2))
    return k / k.sum()


_KERNEL = _gaussian()


def _blur(x: torch.Tensor) -> torch.Tensor:
    k = _KERNEL.to(x.dtype)
    pad = len(k) // 2
    x = F.conv2d(x, k.view(1, 1, 1, -1), padding=(0, pad))
    return F.conv2d(x, k.view(1, 1, -1, 1), padding=(pad, 0))


def ssim(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean SSIM of [N, 1, H, W] batches."""
    c1, c2 = (0.01 * DATA_RANGE) ** 2, (0.03 * DATA_RANGE) ** 2
    mx, my = _blur(pred), _blur(target)
    sxx = _blur(pred * pred) - mx * mx
    syy = _blur(target * target) - my * my
    sxy = _blur(pred * target) - mx * my
    num = (2 * mx * my + c1) * (2 * sxy + c2)
    den = (mx * mx + my * my + c1) * (sxx + syy + c2)
    return (num / den).mean()


def l1_ssim_loss(pred: torch.Tensor, target: torch.Tensor, ssim_weight: float,
                 mse_weight: float = 0.0) -> torch.Tensor:
    """(1 - w) * L1 + w * (1 - SSIM), plus ``mse_weight`` * MSE where it is set (the
    held-out score is a PSNR: where the target is only partly predictable, as on the brain's
    rim, L1 trains the conditional median and MSE the mean, which the PSNR rewards)."""
    loss = F.l1_loss(pred, target)
    if ssim_weight:
        loss = (1 - ssim_weight) * loss + ssim_weight * (1 - ssim(pred, target))
    if mse_weight:
        loss = loss + mse_weight * F.mse_loss(pred, target)
    return loss
