"""The per-series derived-instance writer: the same bytes as pydicom's generic writer, and
an instance that a DICOM validator (dciodvfy, pydicom in RAISE mode) accepts."""

from __future__ import annotations

import io
import shutil
import subprocess
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom import config
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.uid import ImplicitVRLittleEndian, generate_uid

from agent.demo.sample_series import build_series, load_demo_slab
from agent.dicom.decode import Scan, decode_scan
from agent.dicom.deid import Deidentifier, DeidOptions
from agent.dicom.derive import (
    TYPE2_EMPTY,
    ModelIdentity,
    derive_instance,
    derive_instance_generic,
    to_uint16,
)
from agent.dicom.derived_writer import DerivedWriter, split_elements
from agent.dicom.series import slice_info
from agent.model.bundle import InputContract, OutputContract

MODEL = ModelIdentity("t1w-to-t2w", "1.2.0", "ab" * 32)
OUT_MR = OutputContract(modality="MR", scale=1000.0, series_description="SYNTHETIC T2w")
OUT_CT = OutputContract(modality="CT", scale=1000.0, rescale_intercept=-1024.0, units="HU",
                        series_description="synthetic CT")  # fmt: skip
ANY_MR = InputContract(modality="MR", shape=(256, 256), pixel_spacing_mm=(1.0, 1.0),
                       bits_allocated=(8, 16))  # fmt: skip


def decode(payload: bytes) -> Scan:
    return decode_scan(payload, ANY_MR, pixel_budget=1 << 22, max_payload_bytes=1 << 24)


def stored_for(scan: Scan) -> np.ndarray:
    return scan.pixels * np.float32(1.7) + np.float32(3.2)


def both(payload: bytes, writer: DerivedWriter, output: OutputContract = OUT_MR,
         before: Callable[[Scan], object] = lambda s: None,
         deid: Deidentifier | None = None) -> tuple[bytes, bytes]:
    """(fast, generic) derived bytes, each from its own decode of ``payload`` (the generic
    writer converts every copied element of the source dataset it reads)."""
    fast_scan, generic_scan = decode(payload), decode(payload)
    before(fast_scan)
    before(generic_scan)
    kw = {"device_id": "edge-07", "software_version": "0.1.0"}
    fast = derive_instance(fast_scan, stored_for(fast_scan), MODEL, output, writer=writer,
                           deid=deid, **kw)
    generic = derive_instance_generic(generic_scan, stored_for(generic_scan), MODEL, output,
                                      deid=deid, **kw)
    return fast, generic


def edited(payload: bytes, change: Callable[[Dataset], None], **write: object) -> bytes:
    ds = pydicom.dcmread(io.BytesIO(payload))
    change(ds)
    out = io.BytesIO()
    ds.save_as(out, **write)  # type: ignore[arg-type]
    return out.getvalue()


def pydicom_file(name: str) -> bytes:
    path = get_testdata_file(name)
    assert path is not None
    return Path(path).read_bytes()


def _implicit(ds: Dataset) -> None:
    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian


def _latin1_name(ds: Dataset) -> None:
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.PatientName = "Müller^Jürgen"
    ds.StudyDescription = "Schädel"


def _utf8_name(ds: Dataset) -> None:
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.PatientName = "Doe^Jöhn=山田^太郎"


def _odd_numbers(ds: Dataset) -> None:
    """Valid IS/DS strings that are not in their shortest form (kept as written)."""
    ds.InstanceNumber = "+0002"
    ds.ImagePositionPatient = ["+1.50", "-0.0", "1e3"]
    ds.SliceLocation = ".5"


def _leading_spaces(payload: bytes) -> bytes:
    """The same instance with InstanceNumber and SliceLocation right-aligned in their
    fields (leading spaces, which pydicom strips on reading): the writer must leave such
    values to pydicom. Edited in the bytes, since pydicom would not write them."""
    out = bytearray(payload)
    for head in (b"\x20\x00\x13\x00IS", b"\x20\x00\x41\x10DS"):
        at = out.index(head) + 6
        length = int.from_bytes(out[at : at + 2], "little")
        value = bytes(out[at + 2 : at + 2 + length]).strip()
        out[at + 2 : at + 2 + length] = value.rjust(length)
        assert out[at + 2 : at + 3] == b" " or len(value) == length
    return bytes(out)


def _no_type2(ds: Dataset) -> None:
    for keyword in ("PatientName", "PatientID", "StudyDate", "InstanceNumber",
                    "SpecificCharacterSet", "SliceLocation", "SeriesNumber"):
        delattr(ds, keyword)


def _demo(n: int) -> list[bytes]:
    return build_series(load_demo_slab().t1[:n], spacing_mm=(1.0, 1.0, 1.0))


def _matrix(rows: int, spacing: float) -> list[bytes]:
    vol = np.zeros((3, rows, rows), dtype=np.uint16)
    y, x = np.mgrid[0:rows, 0:rows]
    vol[:] = np.where((y - rows / 2) ** 2 + (x - rows / 2) ** 2 < (rows / 3) ** 2,
                      900 + (x * 7 + y * 3) % 200, 0)
    return build_series(vol, spacing_mm=(1.0, spacing, spacing))


SOURCES: dict[str, Callable[[], list[bytes]]] = {
    "demo-256": lambda: _demo(4),
    "mr-320-at-0.8mm": lambda: _matrix(320, 0.8),
    "pydicom-MR_small": lambda: [pydicom_file("MR_small.dcm")],
    "implicit-vr-source": lambda: [edited(p, _implicit) for p in _demo(2)],
    "latin1-patient": lambda: [edited(p, _latin1_name) for p in _demo(2)],
    "utf8-patient": lambda: [edited(p, _utf8_name) for p in _demo(2)],
    "type2-absent": lambda: [edited(p, _no_type2) for p in _demo(2)],
    "odd-number-strings": lambda: [edited(p, _odd_numbers) for p in _demo(2)],
    "leading-space-numbers": lambda: [_leading_spaces(p) for p in _demo(2)],
}


@pytest.mark.parametrize("source", sorted(SOURCES))
def test_fast_writer_bytes_equal_the_generic_writer(source: str) -> None:
    writer = DerivedWriter()
    for payload in SOURCES[source]():
        fast, generic = both(payload, writer)
        assert fast == generic
        again = pydicom.dcmread(io.BytesIO(fast))
        assert again == pydicom.dcmread(io.BytesIO(generic))  # same dataset read back


DEIDS = {"basic": Deidentifier(bytes(range(32)), type2=TYPE2_EMPTY),
         "all-options": Deidentifier(bytes(range(32)), DeidOptions(True, True, True),
                                     type2=TYPE2_EMPTY)}


@pytest.mark.parametrize("profile", sorted(DEIDS))
@pytest.mark.parametrize("source", sorted(SOURCES))
def test_deidentified_fast_writer_bytes_equal_the_generic_writer(source: str,
                                                                 profile: str) -> None:
    writer, deid = DerivedWriter(), DEIDS[profile]
    for payload in SOURCES[source]():
        fast, generic = both(payload, writer, deid=deid)
        assert fast == generic
        ds = read_strictly(fast)
        assert ds.PatientIdentityRemoved == "YES" and ds.PatientName == ""
        assert ds.SourceImageSequence[0].ReferencedSOPInstanceUID.startswith("2.25.")
        assert "StudyDescription" not in ds


def test_deidentified_memo_never_mixes_patients() -> None:
    """Two patients' series interleaved through one writer with shifted dates: each slice
    gets its own patient's shift (the date offset is part of every memo key)."""
    writer, deid = DerivedWriter(), DEIDS["all-options"]
    other = [edited(p, lambda ds: (setattr(ds, "PatientID", "OTHER-9"),
                                   setattr(ds, "SeriesInstanceUID", generate_uid())))
             for p in _demo(2)]
    dates: dict[str, set[str]] = {}
    for mine, theirs in zip(_demo(2), other, strict=True):
        for payload in (mine, theirs):
            fast, generic = both(payload, writer, deid=deid)
            assert fast == generic
            patient = str(pydicom.dcmread(io.BytesIO(payload)).PatientID)
            dates.setdefault(patient, set()).add(pydicom.dcmread(io.BytesIO(fast)).StudyDate)
    assert len(dates) == 2 and all(len(d) == 1 for d in dates.values())
    assert len(set.union(*dates.values())) == 2


def test_ct_output_and_a_2_5d_scan_whose_geometry_was_read() -> None:
    writer = DerivedWriter()
    for payload in _demo(3):
        fast, generic = both(payload, writer, OUT_CT)
        assert fast == generic
        # slice_info converts ImagePositionPatient & co. in the source dataset first.
        fast, generic = both(payload, writer, before=slice_info)
        assert fast == generic


def test_values_that_change_within_a_series_are_never_reused() -> None:
    """The memo and the template are keyed by values: a copied element that differs in the
    next slice of the same series (a name, a time, an orientation) is written anew."""
    writer = DerivedWriter()
    uid = generate_uid()
    payloads = build_series(load_demo_slab().t1[:3], series_instance_uid=uid)
    changes: list[Callable[[Dataset], None]] = [
        lambda ds: None,
        lambda ds: setattr(ds, "PatientName", "OTHER^NAME"),
        lambda ds: setattr(ds, "ContentTime", "235959"),
        lambda ds: setattr(ds, "ImageOrientationPatient", [0, 1, 0, 0, 0, -1]),
        lambda ds: setattr(ds, "SeriesNumber", 7),
    ]
    outs = []
    for change in changes:
        fast, generic = both(edited(payloads[1], change), writer)
        assert fast == generic
        outs.append(pydicom.dcmread(io.BytesIO(fast)))
    assert outs[1].PatientName == "OTHER^NAME" and outs[0].PatientName != "OTHER^NAME"
    assert outs[2].ContentTime == "235959"
    assert [float(v) for v in outs[3].ImageOrientationPatient] == [0, 1, 0, 0, 0, -1]
    assert outs[4].SeriesNumber == 1007 and outs[0].SeriesNumber == 1001


def test_templates_are_bounded() -> None:
    writer = DerivedWriter()
    payload = _demo(1)[0]
    for i in range(40):
        scan = decode(edited(payload, lambda ds, i=i: setattr(ds, "SeriesNumber", i)))
        derive_instance(scan, stored_for(scan), MODEL, OUT_MR, device_id="d",
                        software_version="v", writer=writer)
    assert len(writer._templates) <= 16


def test_split_elements_refuses_what_it_cannot_walk() -> None:
    fast, _ = both(_demo(1)[0], DerivedWriter())
    tags = [tag for tag, _ in split_elements(fast, 132)]
    assert tags == sorted(tags) and tags[-1] == 0x7FE00010
    with pytest.raises(ValueError):
        split_elements(fast[:-10], 132)


# --- validation ---------------------------------------------------------------------


def dciodvfy_errors(data: bytes, tmp_path: Path) -> list[str]:
    """The error lines dciodvfy (dicom3tools) reports for an instance."""
    binary = shutil.which("dciodvfy")
    if binary is None:
        pytest.fail("dciodvfy is not installed: run `make test` (it installs Debian's "
                    "dicom3tools) or `apt-get install dicom3tools`")
    path = tmp_path / "instance.dcm"
    path.write_bytes(data)
    done = subprocess.run([binary, str(path)], capture_output=True, text=True, timeout=60,
                          check=False)
    lines = (done.stdout + done.stderr).splitlines()
    return [line for line in lines if line.startswith("Error")]


@contextmanager
def strict_reading() -> Iterator[None]:
    old = config.settings.reading_validation_mode
    config.settings.reading_validation_mode = config.RAISE
    try:
        yield
    finally:
        config.settings.reading_validation_mode = old


def read_strictly(data: bytes) -> Dataset:
    """Read an instance with pydicom raising on every invalid value (each one converted)."""
    with strict_reading():
        ds = pydicom.dcmread(io.BytesIO(data))
        for elem in ds.iterall():
            _ = elem.value
    return ds


@pytest.mark.parametrize("output", [OUT_MR, OUT_CT], ids=["MR", "CT"])
@pytest.mark.parametrize("profile", [None, "basic", "all-options"])
def test_derived_instance_passes_dciodvfy(output: OutputContract, profile: str | None,
                                          tmp_path: Path) -> None:
    writer, deid = DerivedWriter(), None if profile is None else DEIDS[profile]
    for payload in _demo(2):
        fast, _ = both(payload, writer, output, deid=deid)
        assert dciodvfy_errors(fast, tmp_path) == []


def test_dciodvfy_check_fails_on_a_broken_instance(tmp_path: Path) -> None:
    """The check above can fail: an instance without a type 1 element, or with the image
    type the writer had before (no value 3), is reported."""
    fast, _ = both(_demo(1)[0], DerivedWriter())
    assert any("Rows" in e for e in dciodvfy_errors(edited(fast, lambda ds: delattr(ds, "Rows")),
                                                    tmp_path))
    old_type = edited(fast, lambda ds: setattr(ds, "ImageType", ["DERIVED", "SECONDARY"]))
    assert any("ImageType" in e for e in dciodvfy_errors(old_type, tmp_path))


def test_derived_instance_reads_back_in_raise_mode() -> None:
    writer = DerivedWriter()
    for source in ("demo-256", "utf8-patient", "pydicom-MR_small"):
        payload = SOURCES[source]()[0]
        fast, _ = both(payload, writer)
        ds = read_strictly(fast)
        assert ds.SOPInstanceUID == ds.file_meta.MediaStorageSOPInstanceUID


def test_raise_mode_reading_fails_on_a_broken_instance() -> None:
    fast, _ = both(_demo(1)[0], DerivedWriter())
    # Corrupt the SOP Instance UID in place (same length): letters are not a UI value.
    ds = pydicom.dcmread(io.BytesIO(fast))
    uid = str(ds.SOPInstanceUID).encode()
    broken = fast.replace(uid, b"X" * len(uid))
    with pytest.raises(ValueError):
        read_strictly(broken)


def test_to_uint16_rounds_and_clips_every_special_value() -> None:
    values = [np.nan, np.inf, -np.inf, -0.6, 0.5, 1.5, 2.5, 65535.4, 65535.6, 70000.0]
    expected = [0, 65535, 0, 0, 0, 2, 2, 65535, 65535, 65535]  # rint: halves to even
    assert to_uint16(np.array(values, dtype=np.float32)).tolist() == expected
    # float64 goes through float32 first, as before: 1.4999999999 is 1.5 there, so 2.
    assert to_uint16(np.array([1.4999999999, 3.7], dtype=np.float64)).tolist() == [2, 4]


def test_the_memo_forgets_a_series_when_the_next_one_starts() -> None:
    """The memo holds copied patient values; it keeps those of the series being written
    only, not of every patient since the agent started."""
    writer = DerivedWriter()
    first = build_series(load_demo_slab().t1[:2], patient_name="FIRST^PATIENT")
    second = build_series(load_demo_slab().t1[:2], patient_name="SECOND^PATIENT")

    def held() -> bytes:
        return b"".join(v for v in writer._memo.values() if v is not None)

    for payload in first:
        both(payload, writer)
    assert b"FIRST^PATIENT" in held()
    for payload in second:
        both(payload, writer)
    assert b"SECOND^PATIENT" in held() and b"FIRST^PATIENT" not in held()
