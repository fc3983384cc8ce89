"""The domain-shift scorer: its statistics, the reference it is fitted into (domain.json),
and the serving check's policy, series verdict and status."""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

import numpy as np
import pytest

from agent.config_domain import DomainSection
from agent.daemon.domain_check import NO_REFERENCE, DomainCheck
from agent.demo.sample_series import load_demo_slab
from agent.model.bundle import BundleError, Normalisation, load_bundle
from agent.model.domain import FEATURES, slice_features
from agent.model.domain_reference import (
    DomainReference,
    DomainReferenceError,
    build_reference,
    load_reference,
)
from agent.model.preprocess import normalise
from tests.integration.harness import REFERENCE_BUNDLE

Pair = tuple[np.ndarray, np.ndarray]


def _pair(raw: np.ndarray) -> Pair:
    x = normalise(raw.astype(np.float32), Normalisation())
    return x, np.clip(1.2 - x, 0, None) * (x > 0.1)  # a fixed "model": what matters is it is fixed


def _noisy(raw: np.ndarray, rng: np.random.Generator, sigma: float) -> np.ndarray:
    s = sigma * float(raw.max())
    return np.sqrt((raw + s * rng.standard_normal(raw.shape)) ** 2
                   + (s * rng.standard_normal(raw.shape)) ** 2)


@cache
def _reference() -> DomainReference:
    """Fitted on the demo slab under mild scaling and noise, thresholded on other draws."""
    slab = load_demo_slab().t1.astype(np.float32)
    rng = np.random.default_rng(1)

    def draws(n: int) -> list[Pair]:
        return [_pair(_noisy(s * rng.uniform(0.7, 1.3), rng,
                            rng.uniform(0, 0.01) if rng.random() < 0.5 else 0.0))
                for _ in range(n) for s in slab]

    return build_reference(draws(3), draws(3), fit_source="demo slab",
                           held_out_source="other draws", folds=4, test=draws(1))


def test_features_are_none_without_enough_body_and_finite_otherwise() -> None:
    cdf = np.linspace(1 / 30, 1, 30)
    assert slice_features(np.zeros((256, 256), np.float32), np.zeros((256, 256), np.float32),
                          cdf) is None
    x, y = _pair(load_demo_slab().t1[12])
    f = slice_features(x, y, cdf)
    assert f is not None and f.shape == (len(FEATURES),) and np.isfinite(f).all()


def test_blur_lowers_sharp24_and_tilt_ignores_turns_and_flips() -> None:
    cdf = np.linspace(1 / 30, 1, 30)
    x, y = _pair(load_demo_slab().t1[12])
    f = slice_features(x, y, cdf)
    assert f is not None
    kernel = np.ones(5, np.float32) / 5  # a 5 px motion blur along the rows
    blurred = np.apply_along_axis(lambda v: np.convolve(v, kernel, mode="same"), 1, x)
    fb = slice_features(blurred.astype(np.float32), y, cdf)
    assert fb is not None
    i = FEATURES.index("sharp24")
    assert fb[i] < f[i] - 0.02, (fb[i], f[i])
    t = FEATURES.index("tilt")
    for turned in (np.rot90(x), np.rot90(x, 2), x[:, ::-1], x[::-1]):
        ft = slice_features(np.ascontiguousarray(turned), y, cdf)
        assert ft is not None and abs(ft[t] - f[t]) < 0.02, (ft[t], f[t])


def test_in_distribution_slices_score_below_one_shifted_ones_above() -> None:
    ref = _reference()
    slab = load_demo_slab()
    clean = [ref.score(*_pair(s)).score for s in slab.t1]
    assert max(s for s in clean if s is not None) < 1.0
    wrong_contrast = [ref.score(*_pair(s)).score for s in slab.t2_reference]
    assert min(s for s in wrong_contrast if s is not None) > 1.0
    rng = np.random.default_rng(7)
    noisy = [ref.score(*_pair(_noisy(s.astype(np.float32), rng, 0.1))).score
             for s in slab.t1[:4]]
    assert min(s for s in noisy if s is not None) > 1.0
    assert ref.score(*_pair(np.zeros((256, 256)))).score is None  # nothing to score
    held = ref.spec.held_out
    assert held.false_alarm_rate is not None and held.false_alarm_rate <= 0.05
    assert held.out_of_fold_alarm_rate is not None


def test_the_reference_round_trips_through_domain_json(tmp_path: Path) -> None:
    ref = _reference()
    path = tmp_path / "domain.json"
    path.write_text(ref.to_json())
    again = load_reference(path)
    x, y = _pair(load_demo_slab().t2_reference[5])
    assert again.score(x, y) == ref.score(x, y)
    data = json.loads(path.read_text())
    data["features"] = data["features"][::-1]
    path.write_text(json.dumps(data))
    with pytest.raises(DomainReferenceError, match="features must be"):
        load_reference(path)
    path.write_text("{not json")
    with pytest.raises(DomainReferenceError, match="cannot read JSON"):
        load_reference(path)


def test_the_shipped_bundle_carries_a_reference_and_a_replaced_one_is_refused(
        tmp_path: Path) -> None:
    assert load_bundle(REFERENCE_BUNDLE).domain is not None
    import shutil

    copy = tmp_path / "b"
    shutil.copytree(REFERENCE_BUNDLE, copy)
    (copy / "domain.json").write_text((copy / "domain.json").read_text() + " ")
    with pytest.raises(BundleError, match=r"domain: domain\.json has sha256"):
        load_bundle(copy)


def _check(policy: str = "serve", min_slices: int = 3) -> DomainCheck:
    return DomainCheck(_reference(), DomainSection(policy=policy,  # type: ignore[arg-type]
                                                   series_min_slices=min_slices))


def test_a_shifted_series_is_flagged_and_refused_under_refuse() -> None:
    slab = load_demo_slab()
    serve, refuse = _check(), _check("refuse")
    for s in slab.t1[:3]:
        v = serve.judge(*_pair(s), "aaaa", "series-a")
        assert v is not None and not v.flagged and not v.refuse
        assert v.mark().flagged is False
    for s in slab.t2_reference[:3]:
        v = serve.judge(*_pair(s), "bbbb", "series-b")
        assert v is not None and v.flagged and not v.refuse
        r = refuse.judge(*_pair(s), "bbbb", "series-b")
        assert r is not None and r.refuse and "domain.policy" in r.detail()
    summary = serve.summary()
    assert summary["slices_scored"] == 6 and summary["flagged"] == 3
    assert summary["refused"] == 0 and summary["last_flagged_series"] == "series-b"
    assert refuse.summary()["refused"] == 3


def test_a_series_whose_median_is_over_one_flags_its_borderline_slices() -> None:
    """Once series_min_slices are scored, the series median flags a slice that alone would
    pass; before that only the slice's own score counts."""
    slab = load_demo_slab()
    check = _check(min_slices=2)
    for s in slab.t2_reference[:2]:
        assert check.judge(*_pair(s), "cccc", "c").flagged  # type: ignore[union-attr]
    v = check.judge(*_pair(slab.t1[5]), "cccc", "c")
    assert v is not None and v.score is not None and v.score < 1.0
    assert v.series_score is not None and v.series_score >= 1.0 and v.flagged


def test_without_a_reference_nothing_is_scored_and_the_status_says_so() -> None:
    check = DomainCheck(None, DomainSection())
    assert check.judge(*_pair(load_demo_slab().t1[3]), "k", "k") is None
    assert check.summary() == {"policy": "serve", "note": NO_REFERENCE}
