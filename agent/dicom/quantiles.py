"""Percentiles of one image without the cost of ``np.percentile``'s machinery.

``np.percentile`` partitions the values once and interpolates, but around that it makes
tens of small array calls (index arithmetic, ``np.unique``, a copy), which cost more than
the partition itself for one slice. ``percentiles`` does the same partition and the same
arithmetic on scalars, so its result is ``np.percentile``'s bit for bit (tests check it).
"""

from __future__ import annotations

import numpy as np


def percentiles(values: np.ndarray, qs: tuple[float, ...]) -> list[float]:
    """``np.percentile(values, qs)`` (method "linear") of a 1-D integer or float array
    without NaN, as Python floats.

    Mirrors numpy's linear virtual index ``(n - 1) * q / 100``, its neighbour indexes and
    its ``_lerp`` (the difference of the two neighbours in the array's own dtype, the
    interpolation in float64, from the upper neighbour when the weight is >= 0.5)."""
    n = int(values.size)
    if n == 0:
        raise ValueError("percentiles of an empty array")
    return _lerped(values, _picks(n, qs), skipped=0)


def _picks(n: int, qs: tuple[float, ...]) -> list[tuple[int, int, float]]:
    """For each q, numpy's two neighbour positions in the sorted values and the weight of
    the upper one."""
    picks: list[tuple[int, int, float]] = []
    for q in qs:
        virtual = (n - 1) * (q / 100)
        previous = float(np.floor(virtual))
        if virtual >= n - 1:
            lo = hi = n - 1
        elif virtual < 0:
            lo = hi = 0
        else:
            lo, hi = int(previous), int(previous) + 1
        picks.append((lo, hi, virtual - previous))
    return picks


def _lerped(values: np.ndarray, picks: list[tuple[int, int, float]], skipped: int
            ) -> list[float]:
    """The picks' interpolated values; ``values`` are the sorted values from position
    ``skipped`` on (every value left out is below all of them)."""
    kth = sorted({i - skipped for lo, hi, _ in picks for i in (lo, hi)})
    ordered = np.partition(values, kth)
    out = []
    for lo, hi, gamma in picks:
        a, b = ordered[lo - skipped], ordered[hi - skipped]
        diff = float(b - a)  # numpy subtracts in the array's dtype
        out.append(float(b) - diff * (1 - gamma) if gamma >= 0.5 else float(a) + diff * gamma)
    return out


def positive_percentile(image: np.ndarray, q: float) -> float | None:
    """``percentiles(image[image > 0], (q,))[0]``, bit for bit, for a high ``q`` (the
    normalisation's 99.5th): None when no value is positive.

    Instead of partitioning every positive value, it estimates from every 8th pixel a
    threshold below the wanted sorted positions and partitions only the values at or above
    it (about 1 % of them); every value it leaves out is below all it keeps, so the
    positions shift by their count. Where the estimate falls short, or for ``q`` < 90, it
    partitions all of them."""
    flat = image.ravel()
    n = int(np.count_nonzero(flat > 0))
    if n == 0:
        return None
    picks = _picks(n, (q,))
    need = n - picks[0][0]  # the values at the sorted positions it reads, and above
    if q >= 90 and n >= 1024:
        sample = flat[::8]
        sample = sample[sample > 0]
        # A sample position leaving about twice `need` (plus 64) above the threshold.
        k = sample.size - 1 - (2 * need * sample.size) // n - 8
        if k > 0:
            threshold = np.partition(sample, k)[k]
            kept = flat[flat >= threshold]
            if kept.size >= need:
                return _lerped(kept, picks, skipped=n - kept.size)[0]
    return _lerped(flat[flat > 0], picks, skipped=0)[0]
