"""percentiles() is np.percentile, bit for bit."""

from __future__ import annotations

import numpy as np
import pytest

from agent.dicom.quantiles import percentiles, positive_percentiles


@pytest.mark.parametrize("seed", range(24))
def test_percentiles_are_numpys_bit_for_bit(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 5000))
    values: np.ndarray = rng.integers(1, 65535, size=n, endpoint=True).astype(np.uint16)
    if seed % 3 == 0:
        values = np.minimum(values, 40)  # many ties
    if seed % 2:  # what normalise sees: positive float32 model-grid pixels
        values = (rng.random(n) * rng.choice([1.0, 1e-3, 4000.0])).astype(np.float32) + 1e-6
    qs = (1.0, 99.0, 99.5, 0.0, 100.0, float(rng.uniform(0, 100)))
    expected = [float(v) for v in np.percentile(values, qs)]
    assert percentiles(values, qs) == expected


def test_empty_is_refused() -> None:
    with pytest.raises(ValueError):
        percentiles(np.zeros(0, dtype=np.float32), (50.0,))


@pytest.mark.parametrize("seed", range(32))
def test_positive_percentiles_are_those_of_the_positive_values_bit_for_bit(seed: int) -> None:
    """Whichever way it goes (the threshold from the sample, or every positive value):
    smooth images, many ties at the top, few positive pixels, negative values, low q."""
    rng = np.random.default_rng(seed)
    size = int(rng.choice([8, 40, 256]))
    image = (rng.gamma(2.0, 300.0, (size, size)) - rng.choice([0.0, 200.0])).astype(np.float32)
    if seed % 4 == 1:
        image = np.minimum(image, np.float32(900.0))  # the top few percent all equal
    if seed % 4 == 2:
        image[rng.random(image.shape) < 0.97] = 0.0  # few positive pixels
    if seed % 8 == 3:
        image[:] = 0.0
        image[0, 0] = 5.0
    positive = image[image > 0]
    for qs in ((99.5,), (1.0, 99.0), (0.0, 100.0), (90.0, 10.0), (50.0,), (5.0, 95.0, 99.0),
               (float(rng.uniform(0, 10)), float(rng.uniform(90, 100)))):
        expected = percentiles(positive, qs) if positive.size else None
        assert positive_percentiles(image, qs) == expected, (seed, qs)
        counts = np.clip(image, 0, 65535).astype(np.uint16)  # what the window sees
        expected = percentiles(counts[counts > 0], qs) if counts.any() else None
        assert positive_percentiles(counts, qs) == expected, (seed, qs)


def test_positive_percentiles_of_nothing_positive_is_none() -> None:
    assert positive_percentiles(np.full((4, 4), -1.0, dtype=np.float32), (99.5,)) is None
