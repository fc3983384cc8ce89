"""The ``[storage]`` and ``[decode]`` sections of the config: what the agent does when its
stores or its disk are full, and the budget of the decoder process. Kept apart from
``agent.config`` only for its size; the byte caps themselves are ``[limits]`` keys."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

MIB = 1024 * 1024


class StorageSection(BaseModel):
    """When the outbox or the disk is full (docs/reliability.md, "Full stores and full
    disk")."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    outbox_full: Literal["backpressure", "drop_oldest"] = Field(
        "backpressure", title="Outbox full policy",
        description="backpressure: stop taking scans (unacked, the edge broker keeps them in "
        "the session) until the cloud takes results; drop_oldest: delete the oldest queued "
        "results to make room, each replaced by an outbox_overflow error report",
    )
    min_free_disk_bytes: int = Field(
        64 * MIB, ge=0, title="Disk reserve",
        description="Free bytes kept on the state directory's filesystem: below it no new "
        "scan is stored (backpressure, status backpressure.reason disk_full), so results can "
        "still be committed and delivered rows deleted",
    )


class DecodeSection(BaseModel):
    """The decoder process: every scan is parsed and decoded in a child process with a
    memory and a time budget (``agent.dicom.sandbox``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    isolate: bool = Field(
        True, title="Decode in a child process",
        description="Decode each scan in a separate process with the budgets below; false "
        "decodes in the daemon itself (its checks still apply, but a decoder plugin's crash "
        "or a runaway parse would take the daemon with it)",
    )
    memory_bytes: int = Field(
        1024 * MIB, ge=64 * MIB, title="Decode memory budget",
        description="Memory the decoder process may allocate beyond what it holds after "
        "start (RLIMIT_DATA); a scan that needs more is reported as decode_budget_exceeded",
    )
    timeout_s: float = Field(
        10.0, gt=0, le=600, title="Decode time budget",
        description="Seconds one scan may take to decode; the process is killed and "
        "restarted past it and the scan reported as decode_budget_exceeded",
    )
