"""Domain-shift score: how far one input slice (and what the model made of it) lies from the
inputs the model was built on.

The bundle's domain reference (``domain.json``, ``agent.model.domain_reference``) holds the
mean and spread of a few cheap statistics over the training inputs, and a threshold set on
held-out in-distribution slices. Per slice the agent computes the same statistics and their
Mahalanobis distance to the reference; the **score** is that distance divided by the
threshold, so a score >= 1.0 is outside what the reference calls in distribution.

The statistics (``FEATURES``), all on the normalised model input (the same numbers the
model sees) inside the body (input > ``BODY_LEVEL``), on every second row and column:

* ``q10`` .. ``q90``: quantiles of the body intensities (from a 30-bin histogram);
* ``hist_w1``: Wasserstein-1 distance of the body histogram to the reference histogram;
* ``edge``: mean absolute difference of horizontal neighbours in the body, over the median
  (blur lowers it, noise raises it);
* ``hf``: mean absolute second difference in the body, over the median (noise);
* ``sharp``: mean absolute difference of neighbours over that of pixels two apart (about
  0.5 for a smooth image, 1 for white noise: blur, a coarser matrix, noise, independent of
  the anatomy's contrast); bimodal in the training data (with and without noise), so its
  spread is its whole standard deviation, like ``air``'s;
* ``sharp24``: the same one octave lower, mean absolute difference of pixels two apart over
  that of pixels four apart, the larger of the horizontal and the vertical one (blur along
  either axis and a coarser matrix lower it, and noise moves it less than ``sharp``);
* ``air``: the share of the pixels outside the body that are not black (noise floor, a
  vendor window that lifts the background);
* ``tilt``: the length of the vector of the log ratios of the mean body intensity of the
  two halves, left to right and top to bottom (a bias field beyond the training's; the
  length, because the training turns and flips the slices, so either ratio alone is a
  mixture of orientations rather than a property of the input);
* ``out_q25`` .. ``out_q75``: quantiles of the model's own output in the body, a cheap
  proxy of its features (a wrong contrast gives an output histogram it never produced).

A slice with too little body (under ``MIN_BODY_SHARE`` of the subsampled grid: 1500 pixels
of a 256 x 256 grid's 128 x 128) is not scored. The score
warns about the *input*; it is no measure of the output's error (see docs/bundle.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

FEATURES = ("q10", "q25", "q50", "q75", "q90", "hist_w1", "edge", "hf", "sharp", "sharp24",
            "air", "tilt", "out_q25", "out_q50", "out_q75")  # fmt: skip
BIMODAL = tuple(name in ("air", "sharp") for name in FEATURES)
QUANTILES = (0.10, 0.25, 0.50, 0.75, 0.90)
OUTPUT_QUANTILES = (0.25, 0.50, 0.75)
BODY_LEVEL = 0.1  # normalised input: 1.0 is the 99.5th percentile of the slice
AIR_LEVEL = 0.005
HIST_BINS = 30
HIST_MAX = 1.5  # the contract's clip maximum: the histogram covers [0, 1.5]
MIN_BODY_SHARE = 1500 / 16384  # of the subsampled grid: 1500 of 128 x 128 (a 256 x 256 grid)
STRIDE = 2

_BIN_WIDTH = HIST_MAX / HIST_BINS
_UPPER_EDGES = np.arange(1, HIST_BINS + 1, dtype=np.float64) * _BIN_WIDTH


def body_histogram(values: npt.NDArray[np.float32]) -> npt.NDArray[np.float64]:
    """The share of ``values`` in each of ``HIST_BINS`` bins over [0, HIST_MAX]."""
    idx = np.minimum((values * np.float32(HIST_BINS / HIST_MAX)).astype(np.intp), HIST_BINS - 1)
    counts = np.bincount(idx, minlength=HIST_BINS)
    return counts / max(int(values.size), 1)


def _quantiles(cdf: npt.NDArray[np.float64], qs: tuple[float, ...]) -> list[float]:
    """Quantiles read off a histogram's cumulative shares (linear within a bin)."""
    bins = np.minimum(np.searchsorted(cdf, qs, side="left"), HIST_BINS - 1).tolist()
    out = []
    for q, i in zip(qs, bins, strict=True):
        below = float(cdf[i - 1]) if i else 0.0
        span = float(cdf[i]) - below
        frac = 0.0 if span <= 0 else (q - below) / span
        out.append(float((i + frac) * _BIN_WIDTH))
    return out


def has_body(x: npt.NDArray[np.float32]) -> bool:
    """Whether a normalised input slice (H, W) has enough body to be scored."""
    sub = x[::STRIDE, ::STRIDE]
    return int(np.count_nonzero(sub > BODY_LEVEL)) >= min_body(sub.size)


def min_body(pixels: int) -> int:
    """The fewest body pixels a subsampled slice of ``pixels`` needs to be scored."""
    return max(16, math.ceil(pixels * MIN_BODY_SHARE - 1e-9))


def slice_features(x: npt.NDArray[np.float32], y: npt.NDArray[np.float32],
                   reference_cdf: npt.NDArray[np.float64]) -> npt.NDArray[np.float64] | None:
    """The ``FEATURES`` of one normalised input slice ``x`` (H, W) and the model's output
    ``y`` (H, W) on the model grid; ``reference_cdf``: the reference histogram's cumulative
    shares. None when the slice has too little body to say anything."""
    rows = x[::STRIDE]  # every second row, full resolution along it (for the differences)
    sub = np.ascontiguousarray(rows[:, ::STRIDE])  # (a copy: each pass below reads it fast)
    body = sub > BODY_LEVEL
    n = int(np.count_nonzero(body))
    if n < min_body(sub.size):
        return None
    hist = body_histogram(sub[body])
    cdf = np.cumsum(hist)
    qs = _quantiles(cdf, QUANTILES)
    median = max(qs[2], 1e-3)
    w1 = float(np.abs(cdf - reference_cdf).sum() * _BIN_WIDTH)
    # Differences along each kept row: d1 = x[i+1] - x[i] at i = 1 .. W-2, so the second
    # difference and the two-apart span come from the same array (no boolean gathers).
    diff = np.diff(rows, axis=1)
    row_body = (rows[:, 1:-1] > BODY_LEVEL).astype(np.float32)
    n_rows = max(float(row_body.sum()), 1.0)
    ahead, behind = diff[:, 1:], diff[:, :-1]
    d1_sum = float(np.vdot(np.abs(ahead), row_body))
    edge = d1_sum / n_rows / median
    hf = float(np.vdot(np.abs(ahead - behind), row_body)) / n_rows / median
    span2 = ahead + behind  # x[i+2] - x[i]
    d2_sum = float(np.vdot(np.abs(span2), row_body))
    sharp = d1_sum / max(d2_sum, 1e-6)
    # One octave lower, two apart over four apart: along the kept rows, and down the columns
    # of the subsampled grid (its rows are two apart).
    h24 = d2_sum / max(float(np.vdot(np.abs(span2[:, :-2] + span2[:, 2:]), row_body[:, :-2])),
                       1e-6)
    col_body = body[:-2].astype(np.float32)
    v24 = float(np.vdot(np.abs(sub[1:-1] - sub[:-2]), col_body)) / max(
        float(np.vdot(np.abs(sub[2:] - sub[:-2]), col_body)), 1e-6)
    masked = np.where(body, sub, np.float32(0))
    tilts = []
    for axis in (0, 1):  # column sums split left | right, then row sums split top | bottom
        sums, counts = masked.sum(axis=axis), np.count_nonzero(body, axis=axis)
        half = sums.size // 2
        mean_a = float(sums[:half].sum()) / max(int(counts[:half].sum()), 1)
        mean_b = float(sums[half:].sum()) / max(int(counts[half:].sum()), 1)
        tilts.append(float(np.log(max(mean_a, 1e-3) / max(mean_b, 1e-3))))
    tilt = math.hypot(*tilts)
    outside = ~body
    n_out = int(np.count_nonzero(outside))
    air = (float(np.count_nonzero((sub > AIR_LEVEL) & outside)) / n_out) if n_out else 0.0
    out = np.asarray(y, dtype=np.float32)[::STRIDE, ::STRIDE][body]
    out_cdf = np.cumsum(body_histogram(np.clip(out, 0.0, None)))
    return np.array([*qs, w1, edge, hf, sharp, max(h24, v24), air, tilt,
                     *_quantiles(out_cdf, OUTPUT_QUANTILES)],
                    dtype=np.float64)


@dataclass(frozen=True)
class Standardiser:
    """The reference's Mahalanobis metric: ``z = (f - mean) / scale``, distance
    ``sqrt(z' P z)`` with ``P`` the inverse of the shrunk correlation matrix."""

    mean: npt.NDArray[np.float64]
    scale: npt.NDArray[np.float64]
    precision: npt.NDArray[np.float64]

    def distance(self, features: npt.NDArray[np.float64]) -> float:
        z = (features - self.mean) / self.scale
        return float(np.sqrt(max(float(z @ self.precision @ z), 0.0)))

    def contributions(self, features: npt.NDArray[np.float64]) -> dict[str, float]:
        """Each feature's z-score (what to look at when a slice is flagged)."""
        z = (features - self.mean) / self.scale
        return {name: round(float(v), 2) for name, v in zip(FEATURES, z, strict=True)}


SHRINKAGE = 0.1  # correlation matrix shrunk towards identity: stable with few slices


def fit_standardiser(features: npt.NDArray[np.float64]) -> Standardiser:
    """The metric of ``features`` (N, len(FEATURES)): robust centre (median), spread
    1.4826 MAD floored at a quarter of the standard deviation (``air`` and ``sharp``, bimodal
    in the training data with and without noise, take their whole standard deviation), and the
    inverse of the shrunk correlation of the standardised values."""
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or f.shape[1] != len(FEATURES) or f.shape[0] < 8:
        raise ValueError(f"need at least 8 rows of {len(FEATURES)} features, got {f.shape}")
    mean = np.median(f, axis=0)
    mad = 1.4826 * np.median(np.abs(f - mean), axis=0)
    spread = f.std(axis=0)
    floor = np.where(np.array(BIMODAL), 1.0, 0.25) * spread
    scale = np.maximum(np.maximum(mad, floor), 1e-4)
    z = np.clip((f - mean) / scale, -10, 10)
    with np.errstate(invalid="ignore", divide="ignore"):  # a constant feature: no correlation
        corr = np.corrcoef(z, rowvar=False)
    corr = np.nan_to_num(corr, nan=0.0)
    np.fill_diagonal(corr, 1.0)
    shrunk = (1 - SHRINKAGE) * corr + SHRINKAGE * np.eye(len(FEATURES))
    return Standardiser(mean, scale, np.linalg.inv(shrunk))
