"""Model bundles: a directory with ``bundle.json``, the model files and a model card.

The bundle is the contract between the operator who builds a model and the agent that
serves it: what the model expects (modality, grid, normalisation), what it produces, which
files implement it (with their sha256) and the golden set that gates activation.
See ``docs/bundle.md`` for the format.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import ValidationError

from agent.config import describe_errors
from agent.errors import AgentError
from agent.model.domain_reference import DomainReference, DomainReferenceError, load_reference
from agent.model.manifest import (
    BUNDLE_FORMAT,
    MAX_CONTEXT_SLICES,
    BundleManifest,
    FileEntry,
    InputSpec,
    OutputSpec,
)

__all__ = ["BUNDLE_FORMAT", "MAX_CONTEXT_SLICES", "BundleError", "BundleFile", "GoldenSet",
           "InputContract", "ModelBundle", "Normalisation", "OutputContract", "input_contract",
           "load_bundle", "output_contract", "read_manifest", "sha256_file"]


class BundleError(AgentError):
    """A bundle is missing, malformed, or a file does not match its recorded digest.
    ``problems``: one line per bad key of bundle.json, each starting with its key path."""

    def __init__(self, message: str, problems: list[str] | None = None) -> None:
        super().__init__(message)
        self.problems = problems or [message]


@dataclass(frozen=True)
class Normalisation:
    """How raw (rescaled) pixel values become model input.

    ``robust_max``: divide by the given percentile of the slice's non-zero pixels, then clip
    to ``[0, clip_max]``. The model output is on a fixed scale (see ``OutputContract.scale``).
    """

    method: str = "robust_max"
    percentile: float = 99.5
    clip_max: float = 1.5


@dataclass(frozen=True)
class InputContract:
    """What a scan must look like to be fed to the model."""

    modality: str
    shape: tuple[int, int]  # rows, columns of the model grid
    pixel_spacing_mm: tuple[float, float]  # row spacing, column spacing of the model grid
    channels: int = 1
    context_slices: int = 0  # 0 = 2D; k = k neighbours each side (2.5D)
    slice_spacing_mm: float | None = None  # 2.5D: the slice spacing the model was trained on
    series_description_pattern: str | None = None  # regex, case-insensitive search
    photometric_interpretations: tuple[str, ...] = ("MONOCHROME2",)
    bits_allocated: tuple[int, ...] = (8, 16)
    normalisation: Normalisation = field(default_factory=Normalisation)
    input_name: str = "input"


@dataclass(frozen=True)
class OutputContract:
    """What the model produces and how it is stored in the derived instance."""

    modality: str
    scale: float  # model output 1.0 == this stored value (before rescale)
    rescale_slope: float = 1.0
    rescale_intercept: float = 0.0
    units: str = "arbitrary"
    series_description: str = "SYNTHETIC - NOT FOR DIAGNOSTIC USE"
    output_name: str = "output"


@dataclass(frozen=True)
class BundleFile:
    path: Path
    sha256: str


@dataclass(frozen=True)
class GoldenSet:
    """Golden inputs with fp32 reference outputs and the floor that gates activation.

    ``recorded_psnr_db``: the worst golden PSNR each runtime's served file gave where the
    bundle was built (``golden.recorded_psnr_db``; optional), and ``recorded_cpu`` that
    machine's CPU. The guard compares them with this CPU's figures to say why a model that
    misses its floor here does (``agent.model.guard_cause``)."""

    path: Path
    sha256: str
    min_psnr_db: float
    recorded_psnr_db: dict[str, float] = field(default_factory=dict)
    recorded_cpu: str | None = None


@dataclass(frozen=True)
class ModelBundle:
    root: Path
    name: str
    version: str
    task: str
    precision: str
    input: InputContract
    output: OutputContract
    backends: dict[str, BundleFile]  # runtime name -> served (int8) model file
    reference: BundleFile | None  # fp32 reference model (ONNX)
    golden: GoldenSet | None
    model_card: Path | None
    references: dict[str, BundleFile] = field(default_factory=dict)  # fp32, other runtimes
    gmac: float | None = None  # multiply-accumulates per inference of one item, 1e9
    domain: DomainReference | None = None  # domain.json: the domain-shift score's reference

    def backend_file(self, runtime: str) -> BundleFile:
        try:
            return self.backends[runtime]
        except KeyError:
            have = ", ".join(sorted(self.backends)) or "none"
            raise BundleError(
                f"bundle {self.name} has no file for runtime {runtime!r} (it has: {have})"
            ) from None

    @property
    def input_channels(self) -> int:
        """Channels of the model's input tensor: the contract's channels for each of the
        2 * context_slices + 1 slices of a 2.5D stack."""
        return self.input.channels * (2 * self.input.context_slices + 1)

    def reference_file(self, runtime: str) -> BundleFile | None:
        """The fp32 model file for ``runtime``: ``reference`` (ONNX, the source of the golden
        outputs) for onnxruntime, ``references.<runtime>`` for the others (optional)."""
        if runtime == "onnxruntime":
            return self.reference
        return self.references.get(runtime)

    def digest(self, runtime: str = "onnxruntime") -> str:
        """The model digest: sha256 of the served model file (hex)."""
        return self.backend_file(runtime).sha256


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _file(root: Path, entry: FileEntry, where: str, verify: bool) -> BundleFile:
    path = (root / entry.path).resolve()
    if root.resolve() not in path.parents:  # a symlink that leaves the bundle
        raise BundleError(f"{where}.path {entry.path!r} points outside the bundle")
    if not path.is_file():
        raise BundleError(f"{where}.path: file {entry.path} is missing from bundle {root}")
    if verify:
        actual = sha256_file(path)
        if actual != entry.sha256:
            raise BundleError(
                f"{where}: {entry.path} has sha256 {actual[:16]}..., bundle.json says "
                f"{entry.sha256[:16]}...: the file was corrupted or replaced after the bundle "
                "was built; reinstall the bundle (copy it again from its source)")
    return BundleFile(path=path, sha256=entry.sha256)


def input_contract(spec: InputSpec) -> InputContract:
    """The runtime view of bundle.json's (or CONTRACT.toml's) ``input`` section."""
    return InputContract(
        modality=spec.modality, shape=spec.shape, pixel_spacing_mm=spec.pixel_spacing_mm,
        channels=spec.channels, context_slices=spec.context_slices,
        slice_spacing_mm=spec.slice_spacing_mm,
        series_description_pattern=spec.series_description_pattern,
        photometric_interpretations=tuple(spec.photometric_interpretations),
        bits_allocated=tuple(spec.bits_allocated),
        normalisation=Normalisation(**spec.normalisation.model_dump()),
        input_name=spec.tensor_name)


def output_contract(spec: OutputSpec) -> OutputContract:
    """The runtime view of the ``output`` section."""
    return OutputContract(
        modality=spec.modality, scale=spec.scale, rescale_slope=spec.rescale_slope,
        rescale_intercept=spec.rescale_intercept, units=spec.units,
        series_description=spec.series_description, output_name=spec.tensor_name)


def read_manifest(root: str | Path) -> BundleManifest:
    """bundle.json of ``root`` checked against the schema, or BundleError naming every bad
    key path."""
    meta_path = Path(root) / "bundle.json"
    if Path(root).is_file():
        raise BundleError(f"{root} is a file, not a model bundle: give the directory that "
                          "holds bundle.json")
    if not meta_path.is_file():
        raise BundleError(f"{root} is not a model bundle: bundle.json not found")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"{meta_path}: cannot read JSON ({exc})") from None
    if not isinstance(meta, dict):
        raise BundleError(f"{meta_path}: expected a JSON object at the top level")
    if meta.get("format") != BUNDLE_FORMAT:
        raise BundleError(f"{meta_path}: format {meta.get('format')!r}, this agent reads "
                          f"format {BUNDLE_FORMAT} (a newer bundle needs a newer agent)")
    try:
        return BundleManifest.model_validate(meta)
    except ValidationError as exc:
        problems = describe_errors(exc, "docs/bundle.md")
        raise BundleError(f"{meta_path}: " + "; ".join(problems), problems) from None


def load_bundle(root: str | Path, *, verify: bool = True) -> ModelBundle:
    """Read and check a bundle directory. Raises BundleError with a message that says what
    to fix."""
    root = Path(root)
    m = read_manifest(root)
    backends: dict[str, BundleFile] = {
        name: _file(root, entry, f"backends.{name}", verify)
                for name, entry in m.backends.items()}
    references: dict[str, BundleFile] = {
        name: _file(root, entry, f"references.{name}", verify)
                  for name, entry in m.references.items()}
    reference = None if m.reference is None else _file(root, m.reference, "reference", verify)
    golden = None
    if m.golden is not None:
        g = _file(root, m.golden, "golden", verify)
        recorded = {str(rt): db for rt, db in m.golden.recorded_psnr_db.items()}
        golden = GoldenSet(g.path, g.sha256, m.golden.min_psnr_db, recorded_psnr_db=recorded,
                           recorded_cpu=m.golden.recorded_cpu)
    domain = None
    if m.domain is not None:
        d = _file(root, m.domain, "domain", verify)
        try:
            domain = load_reference(d.path)
        except DomainReferenceError as exc:
            raise BundleError(f"domain: {exc}; rebuild the reference (docs/bundle.md)") from None
    return ModelBundle(
        root=root,
        name=m.name,
        version=m.version,
        task=m.task,
        precision=m.precision,
        input=input_contract(m.input),
        output=output_contract(m.output),
        backends=backends,
        reference=reference,
        golden=golden,
        model_card=None if m.model_card is None else root / m.model_card,
        references=references,
        gmac=None if m.compute is None else m.compute.gmac,
        domain=domain,
    )
