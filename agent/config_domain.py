"""The ``[domain]`` section of the config: what a site does with a slice whose input lies
outside the model's training domain (``agent.daemon.domain_check``). Kept apart from
``agent.config`` only for its size."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class DomainSection(BaseModel):
    """The domain-shift policy of this site."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    policy: Literal["serve", "refuse"] = Field(
        "serve", title="Policy",
        description="serve: a flagged slice's result goes out, marked (ImageComments and the "
        "score in the derived instance, a domain_shift log line); refuse: an error report "
        "with reason domain_shift instead of the result",
    )
    series_min_slices: int = Field(
        3, ge=1, le=10000, title="Slices before a series verdict",
        description="slices of a series scored before the series' median score may flag "
        "its further slices (a slice scored >= 1.0 is flagged on its own either way)",
    )
