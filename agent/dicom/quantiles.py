"""Percentiles of one image without the cost of ``np.percentile``'s machinery.

``np.percentile`` partitions the values once and interpolates, but around that it makes
tens of small array calls (index arithmetic, ``np.unique``, a copy), which cost more than
the partition itself for one slice. ``percentiles`` does the same partition and the same
arithmetic on scalars, so its result is ``np.percentile``'s bit for bit (tests check it).
``positive_percentiles`` gives the same numbers for the tails of an image's positive
values while partitioning only about 1 % of them.
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
    """The picks' interpolated values; ``values`` hold the sorted positions the picks read,
    the first of them at position ``skipped`` (every value left out of ``values`` lies
    beyond all of them on one side)."""
    kth = sorted({i - skipped for lo, hi, _ in picks for i in (lo, hi)})
    ordered = np.partition(values, kth)
    out = []
    for lo, hi, gamma in picks:
        a, b = ordered[lo - skipped], ordered[hi - skipped]
        diff = float(b - a)  # numpy subtracts in the array's dtype
        out.append(float(b) - diff * (1 - gamma) if gamma >= 0.5 else float(a) + diff * gamma)
    return out


def positive_percentiles(image: np.ndarray, qs: tuple[float, ...]) -> list[float] | None:
    """``percentiles(image[image > 0], qs)``, bit for bit, for percentiles in the tails
    (the normalisation's 99.5th, the window's 1st and 99th): None when no value is
    positive.

    Instead of partitioning every positive value, it estimates from every 16th pixel a
    threshold beyond the wanted sorted positions and partitions only the values past it
    (about 1 % of them). Every value it leaves out is on the other side of all it keeps,
    so the positions stay (the low tail) or shift by their count (the high tail). Where an
    estimate falls short, or for a q between 10 and 90, it partitions all of them."""
    flat = image.ravel()
    positive = flat > 0
    n = int(np.count_nonzero(positive))
    if n == 0:
        return None
    picks = _picks(n, qs)
    if n >= 1024 and all(q <= 10 or q >= 90 for q in qs):
        sample = flat[::16]
        sample = sample[sample > 0]
        tails = [_tail_rank(sample.size, n, pick, high=q >= 90)
                 for q, pick in zip(qs, picks, strict=True)]
        if all(k is not None for k in tails):
            ks = [k for k in tails if k is not None]
            thresholds = np.partition(sample, ks)[ks]  # one partition for every tail
            out = [_tail(flat, positive, threshold, n, pick, high=q >= 90)
                   for q, pick, threshold in zip(qs, picks, thresholds, strict=True)]
            if all(v is not None for v in out):
                return [v for v in out if v is not None]
    return _lerped(flat[positive], picks, skipped=0)


def _needed(n: int, pick: tuple[int, int, float], high: bool) -> int:
    """How many of the ``n`` sorted values a tail must keep to hold the pick's positions."""
    lo, hi, _ = pick
    return n - lo if high else hi + 1


def _tail_rank(size: int, n: int, pick: tuple[int, int, float], high: bool) -> int | None:
    """The position in a sorted sample of ``size`` of the ``n`` values whose value as a
    threshold should keep about twice the values a pick needs; None where there is none."""
    margin = (2 * _needed(n, pick, high) * size) // n + 8
    k = size - 1 - margin if high else margin
    return k if 0 < k < size - 1 else None


def _tail(flat: np.ndarray, positive: np.ndarray, threshold: np.generic, n: int,
          pick: tuple[int, int, float], high: bool) -> float | None:
    """One pick read from the positive values of ``flat`` (``positive``, ``n`` of them) at
    or beyond ``threshold``, or None where they are too few to hold its positions."""
    kept = flat[flat >= threshold] if high else flat[positive & (flat <= threshold)]
    if kept.size < _needed(n, pick, high):
        return None
    return _lerped(kept, [pick], skipped=n - kept.size if high else 0)[0]
