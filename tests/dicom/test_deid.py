"""PS3.15 Annex E de-identification: every Table E.1-1 row that the test instance carries
(it carries every row of agent.dicom.deid_table), under the Basic Profile and each option."""

from __future__ import annotations

import io
import itertools
from datetime import date, timedelta

import numpy as np
import pydicom
import pytest
from pydicom.datadict import dictionary_VR, keyword_for_tag, tag_for_keyword
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import MRImageStorage

from agent.demo.sample_series import build_series
from agent.dicom.decode import decode_scan
from agent.dicom.deid import Deidentifier, DeidOptions, shift_date
from agent.dicom.deid_table import RULES, TABLE_E1_1
from agent.dicom.derive import COPIED_DEID, TYPE2_EMPTY, ModelIdentity, derive_instance
from agent.dicom.derived_writer import DerivedWriter
from agent.model.bundle import InputContract, OutputContract

SECRET = bytes(range(32))
UID_ROOT = "1.2.826.0.1.3680043.8.498."
_VALUES: dict[str, object] = {
    "PN": "Phi^Person", "DA": "20240315", "TM": "101112", "DT": "20240315101112",
    "AS": "042Y", "DS": "70.5", "IS": "7", "CS": "PHICS", "US": 1, "SS": 1, "UL": 1,
    "SL": 1, "FL": 1.5, "FD": 1.5,
}  # fmt: skip


def _value(keyword: str, n: int) -> object:
    vr = dictionary_VR(keyword).split(" or ")[0]
    if vr == "UI":
        return f"{UID_ROOT}{n}"
    if vr in ("SH", "LO", "ST", "LT", "UT", "UC"):
        return f"PHI{n:03d}{keyword}"[:16]
    return _VALUES.get(vr, f"PHI{n:03d}")


def _inner() -> Dataset:
    """A sequence item with identifying content of its own."""
    item = Dataset()
    item.ReferencedSOPClassUID = MRImageStorage
    item.ReferencedSOPInstanceUID = UID_ROOT + "9001"
    item.PatientName = "Nested^Name"
    item.add_new(0x00091010, "LO", "nested private")
    return item


def instance() -> Dataset:
    """A dataset holding every attribute of the table (and privates, curves, overlays)."""
    ds = Dataset()
    for n, (keyword, _, _) in enumerate(TABLE_E1_1):
        vr = dictionary_VR(keyword).split(" or ")[0]
        tag = tag_for_keyword(keyword)
        assert tag is not None
        if tag >> 16 == 2:
            continue  # file meta: not part of a dataset
        value = Sequence([_inner()]) if vr == "SQ" else _value(keyword, n)
        ds.add(DataElement(tag, vr, value))
    ds.SOPClassUID = MRImageStorage
    ds.Modality = "MR"
    ds.add_new(0x00291010, "LO", "private PHI")
    ds.add_new(0x00290010, "LO", "PRIVATE CREATOR")
    ds.add_new(0x50000020, "CS", "CURVE")
    ds.add_new(0x60003000, "OW", b"\0\1" * 8)
    ds.add_new(0x60004000, "LT", "overlay comment PHI")
    ds.add_new(0x60000010, "US", 4)  # overlay rows: kept
    ds.add_new(0x00189999, "UI", UID_ROOT + "77")  # not in the table: the UI safety net
    return ds


OPTION_SETS = [DeidOptions(*flags) for flags in itertools.product((False, True), repeat=3)]


def _allowed(keyword: str, options: DeidOptions) -> set[str]:
    """The actions the standard allows for a row under ``options`` (K or C when an option
    in use retains it)."""
    _, action, letters = next(r for r in TABLE_E1_1 if r[0] == keyword)
    used = {"T": options.retain_modified_dates, "P": options.retain_patient_characteristics,
            "V": options.retain_device_identity}
    if any(used[c] for c in letters):
        return {"C"} if "T" in letters and used["T"] else {"K"}
    return set(action.split("/"))


@pytest.mark.parametrize("options", OPTION_SETS, ids=lambda o: "+".join(o.names) or "basic")
def test_every_table_attribute_gets_its_action(options: DeidOptions) -> None:
    source = instance()
    deid = Deidentifier(SECRET, options, type2=TYPE2_EMPTY)
    offset = deid.date_offset(source)
    out = deid.dataset(source)
    checked = 0
    for tag, rule in RULES.items():
        if tag not in source:
            continue
        checked += 1
        original = source[tag]
        action = deid.action(tag)
        allowed = _allowed(rule.keyword, options)
        assert action in allowed, rule
        if "Z" in allowed and rule.keyword in TYPE2_EMPTY:
            assert action == "Z", rule  # type 2 in the derived IOD: present, empty
        elif "X" in allowed and action != "U*":
            assert action == "X", rule  # the least disclosing choice
        got = out.get(tag)
        if action == "X":
            assert got is None, rule
        elif action == "Z":
            assert got is not None and (got.value in ("", None) or len(got.value) == 0), rule
        elif action == "D":
            assert got is not None and got.value != original.value, rule
        elif action == "U":
            assert got.value == deid.uid(original.value) and got.value.startswith("2.25."), rule
        elif action == "C" and original.VR in ("DA", "DT"):
            assert got.value == shift_date(original.value, offset) != original.value, rule
        elif original.VR == "SQ":  # K / U* on a sequence: kept, de-identified inside
            item = got.value[0]
            assert "PatientName" in item and item.PatientName == ""
            assert item.ReferencedSOPInstanceUID == deid.uid(UID_ROOT + "9001")
            assert item.ReferencedSOPClassUID == MRImageStorage
            assert 0x00091010 not in item
        else:  # K, or C on a time
            assert got.value == original.value, rule
    assert checked == len(RULES) - 1  # all but MediaStorageSOPInstanceUID (file meta)


def test_privates_curves_overlays_and_unlisted_uids() -> None:
    deid = Deidentifier(SECRET)
    out = deid.dataset(instance())
    for tag in (0x00291010, 0x00290010, 0x50000020, 0x60003000, 0x60004000):
        assert tag not in out
    assert out[0x60000010].value == 4
    assert out.SOPClassUID == MRImageStorage  # registered UIDs are kept
    assert out[0x00189999].value == deid.uid(UID_ROOT + "77")


def test_uid_pseudonyms_are_keyed_stable_and_valid() -> None:
    a, b = Deidentifier(SECRET), Deidentifier(bytes(32))
    uid = UID_ROOT + "12345"
    assert a.uid(uid) == Deidentifier(SECRET).uid(uid) != b.uid(uid)
    assert a.uid(uid) != a.uid(uid + "6")
    pseudonym = a.uid(uid)
    assert pseudonym.startswith("2.25.") and len(pseudonym) <= 64
    assert all(part.isdigit() for part in pseudonym.split("."))


def test_dates_shift_per_patient_and_keep_intervals() -> None:
    deid = Deidentifier(SECRET, DeidOptions(retain_modified_dates=True))
    one, other = Dataset(), Dataset()
    one.PatientID, other.PatientID = "PID-1", "PID-2"
    days = deid.date_offset(one)
    assert 1 <= days <= 3650 and days == deid.date_offset(one)
    assert days != deid.date_offset(other)
    first, later = shift_date("20240301", days), shift_date("20240311", days)
    interval = date(int(later[:4]), int(later[4:6]), int(later[6:]))
    interval -= date(int(first[:4]), int(first[4:6]), int(first[6:]))
    assert interval == timedelta(days=10)
    assert shift_date("20240301101112.5+0100", days).endswith("101112.5+0100")
    assert shift_date("garbage", days) == "" and shift_date("20241399", days) == ""
    assert Deidentifier(SECRET).date_offset(one) == 0  # without 113107: dates are removed


@pytest.mark.parametrize("options", OPTION_SETS, ids=lambda o: "+".join(o.names) or "basic")
def test_markers_name_the_profile_and_the_options(options: DeidOptions) -> None:
    ds = Dataset()
    Deidentifier(SECRET, options).mark(ds)
    assert ds.PatientIdentityRemoved == "YES"
    codes = [item.CodeValue for item in ds.DeidentificationMethodCodeSequence]
    expected = ["113100"]
    expected += ["113107"] if options.retain_modified_dates else []
    expected += ["113108"] if options.retain_patient_characteristics else []
    expected += ["113109"] if options.retain_device_identity else []
    assert codes == expected
    assert all(item.CodingSchemeDesignator == "DCM" for item in
               ds.DeidentificationMethodCodeSequence)
    assert len(list(ds["DeidentificationMethod"].value) if ds["DeidentificationMethod"].VM > 1
               else [ds.DeidentificationMethod]) == len(expected)
    assert ds.LongitudinalTemporalInformationModified == (
        "MODIFIED" if options.retain_modified_dates else "REMOVED")


def test_every_table_keyword_is_a_dicom_keyword() -> None:
    assert len(RULES) == len(TABLE_E1_1)  # no duplicate rows
    for tag, rule in RULES.items():
        assert keyword_for_tag(tag) == rule.keyword
    with pytest.raises(ValueError, match="at least 16 bytes"):
        Deidentifier(b"short")


def _source_with_every_copied_attribute() -> bytes:
    ds = pydicom.dcmread(io.BytesIO(build_series(np.full((1, 32, 32), 500, np.uint16))[0]))
    ds.IssuerOfPatientID, ds.PatientBirthDate, ds.PatientSex = "ZQX ISSUER", "19410312", "F"
    ds.PatientAge, ds.PatientSize, ds.PatientWeight = "083Y", "1.62", "58"
    ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber = "19730517", "101112", "S7", "A9"
    ds.ReferringPhysicianName, ds.StudyDescription = "ZQXDOC^REF", "ZQX STUDY"
    ds.AcquisitionDate, ds.AcquisitionTime = "19730517", "101213"
    ds.ContentDate, ds.ContentTime = "19730517", "101314"
    ds.BodyPartExamined, ds.PositionReferenceIndicator = "HEAD", "NA"
    ds.PatientIdentityRemoved, ds.DeidentificationMethod = "NO", "ZQX METHOD"
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


@pytest.mark.parametrize("options", OPTION_SETS, ids=lambda o: "+".join(o.names) or "basic")
def test_every_copied_attribute_of_the_derived_instance_gets_its_action(
        options: DeidOptions) -> None:
    payload = _source_with_every_copied_attribute()
    source = pydicom.dcmread(io.BytesIO(payload))
    scan = decode_scan(payload, InputContract(modality="MR", shape=(32, 32),
                                              pixel_spacing_mm=(1.0, 1.0), bits_allocated=(16,)),
                       pixel_budget=1 << 20, max_payload_bytes=1 << 22)
    deid = Deidentifier(SECRET, options, type2=TYPE2_EMPTY)
    out = pydicom.dcmread(io.BytesIO(derive_instance(
        scan, scan.pixels, ModelIdentity("m", "1", "ab" * 32),
        OutputContract(modality="MR", scale=1.0), device_id="edge-1", software_version="0",
        deid=deid, writer=DerivedWriter())))
    offset = deid.date_offset(source)
    carried = [k for k in COPIED_DEID if k in source]
    assert len(carried) == len(COPIED_DEID)  # the source carries every copied attribute
    for keyword in carried:
        tag = tag_for_keyword(keyword)
        assert tag is not None
        action, original, got = deid.action(tag), source[tag], out.get(tag)
        if (action in ("X", "Z") and keyword in TYPE2_EMPTY) or action == "Z":
            assert got is not None and got.value in ("", None), keyword
        elif action == "X":
            assert got is None, keyword
        elif action == "U":
            assert got.value == deid.uid(original.value), keyword
        elif action == "C" and original.VR == "DA":
            assert got.value == shift_date(original.value, offset), keyword
        else:
            assert got.value == original.value, (keyword, action)
    assert out.PatientIdentityRemoved == "YES" and "ZQX METHOD" not in str(out)
    assert out.SourceImageSequence[0].ReferencedSOPInstanceUID == deid.uid(source.SOPInstanceUID)
