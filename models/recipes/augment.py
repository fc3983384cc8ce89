"""Training batches: geometric and intensity augmentation of full slices, then the
contract normalisation, then random crops (the U-Net is fully convolutional).

Geometry (flips, 90-degree turns, small rotations/scaling) is applied to input and target
alike; intensity changes (global scale, smooth bias field, Rician noise) to the T1 input
only, before normalisation, as a scanner would produce them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from recipes.normalise import robust_max_torch


@dataclass(frozen=True)
class AugmentConfig:
    crop: int = 128
    turns: bool = True  # random 90-degree turns (all 8 in-plane orientations with flips)
    max_rotation_deg: float = 10.0
    scale_range: tuple[float, float] = (0.9, 1.1)
    p_affine: float = 0.7
    intensity_range: tuple[float, float] = (0.7, 1.3)
    bias_strength: float = 0.2  # max log-amplitude of the smooth multiplicative field
    p_bias: float = 0.6
    max_noise: float = 0.02  # Rician noise sigma as a fraction of the slice maximum
    p_noise: float = 0.5


class BatchSampler:
    """Draws augmented (input, target) crops from paired slices: ``t1`` [N, C, H, W] (C = 1
    for 2D, 2k + 1 neighbouring slices for 2.5D; [N, H, W] is taken as C = 1), ``t2``
    [N, H, W] (the centre slice's target)."""

    def __init__(
        self,
        t1: np.ndarray,
        t2: np.ndarray,
        cfg: AugmentConfig,
        generator: torch.Generator,
    ) -> None:
        t1 = t1[:, None] if t1.ndim == 3 else t1
        self.t1 = torch.from_numpy(np.ascontiguousarray(t1, dtype=np.float32))
        self.t2 = torch.from_numpy(np.ascontiguousarray(t2, dtype=np.float32))
        self.cfg = cfg
        self.gen = generator
        # Slices with more brain are drawn more often (sqrt keeps small ones in play).
        area = (self.t1[:, self.t1.shape[1] // 2] > 0).flatten(1).sum(1).float()
        self.weights = area.sqrt() / area.sqrt().sum()

    def _uniform(self, n: int, low: float, high: float) -> torch.Tensor:
        return low + (high - low) * torch.rand(n, generator=self.gen)

    def _geometry(self, pair: torch.Tensor) -> torch.Tensor:
        """pair: [N, C + 1, H, W]; random dihedral turn + small rotation/scale per sample."""
        n = pair.shape[0]
        out = []
        for i in range(n):
            p = pair[i]
            k = int(torch.randint(4, (1,), generator=self.gen))
            if self.cfg.turns:
                p = torch.rot90(p, k, dims=(1, 2))
            if torch.rand(1, generator=self.gen) < 0.5:
                p = torch.flip(p, dims=(2,))
            if not self.cfg.turns and torch.rand(1, generator=self.gen) < 0.5:
                p = torch.flip(p, dims=(1,))
            out.append(p)
        pair = torch.stack(out)
        cfg = self.cfg
        angle = self._uniform(n, -cfg.max_rotation_deg, cfg.max_rotation_deg) * math.pi / 180
        scale = self._uniform(n, *cfg.scale_range)
        use = torch.rand(n, generator=self.gen) < cfg.p_affine
        angle = torch.where(use, angle, torch.zeros_like(angle))
        scale = torch.where(use, scale, torch.ones_like(scale))
        cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
        theta = torch.zeros(n, 2, 3)
        theta[:, 0, 0], theta[:, 0, 1], theta[:, 1, 0], theta[:, 1, 1] = cos, -sin, sin, cos
        grid = F.affine_grid(theta, list(pair.shape), align_corners=False)
        warped = F.grid_sample(
            pair, grid, mode="bilinear", padding_mode="zeros", align_corners=False
        )
        # Identity samples keep their exact pixels (no resampling blur).
        return torch.where(use[:, None, None, None], warped, pair)

    def _bias_field(self, n: int, h: int, w: int) -> torch.Tensor:
        """Smooth multiplicative field exp(quadratic polynomial in x, y)."""
        y = torch.linspace(-1, 1, h)[:, None]
        x = torch.linspace(-1, 1, w)[None, :]
        terms = [x, y, x * y, x**2 - 1 / 3, y**2 - 1 / 3]
        basis = torch.stack([t.expand(h, w) for t in terms])
        coeff = self._uniform(n * 5, -1, 1).reshape(n, 5, 1, 1)
        log_field = (coeff * basis).sum(1, keepdim=True)
        log_field = log_field / log_field.abs().amax(dim=(2, 3), keepdim=True).clamp_min(1e-6)
        strength = self._uniform(n, 0, self.cfg.bias_strength)[:, None, None, None]
        use = (torch.rand(n, generator=self.gen) < self.cfg.p_bias)[:, None, None, None]
        return torch.where(use, torch.exp(strength * log_field), torch.ones_like(log_field))

    def _intensity(self, t1: torch.Tensor) -> torch.Tensor:
        n, _, h, w = t1.shape
        cfg = self.cfg
        t1 = t1 * self._uniform(n, *cfg.intensity_range)[:, None, None, None]
        t1 = t1 * self._bias_field(n, h, w)
        sigma = self._uniform(n, 0, cfg.max_noise) * t1.flatten(1).amax(1)
        use = torch.rand(n, generator=self.gen) < cfg.p_noise
        sigma = torch.where(use, sigma, torch.zeros_like(sigma))[:, None, None, None]
        real = t1 + sigma * torch.randn(t1.shape, generator=self.gen)
        imag = sigma * torch.randn(t1.shape, generator=self.gen)
        return torch.sqrt(real**2 + imag**2)

    def _crop(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Random crops centred near a random brain pixel of each slice."""
        c = self.cfg.crop
        n, _, h, w = x.shape
        xs, ys = [], []
        for i in range(n):
            brain = torch.nonzero(y[i, 0] > 0)
            if len(brain):
                r, col = brain[int(torch.randint(len(brain), (1,), generator=self.gen))].tolist()
            else:
                r, col = h // 2, w // 2
            r0 = min(max(r - c // 2, 0), h - c)
            c0 = min(max(col - c // 2, 0), w - c)
            xs.append(x[i, :, r0 : r0 + c, c0 : c0 + c])
            ys.append(y[i, :, r0 : r0 + c, c0 : c0 + c])
        return torch.stack(xs), torch.stack(ys)

    def sample(self, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One augmented batch: normalised input crops [B, C, c, c] and target crops
        [B, 1, c, c]."""
        idx = torch.multinomial(self.weights, batch, replacement=True, generator=self.gen)
        pair = torch.cat([self.t1[idx], self.t2[idx][:, None]], dim=1)
        pair = self._geometry(pair)
        t1 = pair[:, :-1].clamp_min(0)
        t2 = pair[:, -1:].clamp_min(0)
        x = robust_max_torch(self._intensity(t1))
        return self._crop(x, t2)
