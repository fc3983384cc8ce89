"""``domain.json``: a bundle's reference of its training inputs, and the scorer built on it.

Written by the model recipes (``models/recipes/domain_reference.py``) and by
``iomt-agent model quantize`` (from the operator's calibration DICOMs) through
``build_reference``; read by ``load_reference`` when the bundle loads. Format:
``docs/bundle.md`` ("Domain reference"); the statistics: ``agent.model.domain``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import numpy.typing as npt
from pydantic import Field, ValidationError, model_validator

from agent.config import Strict, describe_errors
from agent.errors import AgentError
from agent.model.domain import (
    FEATURES,
    HIST_BINS,
    HIST_MAX,
    Standardiser,
    body_histogram,
    fit_standardiser,
    slice_features,
)

DOMAIN_FORMAT = 1
DOMAIN_FILE = "domain.json"
THRESHOLD_QUANTILE = 0.999  # of the held-out in-distribution slices' distances


class DomainReferenceError(AgentError):
    """domain.json is malformed (the bundle loader reports it as a ``BundleError``: a bundle
    whose reference is broken is refused like one with any other bad file)."""


class HistogramSpec(Strict):
    bins: int = Field(HIST_BINS, ge=HIST_BINS, le=HIST_BINS, title="Bins",
                      description=f"histogram bins over [0, {HIST_MAX}] (always {HIST_BINS})")
    shares: list[float] = Field(title="Shares", description="share of body pixels per bin")


class HeldOutSpec(Strict):
    slices: int = Field(ge=1, title="Held-out slices", description="slices the threshold is on")
    quantile: float = Field(gt=0, le=1, title="Quantile",
                            description="quantile of their distances the threshold is")
    false_alarm_rate: float | None = Field(
        None, ge=0, le=1, title="False-alarm rate",
        description="share of a second held-out set (not used for the threshold) scored >= 1")
    out_of_fold_alarm_rate: float | None = Field(
        None, ge=0, le=1, title="Out-of-fold alarm rate",
        description="share of the fit slices scored >= 1 by the metric fitted without their "
        "fold (how the threshold fares across the whole range the fit set covers)")
    source: str = Field("", title="Source", description="what the held-out slices are")


class DomainReferenceFile(Strict):
    """domain.json."""

    format: Literal[1] = Field(title="Format", description="domain reference format: 1")
    features: list[str] = Field(title="Features", description="names, in order")
    mean: list[float] = Field(title="Centre", description="per-feature median over the fit set")
    scale: list[float] = Field(title="Spread", description="per-feature robust spread")
    precision: list[list[float]] = Field(
        title="Precision", description="inverse of the shrunk correlation matrix")
    threshold: float = Field(gt=0, title="Threshold",
                             description="Mahalanobis distance that scores 1.0")
    histogram: HistogramSpec = Field(title="Reference histogram",
                                     description="mean body histogram of the fit set")
    fit_slices: int = Field(ge=8, title="Fit slices", description="slices the centre came from")
    fit_source: str = Field("", title="Fit source", description="what the fit slices are")
    held_out: HeldOutSpec = Field(title="Held-out set", description="where the threshold is from")

    @model_validator(mode="after")
    def _shapes(self) -> DomainReferenceFile:
        n = len(FEATURES)
        if tuple(self.features) != FEATURES:
            raise ValueError(f"features must be {list(FEATURES)} (this agent computes those)")
        if len(self.mean) != n or len(self.scale) != n:
            raise ValueError(f"mean and scale need {n} values each")
        if len(self.precision) != n or any(len(row) != n for row in self.precision):
            raise ValueError(f"precision must be {n} x {n}")
        if any(s <= 0 for s in self.scale):
            raise ValueError("scale values must be positive")
        if len(self.histogram.shares) != HIST_BINS:
            raise ValueError(f"histogram.shares needs {HIST_BINS} values")
        return self


@dataclass(frozen=True)
class SliceScore:
    """One slice's score (None: too little body to score), its raw distance and the
    features it was computed from (what a flagged slice's log line explains it by)."""

    score: float | None
    distance: float | None = None
    features: npt.NDArray[np.float64] | None = field(default=None, compare=False, repr=False)


class DomainReference:
    """A loaded reference: scores slices."""

    def __init__(self, spec: DomainReferenceFile) -> None:
        self.spec = spec
        self.metric = Standardiser(np.array(spec.mean), np.array(spec.scale),
                                   np.array(spec.precision))
        self.cdf = np.cumsum(np.array(spec.histogram.shares, dtype=np.float64))
        self.threshold = spec.threshold

    def features(self, x: npt.NDArray[np.float32],
                 y: npt.NDArray[np.float32]) -> npt.NDArray[np.float64] | None:
        return slice_features(x, y, self.cdf)

    def score(self, x: npt.NDArray[np.float32], y: npt.NDArray[np.float32]) -> SliceScore:
        """The score of the normalised input slice ``x`` and output ``y`` (model grid)."""
        f = self.features(x, y)
        if f is None:
            return SliceScore(None)
        d = self.metric.distance(f)
        return SliceScore(round(d / self.threshold, 3), d, f)

    def to_json(self) -> str:
        return json.dumps(self.spec.model_dump(mode="json"), indent=1) + "\n"


def load_reference(path: Path) -> DomainReference:
    """domain.json checked against its schema; DomainReferenceError naming the bad keys."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DomainReferenceError(f"{path}: cannot read JSON ({exc})") from None
    if not isinstance(data, dict) or data.get("format") != DOMAIN_FORMAT:
        raise DomainReferenceError(f"{path}: not a domain reference of format {DOMAIN_FORMAT}")
    try:
        return DomainReference(DomainReferenceFile.model_validate(data))
    except ValidationError as exc:
        raise DomainReferenceError(
            f"{path}: " + "; ".join(describe_errors(exc, "docs/bundle.md"))) from None


def install_reference(bundle_dir: Path, reference: DomainReference) -> None:
    """Write ``domain.json`` into a bundle directory and add its entry (path, sha256) to
    bundle.json; no other file and no other key changes."""
    import hashlib

    from agent.model.bundle import read_manifest
    from agent.model.manifest import FileEntry

    path = bundle_dir / DOMAIN_FILE
    path.write_text(reference.to_json(), encoding="utf-8")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    manifest = read_manifest(bundle_dir)
    updated = manifest.model_copy(update={"domain": FileEntry(path=DOMAIN_FILE, sha256=digest)})
    (bundle_dir / "bundle.json").write_text(updated.to_json(), encoding="utf-8")


def reference_histogram(inputs: list[npt.NDArray[np.float32]]) -> npt.NDArray[np.float64]:
    """The mean body histogram of normalised input slices (those with a body)."""
    from agent.model.domain import BODY_LEVEL, STRIDE, has_body

    hists = []
    for x in inputs:
        if has_body(x):
            sub = x[::STRIDE, ::STRIDE]
            hists.append(body_histogram(sub[sub > BODY_LEVEL]))
    if not hists:
        raise ValueError("no slice has enough body for a domain reference")
    mean: npt.NDArray[np.float64] = np.mean(hists, axis=0)
    return mean


def _features(pairs: list[tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]],
              cdf: npt.NDArray[np.float64]) -> list[npt.NDArray[np.float64]]:
    return [f for _, f in _indexed(pairs, cdf)]


def _indexed(pairs: list[tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]],
             cdf: npt.NDArray[np.float64]) -> list[tuple[int, npt.NDArray[np.float64]]]:
    return [(i, f) for i, (x, y) in enumerate(pairs)
            if (f := slice_features(x, y, cdf)) is not None]


def build_reference(
    fit: list[tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]],
    held_out: list[tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]],
    *, fit_source: str, held_out_source: str, folds: int = 0,
    fold_of: list[int] | None = None,
    test: list[tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]] | None = None,
) -> DomainReference:
    """A reference from (normalised input slice, model output) pairs: the metric from
    ``fit``; the threshold at ``THRESHOLD_QUANTILE`` of the distances of the ``held_out``
    slices; with ``folds`` > 1 the share of fit slices at or over it under the metric fitted
    without their fold (``fold_of[i]``: the fold of fit pair i, e.g. its slice index, taken
    modulo ``folds``; default: the pair's index); and (optional)
    the false-alarm rate on a second held-out set ``test`` that the threshold never saw."""
    shares = np.round(reference_histogram([x for x, _ in fit]), 6)
    cdf = np.cumsum(shares)
    indexed = _indexed(fit, cdf)
    fit_f = np.array([f for _, f in indexed])
    metric = fit_standardiser(fit_f)
    held = [metric.distance(f) for f in _features(held_out, cdf)]
    if len(held) < 4:
        raise ValueError("need at least 4 held-out slices with enough body for a threshold")
    threshold = float(np.quantile(held, THRESHOLD_QUANTILE))
    oof: list[float] = []
    if folds > 1:
        group = np.array([i if fold_of is None else fold_of[i] for i, _ in indexed]) % folds
        for k in range(folds):
            part, rest = np.flatnonzero(group == k), np.flatnonzero(group != k)
            if len(part) == 0 or len(rest) < 8:
                continue
            fold_metric = fit_standardiser(fit_f[rest])
            oof += [fold_metric.distance(f) for f in fit_f[part]]
    oof_rate = round(float(np.mean(np.array(oof) >= threshold)), 4) if oof else None
    false_alarm = None
    if test:
        dist = [metric.distance(f) for f in _features(test, cdf)]
        false_alarm = round(float(np.mean(np.array(dist) >= threshold)), 4) if dist else None
    spec = DomainReferenceFile(
        format=1, features=list(FEATURES), mean=metric.mean.tolist(),
        scale=metric.scale.tolist(), precision=metric.precision.tolist(),
        threshold=threshold,
        histogram=HistogramSpec(bins=HIST_BINS, shares=[float(s) for s in shares]),
        fit_slices=len(fit_f), fit_source=fit_source,
        held_out=HeldOutSpec(slices=len(held), quantile=THRESHOLD_QUANTILE,
                             false_alarm_rate=false_alarm, out_of_fold_alarm_rate=oof_rate,
                             source=held_out_source))
    return DomainReference(spec)
