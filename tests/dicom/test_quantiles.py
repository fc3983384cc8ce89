"""percentiles() is np.percentile, bit for bit."""

from __future__ import annotations

import numpy as np
import pytest

from agent.dicom.quantiles import percentiles


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
