"""Put a slice on the model's grid and back again (pure numpy).

The model sees a fixed matrix (``InputContract.shape``) at a fixed spacing
(``InputContract.pixel_spacing_mm``). A slice at another spacing is resampled (bilinear)
about its centre, then centre-padded with zeros or centre-cropped to the matrix.
``from_model_grid`` undoes exactly that geometry, so a result lies on the source's own grid
and inherits its position, orientation and spacing unchanged.

Per axis, with ``r = in_spacing / model_spacing`` and ``n = round(in_size * r)`` samples
after resampling, model index ``j`` maps to resampled index ``u = j - offset`` with
``offset = (model_size - n) // 2``, and ``u`` maps to input index
``x = (u - (n - 1) / 2) / r + (in_size - 1) / 2`` (pixel centres, image centres aligned).
Samples that fall more than half a pixel outside the image are zero.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from agent.dicom.quantiles import positive_percentiles
from agent.model.bundle import InputContract, Normalisation

SAME_SPACING_TOLERANCE_MM = 1e-3


@dataclass(frozen=True)
class AxisMap:
    """How one axis of the input maps onto the model grid."""

    in_size: int
    model_size: int
    ratio: float  # input spacing / model spacing; exactly 1.0 when resampling is skipped
    resampled_size: int
    offset: int  # model index = resampled index + offset (negative: cropped)

    def model_to_input(self) -> np.ndarray:
        """Fractional input index of each model-grid sample (length ``model_size``)."""
        u = np.arange(self.model_size, dtype=np.float64) - self.offset
        x = (u - (self.resampled_size - 1) / 2) / self.ratio + (self.in_size - 1) / 2
        outside = (u < -0.5) | (u > self.resampled_size - 0.5)  # padding
        return np.where(outside, np.nan, np.clip(x, 0, self.in_size - 1))

    def input_to_model(self) -> np.ndarray:
        """Fractional model-grid index of each input sample (length ``in_size``)."""
        x = np.arange(self.in_size, dtype=np.float64)
        u = (x - (self.in_size - 1) / 2) * self.ratio + (self.resampled_size - 1) / 2
        # Edge samples take the edge of the resampled image, never the zero padding.
        return np.clip(u, 0, self.resampled_size - 1) + self.offset


@dataclass(frozen=True)
class GridMap:
    """The geometry ``to_model_grid`` applied, for ``from_model_grid`` to invert."""

    rows: AxisMap
    cols: AxisMap
    in_spacing_mm: tuple[float, float]
    model_spacing_mm: tuple[float, float]

    @property
    def in_shape(self) -> tuple[int, int]:
        """(rows, cols) of the input slice."""
        return self.rows.in_size, self.cols.in_size

    @property
    def model_shape(self) -> tuple[int, int]:
        """(rows, cols) of the model grid."""
        return self.rows.model_size, self.cols.model_size


def _axis(in_size: int, in_spacing: float, model_size: int, model_spacing: float) -> AxisMap:
    if not (in_spacing > 0 and model_spacing > 0):
        raise ValueError(f"pixel spacing must be positive (got {in_spacing}, {model_spacing})")
    if abs(in_spacing - model_spacing) <= SAME_SPACING_TOLERANCE_MM:
        ratio, resampled = 1.0, in_size
    else:
        ratio = in_spacing / model_spacing
        resampled = max(1, round(in_size * ratio))
    return AxisMap(in_size, model_size, ratio, resampled, (model_size - resampled) // 2)


@dataclass(frozen=True)
class _Taps:
    """The two input samples and weights of each output sample along one axis."""

    lo: np.ndarray  # intp
    hi: np.ndarray  # intp
    w_lo: np.ndarray  # float32, 0 where the output sample is outside the image
    w_hi: np.ndarray  # float32


@lru_cache(maxsize=64)
def _taps(amap: AxisMap, forward: bool) -> _Taps:
    """Linear-interpolation taps of one axis map (cached: a series repeats its geometry).

    Coordinates within half a pixel of the edge take the edge value; NaN or coordinates
    further out give 0. Integral coordinates reproduce the samples exactly."""
    coords = amap.model_to_input() if forward else amap.input_to_model()
    n = amap.in_size if forward else amap.model_size
    valid = np.isfinite(coords) & (coords >= -0.5) & (coords <= n - 0.5)
    x = np.clip(np.where(valid, coords, 0.0), 0, n - 1)
    lo = np.minimum(np.floor(x).astype(np.intp), max(n - 2, 0))
    hi = np.minimum(lo + 1, n - 1)
    w_hi = (x - lo).astype(np.float32)
    w_lo = (1.0 - w_hi) * valid
    w_hi *= valid
    return _Taps(lo, hi, w_lo.astype(np.float32), w_hi)


def _sample(image: np.ndarray, amap: AxisMap, forward: bool, axis: int) -> np.ndarray:
    """Linear interpolation of ``image`` along ``axis`` (the last or the second to last).

    Each pass gathers the two neighbours of every output sample with ``np.take`` along that
    axis and blends them as ``lo * w_lo + hi * w_hi`` in float32, in that order. (Along the
    last axis numpy 2's ``take`` gathers as fast as a transposed copy would cost, so there
    is no transposing: a 320 x 256 columns pass 0.28 -> 0.2 ms.)"""
    taps = _taps(amap, forward)
    shape = [1] * image.ndim
    shape[axis] = taps.lo.size
    a: np.ndarray = np.take(image, taps.lo, axis=axis)
    a *= taps.w_lo.reshape(shape)
    b = np.take(image, taps.hi, axis=axis)
    b *= taps.w_hi.reshape(shape)
    a += b
    return a


def _shift(image: np.ndarray, axis: int, in_size: int, out_size: int, offset: int) -> np.ndarray:
    """Integer placement: out[j] = image[j - offset], zero outside."""
    out_shape = list(image.shape)
    out_shape[axis] = out_size
    out = np.zeros(out_shape, dtype=np.float32)
    lo, hi = max(0, offset), min(out_size, in_size + offset)
    if hi > lo:
        dst = [slice(None)] * image.ndim
        src = [slice(None)] * image.ndim
        dst[axis], src[axis] = slice(lo, hi), slice(lo - offset, hi - offset)
        out[tuple(dst)] = image[tuple(src)]
    return out


def _forward_axis(image: np.ndarray, amap: AxisMap, axis: int) -> np.ndarray:
    if amap.ratio == 1.0:
        return _shift(image, axis, amap.in_size, amap.model_size, amap.offset)
    return _sample(image, amap, True, axis)


def _inverse_axis(image: np.ndarray, amap: AxisMap, axis: int) -> np.ndarray:
    if amap.ratio == 1.0:
        return _shift(image, axis, amap.model_size, amap.in_size, -amap.offset)
    return _sample(image, amap, False, axis)


def to_model_grid(
    pixels: np.ndarray, spacing_mm: tuple[float, float], contract: InputContract
) -> tuple[np.ndarray, GridMap]:
    """Resample ``pixels`` (rows, cols) from ``spacing_mm`` (row, col) to the contract's
    spacing and centre-pad (zeros) or centre-crop it to ``contract.shape``.

    Leading axes (e.g. a 2.5D stack of neighbouring slices) are carried along. Returns the
    float32 model-grid image and the ``GridMap`` that ``from_model_grid`` inverts."""
    image = np.asarray(pixels, dtype=np.float32)
    if image.ndim < 2:
        raise ValueError(f"expected a (rows, cols) image, got shape {image.shape}")
    gmap = GridMap(
        rows=_axis(image.shape[-2], spacing_mm[0], contract.shape[0], contract.pixel_spacing_mm[0]),
        cols=_axis(image.shape[-1], spacing_mm[1], contract.shape[1], contract.pixel_spacing_mm[1]),
        in_spacing_mm=(float(spacing_mm[0]), float(spacing_mm[1])),
        model_spacing_mm=(float(contract.pixel_spacing_mm[0]), float(contract.pixel_spacing_mm[1])),
    )
    grid = _forward_axis(image, gmap.rows, image.ndim - 2)
    grid = _forward_axis(grid, gmap.cols, image.ndim - 1)
    return np.ascontiguousarray(grid, dtype=np.float32), gmap


def from_model_grid(grid_out: np.ndarray, gmap: GridMap) -> np.ndarray:
    """Map a model-grid image (H, W) back onto the input's own grid (rows, cols): the exact
    inverse geometry of ``to_model_grid``. Input pixels whose field of view the model grid
    cropped away are 0."""
    image = np.asarray(grid_out, dtype=np.float32)
    if image.shape[-2:] != gmap.model_shape:
        raise ValueError(f"model output shape {image.shape} != model grid {gmap.model_shape}")
    out = _inverse_axis(image, gmap.rows, image.ndim - 2)
    out = _inverse_axis(out, gmap.cols, image.ndim - 1)
    return np.ascontiguousarray(out, dtype=np.float32)


def normalise(grid: np.ndarray, norm: Normalisation) -> np.ndarray:
    """Scale a model-grid image (H, W), or a 2.5D stack of neighbouring slices (C, H, W), as
    the model was trained to see it (float32).

    ``robust_max``: divide by the ``norm.percentile`` percentile of the non-zero pixels and
    clip to ``[0, norm.clip_max]``; an all-zero (or all-negative) slice gives zeros. A stack
    is divided by the percentile of its centre slice (index C // 2), so neighbours keep
    their intensity relative to it. Raises ValueError for an unknown method."""
    if norm.method != "robust_max":
        raise ValueError(f"unknown normalisation method {norm.method!r} (known: robust_max)")
    image = np.asarray(grid, dtype=np.float32)
    centre = image[image.shape[0] // 2] if image.ndim == 3 else image
    found = positive_percentiles(centre, (norm.percentile,))
    scale = 0.0 if found is None else found[0]
    if not np.isfinite(scale) or scale <= 0:
        return np.zeros_like(image)
    out = image * np.float32(1.0 / scale)
    np.clip(out, 0.0, norm.clip_max, out=out)
    return out
