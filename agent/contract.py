"""The model contract an operator writes for ``iomt-agent model quantize`` (CONTRACT.toml).

It holds what ``bundle.json`` says besides its files: name, version and task, the input
contract (what scans the model takes and how they become model input), the output contract
(how model output becomes a stored DICOM value) and the fidelity floor that gates activation
(the int8 model's golden PSNR against its fp32 reference). ``docs/quantize.md`` has an
example. Unknown keys are errors, and every problem is reported with its key path, as in
``agent/config.py``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator

from agent.bundle import MAX_CONTEXT_SLICES, InputContract, Normalisation, OutputContract
from agent.config import ConfigError, Strict, read_text, validate_toml

NOT_FOR_DIAGNOSTIC_USE = "NOT FOR DIAGNOSTIC USE"
_NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"


class ContractError(ConfigError):
    """CONTRACT.toml cannot be used. ``problems`` holds one line per bad key."""

    what = "model contract"


class NormalisationSpec(Strict):
    """How decoded pixel values become model input (``agent.preprocess.normalise``)."""

    method: Literal["robust_max"] = Field(
        "robust_max", title="Method",
        description="robust_max: divide by a percentile of the non-zero pixels, then clip")
    percentile: float = Field(
        99.5, gt=0, le=100, title="Percentile",
        description="the percentile of the (centre) slice's non-zero pixels that maps to 1.0")
    clip_max: float = Field(
        1.5, gt=0, title="Clip maximum", description="normalised values are clipped to [0, this]")


class InputSpec(Strict):
    """What a scan must look like to be fed to the model."""

    modality: str = Field(
        min_length=1, max_length=16, title="Modality", description="DICOM Modality, e.g. MR or CT")
    shape: tuple[int, int] = Field(
        title="Model grid", description="[rows, columns] of the model input")
    pixel_spacing_mm: tuple[float, float] = Field(
        title="Model pixel spacing", description="[row, column] spacing of the model grid, mm")
    channels: int = Field(
        1, ge=1, le=1, title="Channels per slice",
        description="samples per slice; the agent decodes grey-scale DICOM, so 1")
    context_slices: int = Field(
        0, ge=0, le=MAX_CONTEXT_SLICES, title="Context slices (2.5D)",
        description="0 = 2D; k = the model also sees k neighbouring slices each side")
    slice_spacing_mm: float | None = Field(
        None, gt=0, title="Slice spacing (2.5D)",
        description="the slice spacing the 2.5D model was trained on, mm")
    series_description_pattern: str | None = Field(
        None, title="Series description pattern",
        description="regular expression (case-insensitive search) a scan's SeriesDescription "
        "must match; unset: any series")
    photometric_interpretations: tuple[Literal["MONOCHROME1", "MONOCHROME2"], ...] = Field(
        ("MONOCHROME2",), min_length=1, title="Photometric interpretations",
        description="accepted PhotometricInterpretation values (MONOCHROME1 is inverted)")
    bits_allocated: tuple[Literal[8, 16, 32], ...] = Field(
        (8, 16), min_length=1, title="Bits allocated", description="accepted BitsAllocated values")
    normalisation: NormalisationSpec = Field(
        default_factory=NormalisationSpec, title="Normalisation",
        description="how pixel values become model input")
    tensor_name: str = Field(
        "input", min_length=1, title="Input tensor", description="the model's input tensor name")

    @field_validator("shape")
    @classmethod
    def _shape(cls, value: tuple[int, int]) -> tuple[int, int]:
        if not all(1 <= v <= 4096 for v in value):
            raise ValueError("rows and columns must be between 1 and 4096")
        return value

    @field_validator("pixel_spacing_mm")
    @classmethod
    def _spacing(cls, value: tuple[float, float]) -> tuple[float, float]:
        if not all(0 < v <= 100 for v in value):
            raise ValueError("spacings must be positive mm, at most 100")
        return value

    @field_validator("series_description_pattern")
    @classmethod
    def _pattern(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                re.compile(value)
            except re.error as exc:
                raise ValueError(f"not a regular expression ({exc})") from None
        return value


class OutputSpec(Strict):
    """What the model produces and how it is stored in the derived instance."""

    modality: str = Field(
        min_length=1, max_length=16, title="Modality", description="Modality of the output")
    scale: float = Field(
        gt=0, title="Output scale", description="model output 1.0 == this stored value")
    rescale_slope: float = Field(
        1.0, title="Rescale slope", description="RescaleSlope written to the output")
    rescale_intercept: float = Field(
        0.0, title="Rescale intercept", description="RescaleIntercept written to the output")
    units: str = Field("arbitrary", title="Units", description="what the rescaled values mean")
    series_description: str = Field(
        f"SYNTHETIC - {NOT_FOR_DIAGNOSTIC_USE}", title="Series description",
        description=f"SeriesDescription of the output; must say {NOT_FOR_DIAGNOSTIC_USE}")
    tensor_name: str = Field(
        "output", min_length=1, title="Output tensor", description="the model's output tensor")

    @field_validator("rescale_slope")
    @classmethod
    def _slope(cls, value: float) -> float:
        if value == 0:
            raise ValueError("must not be 0")
        return value

    @field_validator("series_description")
    @classmethod
    def _label(cls, value: str) -> str:
        if NOT_FOR_DIAGNOSTIC_USE not in value.upper():
            raise ValueError(f"must contain {NOT_FOR_DIAGNOSTIC_USE!r}: every output is "
                             "labelled synthetic")
        return value


class FidelitySpec(Strict):
    """The floor that gates activation on every node (``agent.guard``)."""

    min_psnr_db: float = Field(
        gt=0, le=150, title="Fidelity floor",
        description="int8-vs-fp32 PSNR (dB) on the golden set, worst of pooled and per input")


class Contract(Strict):
    """CONTRACT.toml: everything bundle.json holds besides its files."""

    name: str = Field(pattern=_NAME, title="Bundle name", description="letters, digits, . _ -")
    version: str = Field(min_length=1, max_length=64, title="Version", description="e.g. 1.0.0")
    task: str = Field(min_length=1, title="Task", description="what the model does, one line")
    input: InputSpec = Field(title="Input contract", description="what the model takes")
    output: OutputSpec = Field(title="Output contract", description="what the model produces")
    fidelity: FidelitySpec = Field(title="Fidelity floor", description="the activation gate")

    @property
    def input_channels(self) -> int:
        """Channels of the model input tensor: one per slice of the 2.5D stack."""
        return self.input.channels * (2 * self.input.context_slices + 1)

    def input_contract(self) -> InputContract:
        """The contract as the agent reads it back from bundle.json."""
        i = self.input
        return InputContract(
            modality=i.modality, shape=i.shape, pixel_spacing_mm=i.pixel_spacing_mm,
            channels=i.channels, context_slices=i.context_slices,
            slice_spacing_mm=i.slice_spacing_mm,
            series_description_pattern=i.series_description_pattern,
            photometric_interpretations=tuple(i.photometric_interpretations),
            bits_allocated=tuple(i.bits_allocated),
            normalisation=Normalisation(**i.normalisation.model_dump()),
            input_name=i.tensor_name)

    def output_contract(self) -> OutputContract:
        o = self.output
        return OutputContract(
            modality=o.modality, scale=o.scale, rescale_slope=o.rescale_slope,
            rescale_intercept=o.rescale_intercept, units=o.units,
            series_description=o.series_description, output_name=o.tensor_name)

    def bundle_sections(self) -> dict[str, Any]:
        """``input`` and ``output`` of bundle.json (format 1, see agent/bundle.py)."""
        i, o = self.input.model_dump(), self.output.model_dump()
        for section in (i, o):
            for key, value in section.items():
                if isinstance(value, tuple):
                    section[key] = list(value)
        if i["slice_spacing_mm"] is None:
            del i["slice_spacing_mm"]
        return {"input": i, "output": o}


def parse_contract(text: str, source: str = "<string>") -> Contract:
    """Parse TOML text into a Contract, or raise ContractError listing every bad key path."""
    return validate_toml(text, source, Contract, ContractError, "docs/quantize.md")


def load_contract(path: str | Path) -> Contract:
    """Read and validate CONTRACT.toml."""
    path = Path(path)
    return parse_contract(read_text(path, ContractError), str(path))
