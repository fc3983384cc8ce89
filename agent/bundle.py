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
from typing import Any

BUNDLE_FORMAT = 1
MAX_CONTEXT_SLICES = 8


class BundleError(Exception):
    """A bundle is missing, malformed, or a file does not match its recorded digest."""


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
    misses its floor here does (``agent.guard_cause``)."""

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


def _file(root: Path, spec: dict[str, Any], where: str, verify: bool) -> BundleFile:
    try:
        rel, digest = str(spec["path"]), str(spec["sha256"]).lower()
    except (KeyError, TypeError):
        raise BundleError(f"{where}: expected an object with 'path' and 'sha256'") from None
    path = (root / rel).resolve()
    if root.resolve() not in path.parents:
        raise BundleError(f"{where}.path {rel!r} points outside the bundle")
    if not path.is_file():
        raise BundleError(f"{where}.path: file {rel} is missing from bundle {root}")
    if verify:
        actual = sha256_file(path)
        if actual != digest:
            raise BundleError(
                f"{where}: {rel} has sha256 {actual[:16]}..., bundle.json says {digest[:16]}..."
                ": the file was corrupted or replaced after the bundle was built; reinstall "
                "the bundle (copy it again from its source)"
            )
    return BundleFile(path=path, sha256=digest)


def _golden(file: BundleFile, spec: dict[str, Any], meta_path: Path) -> GoldenSet:
    recorded = spec.get("recorded_psnr_db", {})
    if not isinstance(recorded, dict) or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in recorded.values()):
        raise BundleError(f"{meta_path}: golden.recorded_psnr_db must map runtime names to "
                          f"numbers (dB), got {recorded!r}")
    cpu = spec.get("recorded_cpu")
    return GoldenSet(file.path, file.sha256, float(spec["min_psnr_db"]),
                     recorded_psnr_db={str(k): float(v) for k, v in recorded.items()},
                     recorded_cpu=None if cpu is None else str(cpu))


def load_bundle(root: str | Path, *, verify: bool = True) -> ModelBundle:
    """Read and check a bundle directory. Raises BundleError with a message that says what
    to fix."""
    root = Path(root)
    meta_path = root / "bundle.json"
    if not meta_path.is_file():
        raise BundleError(f"{root} is not a model bundle: bundle.json not found")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise BundleError(f"{meta_path}: cannot read JSON ({exc})") from None
    if meta.get("format") != BUNDLE_FORMAT:
        raise BundleError(f"{meta_path}: format {meta.get('format')!r}, expected {BUNDLE_FORMAT}")
    try:
        inp = meta["input"]
        out = meta["output"]
        norm = Normalisation(**inp.get("normalisation", {}))
        input_contract = InputContract(
            modality=inp["modality"],
            shape=(int(inp["shape"][0]), int(inp["shape"][1])),
            pixel_spacing_mm=(
                float(inp["pixel_spacing_mm"][0]),
                float(inp["pixel_spacing_mm"][1]),
            ),
            channels=int(inp.get("channels", 1)),
            context_slices=int(inp.get("context_slices", 0)),
            slice_spacing_mm=(None if inp.get("slice_spacing_mm") is None
                              else float(inp["slice_spacing_mm"])),
            series_description_pattern=inp.get("series_description_pattern"),
            photometric_interpretations=tuple(
                inp.get("photometric_interpretations", ["MONOCHROME2"])
            ),
            bits_allocated=tuple(int(b) for b in inp.get("bits_allocated", [8, 16])),
            normalisation=norm,
            input_name=inp.get("tensor_name", "input"),
        )
        output_contract = OutputContract(
            modality=out["modality"],
            scale=float(out["scale"]),
            rescale_slope=float(out.get("rescale_slope", 1.0)),
            rescale_intercept=float(out.get("rescale_intercept", 0.0)),
            units=str(out.get("units", "arbitrary")),
            series_description=str(
                out.get("series_description", OutputContract.series_description)
            ),
            output_name=out.get("tensor_name", "output"),
        )
        backends = {
            name: _file(root, spec, f"backends.{name}", verify)
            for name, spec in meta["backends"].items()
        }
        reference = None
        if "reference" in meta:
            reference = _file(root, meta["reference"], "reference", verify)
        references = {
            name: _file(root, spec, f"references.{name}", verify)
            for name, spec in meta.get("references", {}).items()
        }
        gmac = meta.get("compute", {}).get("gmac")
        golden = None
        if "golden" in meta:
            g = _file(root, meta["golden"], "golden", verify)
            golden = _golden(g, meta["golden"], meta_path)
        if not 0 <= input_contract.context_slices <= MAX_CONTEXT_SLICES:
            raise BundleError(f"{meta_path}: input.context_slices must be 0 (2D) to "
                              f"{MAX_CONTEXT_SLICES}, got {input_contract.context_slices}")
        if input_contract.channels < 1:
            raise BundleError(f"{meta_path}: input.channels must be at least 1")
        spacing = input_contract.slice_spacing_mm
        if spacing is not None and not spacing > 0:
            raise BundleError(f"{meta_path}: input.slice_spacing_mm must be positive")
        card = root / meta["model_card"] if meta.get("model_card") else None
        return ModelBundle(
            root=root,
            name=str(meta["name"]),
            version=str(meta["version"]),
            task=str(meta.get("task", "")),
            precision=str(meta.get("precision", "int8")),
            input=input_contract,
            output=output_contract,
            backends=backends,
            reference=reference,
            golden=golden,
            model_card=card,
            references=references,
            gmac=None if gmac is None else float(gmac),
        )
    except KeyError as exc:
        raise BundleError(f"{meta_path}: missing key {exc.args[0]!r}") from None
    except (TypeError, ValueError, IndexError) as exc:
        raise BundleError(f"{meta_path}: malformed value ({exc})") from None
