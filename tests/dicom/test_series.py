"""Series assembly (agent/dicom/series.py): ordering, neighbours, closing, limits, geometry."""

from __future__ import annotations

import dataclasses
import random

import numpy as np
import pytest

from agent.demo.sample_series import build_series
from agent.dicom.decode import ScanRejected, decode_scan
from agent.dicom.series import SeriesAssembler, SliceInfo, SliceRefused, slice_info
from agent.model.bundle import InputContract

K = 2


def info(pos: float, *, group: str = "g", uid: str | None = None, spacing: float | None = 1.0,
         expected: int | None = None) -> SliceInfo:
    return SliceInfo(group, uid or f"1.2.{pos:g}", pos, spacing, expected)


def assembler(**kw: float) -> SeriesAssembler:
    opts = {"max_open": 4, "max_slices": 64, "idle_timeout_s": 10.0} | kw
    return SeriesAssembler(K, **opts)  # type: ignore[arg-type]


def drain(a: SeriesAssembler, now: float) -> dict[int, tuple[int, ...]]:
    return {job.centre: job.slots for job in a.take_ready(now)}


def test_a_slice_goes_when_its_neighbours_are_there() -> None:
    a = assembler()
    for i in (0, 1, 2, 3):
        a.add(info(float(i)), inbox_id=i, now=0)
    assert drain(a, 0) == {}  # slice 2 still lacks +2
    a.add(info(4.0), inbox_id=4, now=1)
    assert drain(a, 1) == {2: (0, 1, 2, 3, 4)}
    assert drain(a, 2) == {}  # once only
    assert a.waiting == 4


def test_shuffled_duplicated_and_complete_series() -> None:
    n = 12
    order = list(range(n)) * 2  # every slice delivered twice
    random.Random(7).shuffle(order)
    a = assembler()
    seen: dict[int, tuple[int, ...]] = {}
    duplicates = 0
    for t, i in enumerate(order):
        # the inbox id of a redelivery differs; the SOP Instance UID does not
        fresh = a.add(info(float(i) * 1.5, spacing=1.5, expected=n), inbox_id=100 * t + i, now=t)
        duplicates += not fresh
        for centre, slots in drain(a, t).items():
            assert centre not in seen
            seen[centre] = slots
    assert duplicates == n
    assert len(seen) == n
    by_slice = {c % 100: tuple(s % 100 for s in slots) for c, slots in seen.items()}
    for i in range(n):  # neighbours in slice order, edges repeated towards the centre
        want = tuple(min(max(j, 0), n - 1) for j in range(i - K, i + K + 1))
        assert by_slice[i] == want
    (_group, why, ids), = a.finished()
    assert why == "complete" and len(ids) == n
    assert a.finished() == []


def test_missing_slice_waits_for_the_idle_timeout_then_pads() -> None:
    a = assembler(idle_timeout_s=5.0)
    for i in (0, 1, 2, 4, 5, 6):  # 3 never arrives
        a.add(info(float(i)), inbox_id=i, now=0)
    assert drain(a, 1) == {}  # 2 lacks 3 (+1), 4 lacks 3 (-1); edges wait for the end
    assert a.next_deadline() == 5.0
    jobs = {j.centre: j for j in a.take_ready(5.0)}
    assert set(jobs) == {0, 1, 2, 4, 5, 6}
    assert jobs[2].slots == (0, 1, 2, 2, 4)  # the gap repeats the centre, +2 is real
    assert jobs[4].slots == (2, 4, 4, 5, 6)
    assert jobs[0].slots == (0, 0, 0, 1, 2)
    assert all(j.why == "idle" for j in jobs.values())
    assert [why for _g, why, _ids in a.finished()] == ["idle"]


def test_spacing_from_the_header_keeps_a_gap_a_gap() -> None:
    # Slices 0, 2, 4 of a 1 mm series: without the header's spacing they would look adjacent.
    a = assembler()
    for i in (0, 2, 4, 6, 8):
        a.add(info(float(i), spacing=1.0), inbox_id=i, now=0)
    assert drain(a, 0) == {}


def test_header_spacing_that_disagrees_with_the_slices_waits_for_the_end() -> None:
    # A header that counts the gap between slabs (too large) ...
    a = assembler()
    for i in range(5):
        a.add(info(float(i), spacing=5.0, expected=5), inbox_id=i, now=0)
    jobs = a.take_ready(0)  # complete: the slices themselves give the spacing
    assert {j.centre: j.slots for j in jobs}[2] == (0, 1, 2, 3, 4)
    # ... or the gap between slices, not the centre-to-centre distance (too small).
    a = assembler(idle_timeout_s=5.0)
    for i in range(5):
        a.add(info(2.0 * i, spacing=0.5), inbox_id=i, now=0)
    assert drain(a, 1) == {}  # no neighbour at +-0.5 mm: wait, do not pad
    got = drain(a, 5)
    assert got[2] == (0, 1, 2, 3, 4) and got[0] == (0, 0, 0, 1, 2)


def test_without_a_header_spacing_out_of_order_slices_wait_for_the_series() -> None:
    # Every other slice first: their smallest gap is twice the spacing, so nothing may go
    # on neighbours until the series is complete.
    a = assembler()
    order = [0, 2, 4, 6, 8, 1, 3, 5, 7]
    seen: dict[int, tuple[int, ...]] = {}
    for t, i in enumerate(order):
        a.add(info(float(i), spacing=None, expected=9), inbox_id=i, now=t)
        got = drain(a, t)
        if t < len(order) - 1:
            assert got == {}, (t, got)
        seen |= got
    assert seen[4] == (2, 3, 4, 5, 6) and seen[0] == (0, 0, 0, 1, 2)


def test_idle_close_waits_while_the_caller_has_unread_scans() -> None:
    a = assembler(idle_timeout_s=1.0)
    a.add(info(0.0), inbox_id=1, now=0)
    assert a.take_ready(10, allow_idle=False) == []
    assert [j.why for j in a.take_ready(10)] == ["idle"]


def test_interior_slices_are_released_before_the_series_closes() -> None:
    a = assembler()
    for i in range(8):
        a.add(info(float(i)), inbox_id=i, now=0)
    assert set(drain(a, 0)) == {2, 3, 4, 5}
    assert a.releasable() == []  # 2..5 sent, but their neighbours 0, 1, 6, 7 are not
    a.close_all()
    assert set(drain(a, 0)) == {0, 1, 6, 7}
    assert a.releasable() == []  # closed series release as a whole
    (_g, _why, ids), = a.finished()
    assert sorted(ids) == list(range(8))
    b = assembler()
    for i in range(12):
        b.add(info(float(i)), inbox_id=i, now=0)
    drain(b, 0)  # 2..9 sent
    assert sorted(b.releasable()) == [4, 5, 6, 7]  # every slot within 2 holds a sent slice
    assert b.releasable() == []
    b.close_all()
    drain(b, 0)
    (_g, _why, ids), = b.finished()
    assert sorted(ids) == [0, 1, 2, 3, 8, 9, 10, 11]  # the released ones are not repeated


def test_duplicate_position_and_series_limit_are_refused() -> None:
    a = assembler(max_slices=3)
    a.add(info(0.0), inbox_id=1, now=0)
    with pytest.raises(SliceRefused) as exc:
        a.add(info(0.0, uid="9.9"), inbox_id=2, now=0)
    assert exc.value.reason == "duplicate_position"
    a.add(info(1.0), inbox_id=3, now=0)
    a.add(info(2.0), inbox_id=4, now=0)
    with pytest.raises(SliceRefused) as exc:
        a.add(info(3.0), inbox_id=5, now=0)
    assert exc.value.reason == "series_too_large"
    assert "series.max_slices is 3" in str(exc.value)


def test_open_series_limit_closes_the_least_recent_group() -> None:
    a = assembler(max_open=2)
    a.add(info(0.0, group="a"), inbox_id=1, now=0)
    a.add(info(0.0, group="b"), inbox_id=2, now=1)
    a.add(info(1.0, group="a"), inbox_id=3, now=2)  # a is now the more recent
    a.add(info(0.0, group="c"), inbox_id=4, now=3)  # b must make room
    assert a.open_groups == 2 and a.counters.evicted == 1
    jobs = a.take_ready(3)
    assert [(j.centre, j.why) for j in jobs] == [(2, "evicted")]
    assert [(g, ids) for g, _why, ids in a.finished()] == [("b", [2])]


def test_restart_reloads_sent_slices_as_neighbours() -> None:
    a = assembler()
    for i in range(5):
        a.add(info(float(i), expected=6), inbox_id=i, now=0, sent=i < 3)
    assert drain(a, 0) == {}  # 3 and 4 wait for 5
    a.add(info(5.0, expected=6), inbox_id=5, now=1)
    assert drain(a, 1) == {3: (1, 2, 3, 4, 5), 4: (2, 3, 4, 5, 5), 5: (3, 4, 5, 5, 5)}


def test_close_all_flushes() -> None:
    a = assembler()
    a.add(info(0.0), inbox_id=1, now=0)
    a.close_all()
    assert drain(a, 0) == {1: (1, 1, 1, 1, 1)}
    assert a.finished()[0][1] == "flushed"


def test_context_zero_is_not_a_series_model() -> None:
    with pytest.raises(ValueError):
        SeriesAssembler(0, max_open=1, max_slices=1, idle_timeout_s=1)


# -- geometry from real instances ------------------------------------------------------
CONTRACT = InputContract(modality="MR", shape=(32, 32), pixel_spacing_mm=(1.0, 1.0))


def decode(payload: bytes):  # type: ignore[no-untyped-def]
    return decode_scan(payload, CONTRACT, pixel_budget=1 << 20, max_payload_bytes=1 << 20)


def test_slice_info_orders_along_the_normal() -> None:
    vol = np.arange(4 * 16 * 16, dtype=np.uint16).reshape(4, 16, 16)
    payloads = build_series(vol, spacing_mm=(2.5, 1.0, 1.0), first_slice_z_mm=-10.0)
    infos = [slice_info(decode(p)) for p in payloads]
    assert [i.position_mm for i in infos] == [-10.0, -7.5, -5.0, -2.5]
    assert {i.group for i in infos} == {infos[0].group}
    assert infos[0].spacing_mm == 2.5
    assert infos[0].expected == 4
    assert infos[0].sop_instance_uid not in infos[0].group  # a hash, not the UID


def test_slice_info_groups_by_orientation_and_refuses_no_geometry() -> None:
    vol = np.ones((2, 16, 16), dtype=np.uint16)
    a, b = build_series(vol)
    scan = decode(b)
    scan.dataset.ImageOrientationPatient = [0, 1, 0, 0, 0, -1]  # sagittal, same series
    assert slice_info(decode(a)).group != slice_info(scan).group
    del scan.dataset.ImagePositionPatient
    with pytest.raises(ScanRejected) as exc:
        slice_info(scan)
    assert exc.value.reason == "bad_geometry"


def test_next_deadline_is_the_earliest_open_group_with_slices_waiting() -> None:
    a = assembler(idle_timeout_s=10.0)
    assert a.next_deadline() is None  # nothing open
    a.add(info(0.0, group="a"), inbox_id=1, now=5)
    a.add(info(0.0, group="b"), inbox_id=2, now=2)
    a.add(info(0.0, group="c"), inbox_id=3, now=0, sent=True)  # done before a restart
    assert a.next_deadline() == 12.0  # c has nothing waiting: it does not count
    assert drain(a, 13) == {2: (2, 2, 2, 2, 2)}  # b closed for idleness: its slice went
    assert a.next_deadline() == 15.0  # b has nothing waiting: only a counts
    a.close_all()
    drain(a, 16)
    assert a.next_deadline() is None


def test_counters_and_padding_of_a_closed_series() -> None:
    a = assembler()
    for i in (0, 1, 2):
        assert a.add(info(float(i)), inbox_id=i, now=0)
    assert not a.add(info(1.0), inbox_id=9, now=0)  # the same SOP again
    assert not a.add(info(2.0), inbox_id=10, now=0)
    assert a.counters.duplicates == 2
    a.close_all()
    jobs = {job.centre: job for job in a.take_ready(1)}
    assert {c: j.padded for c, j in jobs.items()} == {0: 2, 1: 2, 2: 2}
    assert jobs[0].slots == (0, 0, 0, 1, 2) and jobs[1].slots == (0, 0, 1, 2, 2)
    assert [(g, why, ids) for g, why, ids in a.finished()] == [("g", "flushed", [0, 1, 2])]
    assert a.counters.closed == 1 and a.finished() == []
    a.add(info(0.0, group="h"), inbox_id=20, now=2)
    a.close_all()
    a.take_ready(3)
    a.finished()
    assert a.counters.closed == 2


def test_positions_within_the_tolerance_are_the_same_slot_and_a_spacing_away_are_not() -> None:
    a = assembler()
    a.add(info(0.0), inbox_id=0, now=0)
    a.add(info(1.0), inbox_id=1, now=0)
    with pytest.raises(SliceRefused) as refused:
        a.add(info(1.0005, uid="1.2.other"), inbox_id=2, now=0)  # < 1e-3 mm: same place
    assert refused.value.reason == "duplicate_position"
    assert "same slice position" in str(refused.value)
    a.add(info(2.0), inbox_id=3, now=0)  # exactly a spacing on: a new slot
    a.add(info(3.0), inbox_id=4, now=0)
    a.add(info(4.0), inbox_id=5, now=0)
    assert drain(a, 0) == {3: (0, 1, 3, 4, 5)}  # the one slice with both neighbours each side
    a.close_all()
    got = {j.centre: (j.slots, j.padded) for j in a.take_ready(1)}
    assert got == {0: ((0, 0, 0, 1, 3), 2), 1: ((0, 0, 1, 3, 4), 1),
                   4: ((1, 3, 4, 5, 5), 1), 5: ((3, 4, 5, 5, 5), 2)}


# -- slice_info on odd headers -----------------------------------------------------------
_ONE = build_series(np.ones((1, 16, 16), dtype=np.uint16), spacing_mm=(2.0, 1.0, 1.0))[0]


def _scan(**header: object):  # type: ignore[no-untyped-def]
    """The same decoded 16 x 16 instance each time, with ``header`` set on its dataset
    (None deletes; a value pydicom will not take for the tag's VR goes in as LO)."""
    scan = decode(_ONE)
    for keyword, value in header.items():
        if value is None:
            if keyword in scan.dataset:
                delattr(scan.dataset, keyword)
            continue
        try:
            setattr(scan.dataset, keyword, value)
        except ValueError:
            scan.dataset.add_new(keyword, "LO", value)
    return scan


GEOMETRY_REFUSAL = ("a 2.5D model needs ImagePositionPatient and ImageOrientationPatient (two "
                    "orthogonal unit vectors) to find the slice's neighbours")


@pytest.mark.filterwarnings("ignore:Invalid value for VR DS")
@pytest.mark.parametrize("header", [
    {"ImageOrientationPatient": None},
    {"ImagePositionPatient": None},
    {"ImageOrientationPatient": [1, 0, 0, 0, 1]},  # five values
    {"ImagePositionPatient": [0, 0]},
    {"ImagePositionPatient": [0, 0, 1, 2]},
    {"ImagePositionPatient": ["0", "x", "1"]},
    {"ImagePositionPatient": [0, 0, float("nan")]},
    {"ImageOrientationPatient": [1, 0, 0, float("inf"), 1, 0]},
    {"ImageOrientationPatient": [1, 0, 0, 1, 0, 0]},  # parallel: no normal
    {"ImageOrientationPatient": [0.3, 0, 0, 0, 0.3, 0]},  # |normal| 0.09: not unit vectors
], ids=["no-iop", "no-ipp", "iop-5", "ipp-2", "ipp-4", "ipp-text", "ipp-nan", "iop-inf",
        "parallel", "short"])
def test_a_header_that_cannot_place_the_slice_is_refused(header: dict[str, object]) -> None:
    with pytest.raises(ScanRejected) as exc:
        slice_info(_scan(**header))
    assert exc.value.reason == "bad_geometry" and exc.value.message == GEOMETRY_REFUSAL


def test_direction_cosines_whose_normal_is_half_a_unit_still_place_the_slice() -> None:
    info_ = slice_info(_scan(ImageOrientationPatient=[1, 0, 0, 0, 0.5, 0],
                             ImagePositionPatient=[0, 0, 4.0]))
    assert info_.position_mm == 4.0  # |row x col| = 0.5: accepted, then normalised


def test_the_position_is_along_the_unit_normal() -> None:
    axial = slice_info(_scan(ImageOrientationPatient=[1, 0, 0, 0, 1, 0],
                             ImagePositionPatient=[5, 7, -3.5]))
    assert axial.position_mm == -3.5
    # Direction cosines a little off unit length: the normal is normalised first.
    long = slice_info(_scan(ImageOrientationPatient=[0.8, 0, 0, 0, 0.8, 0],
                            ImagePositionPatient=[5, 7, -3.5]))
    assert long.position_mm == pytest.approx(-3.5)
    sagittal = slice_info(_scan(ImageOrientationPatient=[0, 1, 0, 0, 0, -1],
                                ImagePositionPatient=[12.5, 3, 4]))
    assert sagittal.position_mm == -12.5  # (0,1,0) x (0,0,-1) = (-1,0,0)


@pytest.mark.filterwarnings("ignore:Invalid value for VR DS")
@pytest.mark.parametrize(("value", "expected"), [
    ("2.5", 2.5), (3, 3.0), (None, None), ("0", None), ("-1.5", None), ("abc", None),
    ("inf", None), ("nan", None)])
def test_spacing_between_slices_counts_only_when_positive_and_finite(
        value: object, expected: float | None) -> None:
    scan = _scan(SpacingBetweenSlices=None)
    if value is not None:
        scan.dataset.add_new("SpacingBetweenSlices", "DS" if value != "abc" else "LO", value)
    assert slice_info(scan).spacing_mm == expected


@pytest.mark.filterwarnings("ignore:A value of type 'int' cannot be assigned")
@pytest.mark.parametrize(("value", "expected"), [
    ("12", 12), (7, 7), ("1", 1), (None, None), ("", None), ("0", None), ("-3", None),
    ("many", None), ("1.5", None)])
def test_images_in_acquisition_counts_only_when_a_positive_integer(
        value: object, expected: int | None) -> None:
    scan = _scan(ImagesInAcquisition=None)
    if value is not None:
        scan.dataset.add_new("ImagesInAcquisition", "LO", value)
    assert slice_info(scan).expected == expected


def test_the_group_key_is_series_acquisition_orientation_matrix_and_spacing() -> None:
    def group(**header: object) -> str:
        header = {"AcquisitionNumber": None, "ImageOrientationPatient": [1, 0, 0, 0, 1, 0]
                  } | header
        return slice_info(_scan(**header)).group

    base = group()
    assert len(base) == 16 and int(base, 16) >= 0
    assert group(AcquisitionNumber="") == base  # empty is absent
    assert group(ImageOrientationPatient=[1, 0.0004, 0, 0, 1, 0]) == base  # rounded to 1e-3
    one = group(AcquisitionNumber="1")
    assert group(AcquisitionNumber=" 1 ") == one  # padding is not a change
    def decoded(**fields: object) -> str:  # what decode_scan read (UIDs, spacing, pixels)
        scan = _scan(AcquisitionNumber=None, ImageOrientationPatient=[1, 0, 0, 0, 1, 0])
        return slice_info(dataclasses.replace(scan, **fields)).group

    assert decoded() == base
    differ = [one, group(ImageOrientationPatient=[1, 0.001, 0, 0, 1, 0]),
              decoded(series_instance_uid="1.2.3.999"), decoded(pixel_spacing=(1.0, 1.0001)),
              decoded(pixel_spacing=(1.0001, 1.0)), decoded(pixels=np.ones((16, 15))),
              decoded(pixels=np.ones((15, 16)))]
    assert base not in differ and len(set(differ)) == len(differ)


def test_refusals_say_why_with_the_figures() -> None:
    a = assembler(max_slices=2)
    a.add(info(0.0), inbox_id=0, now=0)
    with pytest.raises(SliceRefused) as clash:
        a.add(info(0.04, uid="1.2.x"), inbox_id=1, now=0)  # within 5 % of a spacing
    assert str(clash.value) == (
        "another instance of this series lies at the same slice position (a repeated or "
        "multi-echo acquisition?): a 2.5D model needs one image per position")
    a.add(info(0.06, uid="1.2.y", spacing=None), inbox_id=2, now=0)  # 6 %: its own slot
    with pytest.raises(SliceRefused) as big:
        a.add(info(3.0), inbox_id=3, now=0)
    assert big.value.reason == "series_too_large"
    assert str(big.value) == ("the series already holds 2 slices, the limit "
                              "series.max_slices is 2")


# -- boundaries and bookkeeping of the assembler -----------------------------------------
def test_gaps_of_a_thousandth_of_a_mm_do_not_set_the_spacing() -> None:
    a = assembler()
    a.add(info(0.0, spacing=None), inbox_id=0, now=0)
    a.add(info(0.001, spacing=None), inbox_id=1, now=0)  # exactly 1e-3 apart: two slices
    a.add(info(1.0, spacing=None), inbox_id=2, now=0)
    assert a.spacing("g") is None  # open, no header spacing: wait
    a.close_all()
    assert a.spacing("g") == pytest.approx(0.999)  # the 1e-3 gap is not a spacing


def test_two_slices_at_one_place_without_any_spacing_are_refused() -> None:
    a = assembler()
    a.add(info(5.0, spacing=None), inbox_id=0, now=0)
    with pytest.raises(SliceRefused):
        a.add(info(5.0005, uid="1.2.twin", spacing=None), inbox_id=1, now=0)


def test_the_slice_s_own_header_spacing_finds_a_clash_in_a_one_slice_group() -> None:
    a = assembler()
    a.add(info(0.0, spacing=None), inbox_id=0, now=0)
    with pytest.raises(SliceRefused):  # 4 % of the new slice's own 1 mm spacing
        a.add(info(0.04, uid="1.2.near", spacing=1.0), inbox_id=1, now=0)


def test_the_observed_spacing_finds_a_clash_when_the_header_has_none() -> None:
    a = assembler()
    a.add(info(0.0, spacing=None), inbox_id=0, now=0)
    a.add(info(2.0, spacing=None), inbox_id=1, now=0)
    with pytest.raises(SliceRefused):  # 4 % of the 2 mm seen between the slices
        a.add(info(2.08, uid="1.2.near", spacing=None), inbox_id=2, now=0)


def test_the_header_spacing_holds_down_to_three_quarters_of_it() -> None:
    a = assembler()
    a.add(info(0.0, spacing=2.0), inbox_id=0, now=0)
    a.add(info(1.5, spacing=2.0), inbox_id=1, now=0)  # 0.75 x 2 mm: still trusted
    assert a.spacing("g") == 2.0
    b = assembler()
    b.add(info(0.0, spacing=2.0), inbox_id=0, now=0)
    b.add(info(1.0, spacing=2.0), inbox_id=1, now=0)  # half of it: the header is wrong
    assert b.spacing("g") is None


@pytest.mark.parametrize("spacing", [1.0, 2.0])
def test_a_neighbour_a_quarter_spacing_off_its_slot_still_counts(spacing: float) -> None:
    a = assembler()
    for i, pos in enumerate((0.0, 1.0, 2.25, 3.0, 4.0)):  # in units of the spacing
        a.add(info(pos * spacing, spacing=spacing), inbox_id=i, now=0)
    assert drain(a, 0) == {2: (0, 1, 2, 3, 4)}
    b = assembler()
    for i, pos in enumerate((0.0, 1.0, 2.0, 3.25, 4.0)):
        b.add(info(pos * spacing, spacing=spacing), inbox_id=i, now=0)
    jobs = b.take_ready(0)
    assert [(j.centre, j.slots, j.why) for j in jobs] == [(2, (0, 1, 2, 3, 4), "neighbours")]


def test_a_context_of_one_is_a_series_model_and_zero_is_refused_in_words() -> None:
    a = SeriesAssembler(1, max_open=1, max_slices=8, idle_timeout_s=1.0)
    for i in range(3):
        a.add(info(float(i)), inbox_id=i, now=0)
    assert drain(a, 0) == {1: (0, 1, 2)}
    with pytest.raises(ValueError) as exc:
        SeriesAssembler(0, max_open=1, max_slices=1, idle_timeout_s=1)
    assert str(exc.value) == "series assembly is for 2.5D models (context >= 1)"


def test_the_first_announced_slice_count_stands() -> None:
    a = assembler()
    a.add(info(0.0), inbox_id=0, now=0)  # announces nothing
    a.add(info(1.0, expected=3), inbox_id=1, now=0)
    a.add(info(2.0, expected=5), inbox_id=2, now=0)  # disagrees: the first count stands
    assert {j.why for j in a.take_ready(0)} == {"complete"}
    assert [why for _, why, _ in a.finished()] == ["complete"]


def test_every_eviction_is_counted() -> None:
    a = assembler(max_open=1)
    for n, group in enumerate(("a", "b", "c")):
        a.add(info(0.0, group=group), inbox_id=n, now=n)
    assert a.counters.evicted == 2 and a.open_groups == 1


def test_a_closed_series_with_slices_not_yet_sent_is_not_finished() -> None:
    a = assembler()
    a.add(info(0.0), inbox_id=0, now=0)
    a.close_all()
    assert a.finished() == [] and a.waiting == 1
    a.take_ready(1)
    assert [ids for _, _, ids in a.finished()] == [[0]]


def test_releasable_looks_at_every_open_series_at_its_own_spacing() -> None:
    a = assembler()
    a.add(info(0.0, group="closed"), inbox_id=100, now=0)
    a.close_all()  # a closed group first: skipped, not the end of the search
    for i in range(9):
        a.add(info(2.0 * i, group="open", spacing=2.0), inbox_id=i, now=0)
    assert sorted(j.centre for j in a.take_ready(0)) == [2, 3, 4, 5, 6, 100]
    assert a.releasable() == [4]  # the one whose every slot within 2 spacings is sent


def test_the_spacing_of_an_unknown_series_is_none() -> None:
    assert assembler().spacing("no-such-group") is None
