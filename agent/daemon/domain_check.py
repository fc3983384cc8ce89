"""The domain-shift check of the serving path: one score per slice, one per series, the
site's policy, the log line and the status's ``domain`` member.

A slice is **flagged** when its own score is >= 1.0, or when its series' median score over
the slices scored so far is >= 1.0 once ``series_min_slices`` of them were scored (a series
that drifts as a whole flags its borderline slices too). The scores: ``agent.model.domain``.
A bundle without a reference serves unscored, and the status says ``no_domain_reference``.
"""

from __future__ import annotations

import threading
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from agent.config_domain import DomainSection
from agent.dicom.derive import DomainMark
from agent.log import get_logger
from agent.model.domain_reference import DomainReference

log = get_logger("agent.daemon.domain_check")

NO_REFERENCE = "no_domain_reference"
SERIES_TRACKED = 64  # open series whose recent scores are kept (least recently used dropped)
SCORES_KEPT = 256  # recent slice scores kept per series for its median


@dataclass(frozen=True)
class DomainVerdict:
    """What the check says about one slice."""

    score: float | None  # None: too little body to score
    series_score: float | None  # median over the series' scored slices so far
    flagged: bool
    refuse: bool  # flagged under policy "refuse"

    def mark(self) -> DomainMark:
        """What the derived instance records."""
        return DomainMark(self.score, self.series_score, self.flagged)

    def detail(self) -> str:
        """The error report's detail under policy refuse (numbers only, no PHI)."""
        return (f"input outside the model's training domain: slice score "
                f"{_fmt(self.score)}, series score {_fmt(self.series_score)} (1.0 is the "
                "threshold); site policy domain.policy = \"refuse\"; check the scanner "
                "protocol against the model card, or serve it marked (policy \"serve\")")


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


class DomainCheck:
    """Scores slices against the bundle's reference and keeps the counts for the status.
    Thread-safe (the finisher judges, the main thread reads the summary)."""

    def __init__(self, reference: DomainReference | None, section: DomainSection) -> None:
        self.reference = reference
        self.section = section
        self._lock = threading.Lock()
        self._series: OrderedDict[str, deque[float]] = OrderedDict()
        self.scored = self.unscored = self.flagged = self.refused = 0
        self.last_score: float | None = None
        self.last_flagged_series: str | None = None
        if reference is None:
            log.warning("domain_reference_missing", note=NO_REFERENCE,
                        fix="the bundle has no domain.json: results go out unscored; rebuild "
                        "the bundle (make -C models, or iomt-agent model quantize) to score "
                        "its inputs")

    def judge(self, x: npt.NDArray[np.float32], y: npt.NDArray[np.float32], series_key: str,
              series_label: str) -> DomainVerdict | None:
        """The verdict on one slice: ``x`` its normalised input, ``y`` the model output
        (model grid), ``series_key`` the short series hash (logged), ``series_label`` what
        the status may name it by (a pseudonymous UID or the key). None: no reference."""
        if self.reference is None:
            return None
        result = self.reference.score(x, y)
        with self._lock:
            recent = self._series.get(series_key)
            if recent is None:
                recent = self._series[series_key] = deque(maxlen=SCORES_KEPT)
                while len(self._series) > SERIES_TRACKED:
                    self._series.popitem(last=False)
            self._series.move_to_end(series_key)
            if result.score is None:
                self.unscored += 1
            else:
                self.scored += 1
                self.last_score = result.score
                recent.append(result.score)
            series_score = round(float(np.median(recent)), 3) if recent else None
            flagged = result.score is not None and (
                result.score >= 1.0 or (len(recent) >= self.section.series_min_slices
                                        and series_score is not None and series_score >= 1.0))
            refuse = flagged and self.section.policy == "refuse"
            if flagged:
                self.flagged += 1
                self.refused += int(refuse)
                self.last_flagged_series = series_label
        verdict = DomainVerdict(result.score, series_score, flagged, refuse)
        if flagged:
            assert result.score is not None
            f = result.features  # computed once, by the score
            top = {} if f is None else dict(sorted(
                self.reference.metric.contributions(f).items(),
                key=lambda kv: -abs(kv[1]))[:3])
            log.warning("domain_shift", series=series_key, score=result.score,
                        series_score=series_score,
                        action="refused" if refuse else "served_marked", features_z=top)
        return verdict

    def summary(self) -> dict[str, Any]:
        """The status's ``domain`` member."""
        if self.reference is None:
            return {"policy": self.section.policy, "note": NO_REFERENCE}
        with self._lock:
            return {
                "policy": self.section.policy,
                "slices_scored": self.scored,
                "slices_unscored": self.unscored,
                "flagged": self.flagged,
                "refused": self.refused,
                "last_score": self.last_score,
                "last_flagged_series": self.last_flagged_series,
            }
