"""The ``[deid]`` section of the config: de-identification before sealing (PS3.15 Annex E,
``agent.dicom.deid``). Kept apart from ``agent.config`` only for its size."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field


class DeidSection(BaseModel):
    """De-identification of the derived instance before it is sealed."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = Field(
        True, title="De-identify",
        description="Apply the PS3.15 Basic Application Level Confidentiality Profile to the "
        "derived instance before sealing; false sends the patient and study modules as the "
        "scan has them (inside the sealed envelope)",
    )
    secret_file: Path = Field(
        Path("keys/site-deid.key"), title="Site secret",
        description="The site's de-identification secret (0600, written by `iomt-agent init`): "
        "keys the UID pseudonyms and date offsets; the same file on every node of a site",
    )
    retain_modified_dates: bool = Field(
        False, title="Retain modified dates (113107)",
        description="Shift dates back by a per-patient offset instead of removing them",
    )
    retain_patient_characteristics: bool = Field(
        False, title="Retain patient characteristics (113108)",
        description="Keep sex, age, size, weight and the like",
    )
    retain_device_identity: bool = Field(
        False, title="Retain device identity (113109)",
        description="Keep the scanner's station name, serial number and device UIDs",
    )
