"""Wall-time bookkeeping for the recipe steps (``build/timings.json``)."""

from __future__ import annotations

import json

from recipes import config


def record_timing(step: str, seconds: float) -> None:
    """Store the wall time of one recipe step."""
    timings = load_timings()
    timings[step] = round(seconds, 1)
    config.BUILD_DIR.mkdir(parents=True, exist_ok=True)
    config.TIMINGS.write_text(json.dumps(timings, indent=2) + "\n", encoding="utf-8")


def load_timings() -> dict[str, float]:
    """Wall times recorded so far, by step."""
    if not config.TIMINGS.is_file():
        return {}
    data: dict[str, float] = json.loads(config.TIMINGS.read_text(encoding="utf-8"))
    return data
