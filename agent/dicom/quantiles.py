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
    kth = sorted({i for lo, hi, _ in picks for i in (lo, hi)})
    ordered = np.partition(values, kth)
    out = []
    for lo, hi, gamma in picks:
        a, b = ordered[lo], ordered[hi]
        diff = float(b - a)  # numpy subtracts in the array's dtype
        out.append(float(b) - diff * (1 - gamma) if gamma >= 0.5 else float(a) + diff * gamma)
    return out
