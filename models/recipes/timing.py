"""Wall-time bookkeeping for the recipe steps (``build/timings.json``).

Steps shared by the family (``simulate``, ``sample``) are recorded under their name, a
model's own steps under ``<model>/<step>``."""

from __future__ import annotations

import json

from recipes import config

SHARED_STEPS = ("simulate", "sample")


def record_timing(step: str, seconds: float, model: str | None = None) -> None:
    """Store the wall time of one recipe step (of one model, unless it is shared)."""
    timings = _load()
    timings[f"{model}/{step}" if model else step] = round(seconds, 1)
    config.BUILD_DIR.mkdir(parents=True, exist_ok=True)
    config.TIMINGS.write_text(json.dumps(timings, indent=2) + "\n", encoding="utf-8")


def _load() -> dict[str, float]:
    if not config.TIMINGS.is_file():
        return {}
    data: dict[str, float] = json.loads(config.TIMINGS.read_text(encoding="utf-8"))
    return data


def load_timings(model: str) -> dict[str, float]:
    """Wall times of the shared steps and of ``model``'s own steps, by step name."""
    timings = _load()
    out = {k: v for k, v in timings.items() if k in SHARED_STEPS}
    prefix = f"{model}/"
    out |= {k[len(prefix):]: v for k, v in timings.items() if k.startswith(prefix)}
    return out
