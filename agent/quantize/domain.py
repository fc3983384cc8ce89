"""The bundle's domain reference (``domain.json``) from the operator's own DICOMs: the
metric on the calibration inputs, the threshold on the inputs held out from calibration
(check and golden). See docs/bundle.md, "Domain reference"."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from agent.model.domain import has_body
from agent.model.domain_reference import DomainReference, build_reference

MIN_FIT, MIN_HELD = 8, 4


def build_domain_reference(
    calibration: list[np.ndarray], held_x: np.ndarray, held_y: np.ndarray,
    outputs: Callable[[np.ndarray], np.ndarray],
) -> tuple[DomainReference | None, dict[str, Any]]:
    """(reference or None, the report's ``domain`` section). ``calibration``: normalised
    inputs (C, H, W); ``held_x`` / ``held_y``: held-out inputs and their fp32 outputs
    [N, C, H, W] / [N, 1, H, W]; ``outputs``: runs the fp32 model on [N, C, H, W] (only
    when enough inputs have a body to score, so small test grids cost nothing)."""
    k = held_x.shape[1] // 2 if held_x.ndim == 4 else 0
    fit_x = [x for x in calibration if has_body(x[k])]
    held = [(x[k], y[0]) for x, y in zip(held_x, held_y, strict=True) if has_body(x[k])]
    if len(fit_x) < MIN_FIT or len(held) < MIN_HELD:
        return None, {"built": False, "reason": (
            f"{len(fit_x)} calibration and {len(held)} held-out inputs have enough body to "
            f"score (need {MIN_FIT} and {MIN_HELD}): the bundle serves without a domain "
            "score (status note no_domain_reference)")}
    fit_y = outputs(np.stack(fit_x))
    reference = build_reference(
        [(x[k], y[0]) for x, y in zip(fit_x, fit_y, strict=True)], held, folds=4,
        fit_source=f"{len(fit_x)} calibration inputs of the operator's DICOMs, fp32 model",
        held_out_source=f"{len(held)} check and golden inputs held out from calibration")
    return reference, {"built": True, "threshold": round(reference.threshold, 3),
                       "fit_slices": reference.spec.fit_slices,
                       "held_out_slices": reference.spec.held_out.slices,
                       "out_of_fold_alarm_rate": reference.spec.held_out.out_of_fold_alarm_rate}
