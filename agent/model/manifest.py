"""The one schema of ``bundle.json`` (format 1): the loader reads it, the writers build it.

``agent/model/bundle.py`` validates every bundle.json through ``BundleManifest`` before it looks
at a file, so an unknown key, a wrong type or a malformed digest is reported with its key
path (``input.shape``, ``backends.litert.sha256``) exactly as config errors are. The
bundle writers (``iomt-agent model quantize`` and ``models/recipes/build_bundle.py``) build
the same model, so what they write is what the loader accepts. ``CONTRACT.toml``
(``agent/model/contract.py``) shares the ``input`` and ``output`` sections. Format:
``docs/bundle.md``.
"""

from __future__ import annotations

import json
import re
from pathlib import PurePosixPath
from typing import Any, Literal

from pydantic import Field, field_validator

from agent.config import Strict

BUNDLE_FORMAT = 1
MAX_CONTEXT_SLICES = 8
NOT_FOR_DIAGNOSTIC_USE = "NOT FOR DIAGNOSTIC USE"
RUNTIMES = ("onnxruntime", "litert")
_NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
_SHA256 = r"^[0-9a-f]{64}$"

Runtime = Literal["onnxruntime", "litert"]


class NormalisationSpec(Strict):
    """How decoded pixel values become model input (``agent.model.preprocess.normalise``)."""

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


class FileEntry(Strict):
    """One file of the bundle and its digest."""

    path: str = Field(
        min_length=1, title="Path", description="file name relative to the bundle directory")
    sha256: str = Field(
        pattern=_SHA256, title="SHA-256",
        description="64 lower-case hex digits; checked before the file is used")

    @field_validator("path")
    @classmethod
    def _relative(cls, value: str) -> str:
        path = PurePosixPath(value)
        if path.is_absolute() or ".." in path.parts or "\\" in value:
            raise ValueError("must be a path inside the bundle (relative, no '..')")
        return value


class GoldenEntry(FileEntry):
    """The golden set and the floor that gates activation (``agent.model.guard``)."""

    min_psnr_db: float = Field(
        gt=0, le=150, title="Fidelity floor",
        description="int8-vs-fp32 PSNR (dB) on the golden set, worst of pooled and per input")
    recorded_psnr_db: dict[Runtime, float] = Field(
        default_factory=dict, title="Recorded golden PSNR",
        description="runtime -> the worst golden PSNR (dB) its served file gave where the "
        "bundle was built; lets the guard tell this CPU's kernels from a bundle that never "
        "passed")
    recorded_cpu: str | None = Field(
        None, min_length=1, title="Recorded on",
        description="the CPU of the machine that recorded recorded_psnr_db")


class ComputeSpec(Strict):
    """What one inference costs, for ``iomt-agent bench``."""

    gmac: float | None = Field(
        None, gt=0, title="GMAC", description="multiply-accumulates per inference, 1e9")


class BundleManifest(Strict):
    """bundle.json."""

    format: Literal[1] = Field(title="Format", description="bundle format version: 1")
    name: str = Field(pattern=_NAME, title="Bundle name", description="letters, digits, . _ -")
    version: str = Field(min_length=1, max_length=64, title="Version", description="e.g. 1.0.0")
    task: str = Field("", title="Task", description="what the model does, one line")
    precision: Literal["int8", "fp32", "float32"] = Field(
        "int8", title="Precision",
        description="precision of the served files; int8 needs a golden set")
    input: InputSpec = Field(title="Input contract", description="what the model takes")
    output: OutputSpec = Field(title="Output contract", description="what the model produces")
    backends: dict[Runtime, FileEntry] = Field(
        title="Served files",
        description="runtime name (onnxruntime, litert) -> the file it serves; a runtime "
        "without one is not offered (bench still times the fp32 files)")
    reference: FileEntry | None = Field(
        None, title="fp32 reference",
        description="the fp32 ONNX model the golden outputs come from")
    references: dict[Runtime, FileEntry] = Field(
        default_factory=dict, title="fp32 files of other runtimes",
        description="runtime name -> its fp32 file (bench and backend = \"auto\" use them)")
    golden: GoldenEntry | None = Field(
        None, title="Golden set", description="golden.npz and the floor that gates activation")
    domain: FileEntry | None = Field(
        None, title="Domain reference",
        description="domain.json: statistics of the training inputs and the threshold of the "
        "domain-shift score (absent: results go out unscored, status notes "
        "no_domain_reference)")
    compute: ComputeSpec | None = Field(
        None, title="Compute", description="cost of one inference")
    model_card: str | None = Field(
        None, min_length=1, title="Model card", description="MODEL_CARD.md, relative path")

    @field_validator("model_card")
    @classmethod
    def _card_inside(cls, value: str | None) -> str | None:
        if value is not None:
            FileEntry._relative(value)
        return value

    def to_json(self) -> str:
        """The file's text: two-space indent, short lists of scalars on one line."""
        data = self.model_dump(mode="json", exclude_none=True)
        if not data.get("references"):
            data.pop("references", None)
        if data.get("golden") and not data["golden"].get("recorded_psnr_db"):
            data["golden"].pop("recorded_psnr_db", None)
        text = json.dumps(data, indent=2)
        return re.sub(r"\[\s+([^\[\]{}]*?)\s+\]",
                      lambda m: "[" + ", ".join(p.strip() for p in m.group(1).split(",")) + "]",
                      text) + "\n"


def manifest_dict(manifest: BundleManifest) -> dict[str, Any]:
    """The manifest as plain JSON values (what ``to_json`` writes)."""
    data: dict[str, Any] = json.loads(manifest.to_json())
    return data
