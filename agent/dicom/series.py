"""Series assembly for 2.5D models: which slices of a series can go through the model.

A 2.5D model sees a slice with its ``k`` neighbours on each side. Slices arrive over MQTT
one instance at a time, in any order, some twice, some never. ``SeriesAssembler`` keeps the
geometry of every slice it was given (no pixels: the payloads stay in the inbox) and
decides when each slice is ready:

* slices are grouped by Series Instance UID, acquisition number, orientation, matrix and
  pixel spacing (a localizer with three orientations in one series makes three groups);
* in a group they are ordered by their position along the slice normal (the
  ImageOrientationPatient row x column cross product, dotted with ImagePositionPatient);
* a slice is ready as soon as the slices at +-1..k slice spacings are present (the spacing
  from SpacingBetweenSlices; without it, or when the slices contradict it, the slices of a
  series wait for it to close, since gaps between the slices that have arrived so far do
  not tell the spacing);
* a group *closes* when it holds as many slices as its headers announce
  (ImagesInAcquisition), when no slice has arrived for ``idle_timeout_s``, or when it is the
  least recently active group and a new one needs its place (``max_open``). Then every
  slice not yet sent goes, with the missing neighbours padded by repeating the nearest
  slice towards the centre (so the first and last slices of a series see themselves);
* a sent slice whose every slot within k spacings holds a sent slice can be released
  early; once a closed group has sent all its slices, the rest of its rows can.

Pure bookkeeping: no I/O, no clock of its own (``now`` is passed in), so it is tested
directly and the daemon rebuilds it from the inbox after a restart.
"""

from __future__ import annotations

import hashlib
import math
from bisect import insort
from dataclasses import dataclass, field

import numpy as np

from agent.dicom.decode import Scan, ScanRejected
from agent.errors import ReasonedError

POSITION_TOLERANCE = 0.25  # a neighbour may sit this fraction of a spacing off its slot
SAME_POSITION = 0.05  # two slices closer than this fraction of a spacing share a slot


@dataclass(frozen=True)
class SliceInfo:
    """Where one slice sits in its series. Holds no PHI: the group key is a hash."""

    group: str  # hash of series UID, orientation, matrix and pixel spacing
    sop_instance_uid: str
    position_mm: float  # along the slice normal
    spacing_mm: float | None  # SpacingBetweenSlices, when the header gives it
    expected: int | None  # ImagesInAcquisition, when the header gives it


def _floats(value: object, count: int) -> list[float] | None:
    try:
        out = [float(v) for v in value]  # type: ignore[attr-defined]
    except (TypeError, ValueError):
        return None
    return out if len(out) == count and all(math.isfinite(v) for v in out) else None


def _positive(value: object) -> float | None:
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) and number > 0 else None


def slice_position(orientation: object, position: object) -> float | None:
    """Distance of a slice along its normal: (row x column direction cosines), normalised,
    dotted with ImagePositionPatient. None when either tag is absent or malformed, or the
    direction cosines are not two orthogonal unit vectors."""
    iop, ipp = _floats(orientation, 6), _floats(position, 3)
    if iop is None or ipp is None:
        return None
    normal = np.cross(np.array(iop[:3]), np.array(iop[3:]))
    length = float(np.linalg.norm(normal))
    if length < 0.5:
        return None
    return float(np.dot(normal / length, np.array(ipp)))


def slice_info(scan: Scan) -> SliceInfo:
    """The series geometry of a decoded scan. Raises ``ScanRejected`` ('bad_geometry') when
    the header cannot place the slice (a 2.5D model needs its neighbours)."""
    ds = scan.dataset
    orientation = _floats(ds.get("ImageOrientationPatient"), 6)
    position = slice_position(orientation, ds.get("ImagePositionPatient"))
    if orientation is None or position is None:
        raise ScanRejected("bad_geometry", "a 2.5D model needs ImagePositionPatient and "
                           "ImageOrientationPatient (two orthogonal unit vectors) to find the "
                           "slice's neighbours")
    rounded = ",".join(f"{v:.3f}" for v in orientation)
    pixels = scan.pixels.shape
    # Two acquisitions in one series (each announcing its own ImagesInAcquisition) are
    # two stacks.
    acquisition = str(ds.get("AcquisitionNumber", "") or "").strip()
    key = (f"{scan.series_instance_uid}|{acquisition}|{rounded}|{pixels[0]}x{pixels[1]}|"
           f"{scan.pixel_spacing[0]:.4f},{scan.pixel_spacing[1]:.4f}")
    try:
        count: int | None = int(ds.get("ImagesInAcquisition"))  # absent: None -> TypeError
    except (TypeError, ValueError):
        count = None
    return SliceInfo(
        group=hashlib.sha256(key.encode()).hexdigest()[:16],
        sop_instance_uid=scan.sop_instance_uid,
        position_mm=position,
        spacing_mm=_positive(ds.get("SpacingBetweenSlices")),
        expected=count if count is not None and count > 0 else None,
    )


class SliceRefused(ReasonedError):
    """The assembler cannot take this slice. ``reason`` is a reason code
    (``agent.errors``); the message is safe to log and publish."""


@dataclass(frozen=True)
class StackJob:
    """One slice ready for the model: the inbox ids of its 2k + 1 slots in slice order
    (the centre in the middle; a padded slot repeats its neighbour's id)."""

    group: str
    centre: int
    slots: tuple[int, ...]
    padded: int  # how many slots repeat a neighbour
    why: str  # "neighbours" | "complete" | "idle" | "evicted"


@dataclass(order=True)
class _Member:
    position_mm: float
    inbox_id: int = field(compare=False)
    sop_instance_uid: str = field(compare=False)
    sent: bool = field(default=False, compare=False)
    released: bool = field(default=False, compare=False)  # its payload is no longer kept


@dataclass
class _Group:
    key: str
    spacing_hint: float | None
    expected: int | None
    last_seen: float
    members: list[_Member] = field(default_factory=list)
    closing: str | None = None  # why it closed

    def observed_spacing(self) -> float | None:
        """The smallest gap between the slices present (>= the true spacing while some are
        missing)."""
        gaps = [b.position_mm - a.position_mm for a, b in zip(self.members, self.members[1:],
                                                              strict=False)]
        return min((g for g in gaps if g > 1e-3), default=None)

    def spacing(self) -> float | None:
        """The slice spacing to find neighbours by, or None to wait.

        While the series is open only the header's SpacingBetweenSlices is trusted, and only
        while no two slices present are closer than it: the smallest gap seen so far is
        twice the spacing when every other slice has arrived, and would pair a slice with
        the wrong neighbours. Without a usable header value a slice waits for the series to
        close. A closed series has all the slices it will get: its smallest gap is the
        spacing (also when the header gives a gap, not the centre-to-centre distance)."""
        observed = self.observed_spacing()
        if self.closing is not None:
            return observed or self.spacing_hint
        hint = self.spacing_hint
        if hint is not None and (observed is None or observed >= (1 - POSITION_TOLERANCE) * hint):
            return hint
        return None

    def find(self, position: float, spacing: float, tolerance: float) -> _Member | None:
        for m in self.members:  # small lists; ordered, so stop early
            if abs(m.position_mm - position) <= tolerance * spacing:
                return m
            if m.position_mm > position + spacing:
                return None
        return None


@dataclass
class Counters:
    duplicates: int = 0
    closed: int = 0
    evicted: int = 0


class SeriesAssembler:
    """Tracks open series and hands out slices whose neighbours are present.

    ``context``: neighbours each side (k). ``max_open``: groups kept open at once.
    ``max_slices``: slices one group may hold. ``idle_timeout_s``: a group with no new slice
    for this long closes and its remaining slices go with padding."""

    def __init__(self, context: int, *, max_open: int, max_slices: int,
                 idle_timeout_s: float) -> None:
        if context < 1:
            raise ValueError("series assembly is for 2.5D models (context >= 1)")
        self.context = context
        self.max_open = max_open
        self.max_slices = max_slices
        self.idle_timeout_s = idle_timeout_s
        self._groups: dict[str, _Group] = {}
        self.counters = Counters()

    # -- input ---------------------------------------------------------------------------
    def add(self, info: SliceInfo, inbox_id: int, now: float, *, sent: bool = False) -> bool:
        """Take one slice. ``sent``: it already went through the model (a restart reloads
        those as neighbours). Returns False for a duplicate (same SOP Instance UID already
        here: nothing to do for it). Raises ``SliceRefused`` for a second instance at an
        occupied position or a group over ``max_slices``."""
        group = self._groups.get(info.group)
        if group is None:
            self._make_room()
            group = _Group(info.group, info.spacing_mm, None, now)  # expected: set below
            self._groups[info.group] = group
        if any(m.sop_instance_uid == info.sop_instance_uid for m in group.members):
            self.counters.duplicates += 1
            return False
        spacing = group.observed_spacing() or group.spacing_hint or info.spacing_mm
        clash = any(abs(m.position_mm - info.position_mm) < 1e-3 for m in group.members)
        if spacing is not None:
            clash = clash or group.find(info.position_mm, spacing, SAME_POSITION) is not None
        if clash:
            raise SliceRefused("duplicate_position", (
                "another instance of this series lies at the same slice position (a "
                "repeated or multi-echo acquisition?): a 2.5D model needs one image per "
                "position"))
        if len(group.members) >= self.max_slices:
            raise SliceRefused("series_too_large", (
                f"the series already holds {len(group.members)} slices, the limit "
                f"series.max_slices is {self.max_slices}"))
        insort(group.members, _Member(info.position_mm, inbox_id, info.sop_instance_uid, sent))
        group.last_seen = max(group.last_seen, now)
        if group.expected is None and info.expected is not None:
            group.expected = info.expected
        return True

    def _make_room(self) -> None:
        open_groups = [g for g in self._groups.values() if g.closing is None]
        if len(open_groups) < self.max_open:
            return
        oldest = min(open_groups, key=lambda g: g.last_seen)
        oldest.closing = "evicted"
        self.counters.evicted += 1

    # -- output --------------------------------------------------------------------------
    def take_ready(self, now: float, *, allow_idle: bool = True) -> list[StackJob]:
        """Every slice that can go now, once each (it is marked sent). ``allow_idle``:
        whether a series may close for idleness now; the caller says no while it still has
        received scans it has not looked at (the next slice may be among them)."""
        jobs: list[StackJob] = []
        for group in self._groups.values():
            if group.closing is None:
                if group.expected is not None and len(group.members) >= group.expected:
                    group.closing = "complete"
                elif allow_idle and now - group.last_seen >= self.idle_timeout_s:
                    group.closing = "idle"
            spacing = group.spacing()
            for index, member in enumerate(group.members):
                if member.sent:
                    continue
                job = self._stack(group, index, spacing)
                if job is not None:
                    member.sent = True
                    jobs.append(job)
        return jobs

    def _stack(self, group: _Group, index: int, spacing: float | None) -> StackJob | None:
        centre = group.members[index]
        k = self.context
        slots: dict[int, int] = {0: centre.inbox_id}
        padded = 0
        for side in (-1, 1):
            for d in range(1, k + 1):
                found = None
                if spacing is not None:
                    found = group.find(centre.position_mm + side * d * spacing, spacing,
                                       POSITION_TOLERANCE)
                if found is not None:
                    slots[side * d] = found.inbox_id
                elif group.closing is not None:
                    slots[side * d] = slots[side * (d - 1)]  # repeat towards the centre
                    padded += 1
                else:
                    return None
        ordered = tuple(slots[d] for d in range(-k, k + 1))
        return StackJob(group.key, centre.inbox_id, ordered, padded,
                        group.closing or "neighbours")

    def finished(self) -> list[tuple[str, str, list[int]]]:
        """Closed groups whose every slice has been sent: (group, why, inbox ids not yet
        released), and they are forgotten. Their rows are no longer anyone's neighbour."""
        done = []
        for key, group in list(self._groups.items()):
            if group.closing is not None and all(m.sent for m in group.members):
                done.append((key, group.closing,
                             [m.inbox_id for m in group.members if not m.released]))
                del self._groups[key]
                self.counters.closed += 1
        return done

    def releasable(self) -> list[int]:
        """Inbox ids of sent slices of open series that no slice can need any more: every
        slot within k spacings on both sides holds a sent slice (so a slice still to come
        cannot land there). Lets a series larger than the inbox cap go through; the rest
        are released when the series closes."""
        out = []
        for group in self._groups.values():
            spacing = group.spacing()
            if group.closing is not None or spacing is None:
                continue
            for m in group.members:
                if not m.sent or m.released:
                    continue
                near = [group.find(m.position_mm + d * spacing, spacing, POSITION_TOLERANCE)
                        for d in range(-self.context, self.context + 1) if d]
                if all(n is not None and n.sent for n in near):
                    m.released = True
                    out.append(m.inbox_id)
        return out

    def close_all(self, why: str = "flushed") -> None:
        """Close every open group now (its waiting slices go with padding)."""
        for group in self._groups.values():
            group.closing = group.closing or why

    # -- state ---------------------------------------------------------------------------
    def spacing(self, group: str) -> float | None:
        """The slice spacing of an open group (None: unknown yet, or no such group)."""
        found = self._groups.get(group)
        return found.spacing() if found is not None else None

    @property
    def open_groups(self) -> int:
        return sum(1 for g in self._groups.values() if g.closing is None)

    @property
    def waiting(self) -> int:
        """Slices held back for their neighbours."""
        return sum(1 for g in self._groups.values() for m in g.members if not m.sent)

    def next_deadline(self) -> float | None:
        """When the earliest open group would close for idleness (for the caller's wait)."""
        times = [g.last_seen + self.idle_timeout_s for g in self._groups.values()
                 if g.closing is None and any(not m.sent for m in g.members)]
        return min(times, default=None)
