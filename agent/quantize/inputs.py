"""Model inputs from an operator's DICOM directory, pre-processed exactly as the agent serves
them, and split into a calibration part and a held-out golden part.

Each file is decoded with ``agent.dicom.decode.decode_scan`` against the input contract,
put on the model grid (``agent.model.preprocess.to_model_grid``) and normalised
(``agent.model.preprocess.normalise``). A file that is not usable is skipped and counted by
reason, never fatal. For a 2.5D contract (``context_slices`` = k > 0) the stacks are the ones the
agent would build: the agent's own series assembly (``agent.dicom.series``) groups the slices,
orders them along the slice normal and finds each slice's k neighbours each side by
position, repeating the nearest slice where one is missing or past a series' ends; the
[2k+1, H, W] stack is normalised by its centre slice.

Nothing here names a patient: series are reported by a short hash of their UID, files by the
sha256 of their bytes (the report travels inside the bundle); paths are only for the console.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import numpy.typing as npt

from agent.config import LimitsSection
from agent.dicom.decode import ScanRejected, decode_scan
from agent.dicom.series import SeriesAssembler, SliceInfo, SliceRefused, slice_info, slice_position
from agent.model.bundle import InputContract
from agent.model.preprocess import normalise, to_model_grid

Floats = npt.NDArray[np.float32]
_LIMITS = LimitsSection()  # the daemon's defaults: the same files are refused here
MAX_PAYLOAD_BYTES, PIXEL_BUDGET = _LIMITS.max_payload_bytes, _LIMITS.pixel_budget
SPACING_TOLERANCE = 0.1  # a series whose slice gap is off the contract's by more: warned


@dataclass(frozen=True)
class Skipped:
    """A file that gave no model input, and why (``reason`` is a short code)."""

    path: str  # relative to the DICOM directory: console only
    sha256: str
    reason: str
    detail: str


@dataclass(frozen=True)
class ModelInput:
    """One model input, normalised: float32 [C, H, W]."""

    array: Floats
    series: str  # short hash of the Series Instance UID
    position_mm: float | None  # along the slice normal, when the header gives it
    sha256: str  # of the (centre) slice's file


@dataclass
class Collected:
    """What a DICOM directory gave: the usable inputs in a deterministic order (series, then
    position), the skipped files, and warnings about the data."""

    inputs: list[ModelInput]
    files_seen: int
    skipped: list[Skipped] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def skipped_by_reason(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for s in self.skipped:
            counts[s.reason] = counts.get(s.reason, 0) + 1
        return dict(sorted(counts.items()))


@dataclass
class _Slice:
    grid: Floats  # model grid [H, W], not normalised
    series: str
    position: float | None
    instance: int
    sha256: str
    path: str
    info: SliceInfo | None  # where the agent's series assembly places it (2.5D only)


def _series_hash(uid: str) -> str:
    return hashlib.sha256(uid.encode()).hexdigest()[:10]


def list_files(root: Path) -> list[Path]:
    """Every file under ``root``, in a stable order."""
    return sorted(p for p in root.rglob("*") if p.is_file())


def _read(path: Path, root: Path, contract: InputContract) -> _Slice | Skipped:
    rel = str(path.relative_to(root))
    try:
        if path.stat().st_size > MAX_PAYLOAD_BYTES:  # do not read a huge stray file
            return Skipped(rel, "", "payload_too_large",
                           f"{path.stat().st_size} bytes, cap {MAX_PAYLOAD_BYTES}")
        payload = path.read_bytes()
    except OSError as exc:
        return Skipped(rel, "", "unreadable", exc.strerror or type(exc).__name__)
    digest = hashlib.sha256(payload).hexdigest()
    try:
        scan = decode_scan(payload, contract, pixel_budget=PIXEL_BUDGET,
                           max_payload_bytes=MAX_PAYLOAD_BYTES)
        grid, _gmap = to_model_grid(scan.pixels, scan.pixel_spacing, contract)
    except ScanRejected as exc:
        return Skipped(rel, digest, exc.reason, exc.message)
    except ValueError as exc:
        return Skipped(rel, digest, "bad_geometry", str(exc))
    ds = scan.dataset
    position = slice_position(ds.get("ImageOrientationPatient"), ds.get("ImagePositionPatient"))
    try:
        instance = int(ds.get("InstanceNumber") or 0)
    except (TypeError, ValueError):
        instance = 0
    info = None
    if contract.context_slices > 0:
        try:
            info = slice_info(scan)
        except ScanRejected as exc:
            return Skipped(rel, digest, exc.reason, exc.message)
    return _Slice(grid, _series_hash(scan.series_instance_uid), position, instance, digest, rel,
                  info)


def _stacks(slices: list[_Slice], k: int, skipped: list[Skipped]) -> dict[int, list[int]]:
    """Index of each usable slice -> the indices of its 2k + 1 slots, as the agent's series
    assembly builds them once every series is complete. Slices it refuses are skipped."""
    assembler = SeriesAssembler(k, max_open=len(slices) + 1, max_slices=len(slices) + 1,
                                idle_timeout_s=math.inf)
    for i, s in enumerate(slices):
        assert s.info is not None
        try:
            if not assembler.add(s.info, i, 0.0):
                skipped.append(Skipped(s.path, s.sha256, "duplicate",
                                       "the same SOP Instance UID as another file"))
        except SliceRefused as exc:
            skipped.append(Skipped(s.path, s.sha256, exc.reason, str(exc)))
    assembler.close_all("complete")
    return {job.centre: list(job.slots) for job in assembler.take_ready(0.0)}


def _check_spacing(series: list[_Slice], contract: InputContract) -> str | None:
    want = contract.slice_spacing_mm
    positions = [s.position for s in series if s.position is not None]
    if want is None or len(positions) < 2:
        return None
    gap = float(np.median(np.diff(np.asarray(positions))))
    if abs(gap - want) > SPACING_TOLERANCE * want:
        return (f"series {series[0].series}: slice spacing {gap:.3g} mm, the contract says "
                f"{want:g} mm (the model's neighbours will not be where it expects)")
    return None


def collect_inputs(
    root: Path, contract: InputContract, files: list[Path] | None = None,
    tick: Callable[[], None] | None = None,
) -> Collected:
    """Decode ``files`` (default: every file under ``root``) into model inputs, see the
    module docstring. ``tick`` is called once per file (progress)."""
    files = list_files(root) if files is None else files
    slices: list[_Slice] = []
    skipped: list[Skipped] = []
    seen: set[str] = set()
    k = contract.context_slices
    for path in files:
        got = _read(path, root, contract)
        if tick is not None:
            tick()
        if isinstance(got, Skipped):
            skipped.append(got)
        elif got.sha256 in seen:
            skipped.append(Skipped(got.path, got.sha256, "duplicate", "same bytes as another file"))
        else:
            seen.add(got.sha256)
            slices.append(got)
    stacks = _stacks(slices, k, skipped) if k > 0 else {i: [i] for i in range(len(slices))}
    by_series: dict[str, list[int]] = {}
    for i in stacks:
        by_series.setdefault(slices[i].series, []).append(i)
    out = Collected(inputs=[], files_seen=len(files), skipped=skipped)
    for key in sorted(by_series):
        order = sorted(by_series[key], key=lambda i: (
            slices[i].position if slices[i].position is not None else 0.0,
            slices[i].instance, slices[i].sha256))
        series = [slices[i] for i in order]
        if k > 0 and (warning := _check_spacing(series, contract)) is not None:
            out.warnings.append(warning)
        for i in order:
            s = slices[i]
            raw = np.stack([slices[j].grid for j in stacks[i]])
            array = normalise(raw, contract.normalisation).astype(np.float32, copy=False)
            if not np.any(array[k]):  # nothing above zero in the (centre) slice
                out.skipped.append(Skipped(s.path, s.sha256, "empty_slice",
                                           "no signal after normalisation"))
                continue
            out.inputs.append(ModelInput(array, s.series, s.position, s.sha256))
    return out


@dataclass(frozen=True)
class Split:
    """Indices into ``Collected.inputs``: calibration and golden never overlap; ``check`` is
    a subset of calibration used to judge candidates alongside the golden set."""

    calibration: list[int]
    golden: list[int]
    check: list[int]


def evenly_spaced(n: int, count: int, *, inner: bool = False) -> list[int]:
    """``count`` distinct indices spread over range(n); ``inner`` avoids both ends."""
    count = min(count, n)
    if count <= 0:
        return []
    points = np.linspace(0, n - 1, count + 2)[1:-1] if inner else np.linspace(0, n - 1, count)
    picks = sorted({int(np.rint(p)) for p in points})
    spare = (i for i in range(n) if i not in set(picks))
    while len(picks) < count:  # rounding collided: fill deterministically
        picks.append(next(spare))
    return sorted(picks)


def split_inputs(n: int, golden: int, calibration: int, check: int) -> Split:
    """Deterministic split of ``n`` ordered inputs: ``golden`` held out (spread over the
    order, so over series and anatomy), at most ``calibration`` of the rest, and ``check``
    of those for candidate selection."""
    held = evenly_spaced(n, golden, inner=True)
    rest = [i for i in range(n) if i not in set(held)]
    calib = [rest[i] for i in evenly_spaced(len(rest), calibration)]
    chk = [calib[i] for i in evenly_spaced(len(calib), check)]
    return Split(calibration=calib, golden=held, check=chk)
