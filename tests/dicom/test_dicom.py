"""Decode, validate and derive: real pydicom files, real bytes, hostile inputs."""

from __future__ import annotations

import hashlib
import io
import logging
import tracemalloc
import warnings
import zlib

import numpy as np
import pydicom
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.uid import (
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    MRImageStorage,
    generate_uid,
)

from agent.demo.sample_series import build_series
from agent.dicom.decode import REASONS, Scan, ScanRejected, decode_scan
from agent.dicom.derive import ModelIdentity, derive_instance, derived_uids, result_message_id
from agent.model.bundle import InputContract, OutputContract

BUDGET = 1 << 20  # 1 Mpixel
CAP = 8 << 20  # 8 MiB
MODEL = ModelIdentity("t1w-to-t2w", "1.2.0", "ab" * 32)
OUT_MR = OutputContract(
    modality="MR", scale=1000.0, series_description="SYNTHETIC T2w - NOT FOR DIAGNOSTIC USE"
)
SECRETS = ("SECRET^PATIENT", "SECRET", "PAT-7731", "19450101", "Hidden study")


def contract(**kw: object) -> InputContract:
    base: dict[str, object] = {
        "modality": "MR",
        "shape": (256, 256),
        "pixel_spacing_mm": (1.0, 1.0),
        "series_description_pattern": r"\bT1w?\b",
    }
    base.update(kw)
    return InputContract(**base)  # type: ignore[arg-type]


def phantom(n: int = 3, rows: int = 64, cols: int = 64) -> np.ndarray:
    z, y, x = np.mgrid[0:n, 0:rows, 0:cols].astype(np.float32)
    r2 = ((y - rows / 2) / (rows / 2.5)) ** 2 + ((x - cols / 2) / (cols / 3)) ** 2
    vol = np.where(r2 < 1.0, 800 + 400 * np.cos(x / 7) * np.sin(y / 5) + 20 * z, 0)
    return vol.astype(np.uint16)


def series(n: int = 3, rows: int = 64, cols: int = 64, **kw: object) -> list[bytes]:
    kw.setdefault("spacing_mm", (2.0, 0.9, 0.9))
    return build_series(phantom(n, rows, cols), **kw)  # type: ignore[arg-type]


def edit(payload: bytes, change: object, **write: object) -> bytes:
    """Re-encode `payload` after `change(ds)`."""
    ds = pydicom.dcmread(io.BytesIO(payload))
    change(ds)  # type: ignore[operator]
    out = io.BytesIO()
    ds.save_as(out, **write)  # type: ignore[arg-type]
    return out.getvalue()


def decode(payload: bytes, c: InputContract | None = None, **kw: int) -> Scan:
    return decode_scan(
        payload,
        c or contract(),
        pixel_budget=kw.get("pixel_budget", BUDGET),
        max_payload_bytes=kw.get("max_payload_bytes", CAP),
    )


def rejected(payload: bytes, c: InputContract | None = None, **kw: int) -> ScanRejected:
    with pytest.raises(ScanRejected) as info:
        decode(payload, c, **kw)
    assert info.value.reason in REASONS
    assert info.value.payload_sha256 == hashlib.sha256(payload).hexdigest()
    return info.value


def pydicom_file(name: str) -> bytes:
    path = get_testdata_file(name)
    assert path is not None
    with open(path, "rb") as f:
        return f.read()


# --- decoding good input ------------------------------------------------------------


def test_generated_mr_slice_decodes() -> None:
    payloads = series()
    scan = decode(payloads[1])
    assert scan.pixels.dtype == np.float32 and scan.pixels.shape == (64, 64)
    np.testing.assert_array_equal(scan.pixels, phantom()[1].astype(np.float32))
    assert scan.pixel_spacing == (0.9, 0.9) and not scan.pixel_spacing_assumed
    ds = pydicom.dcmread(io.BytesIO(payloads[1]))
    assert scan.sop_instance_uid == ds.SOPInstanceUID
    assert scan.sop_class_uid == MRImageStorage
    assert scan.series_instance_uid == ds.SeriesInstanceUID
    assert scan.study_instance_uid == ds.StudyInstanceUID
    assert scan.payload_sha256 == hashlib.sha256(payloads[1]).hexdigest()
    assert "PixelData" in scan.dataset


def test_pydicom_mr_small_signed_with_rescale() -> None:
    payload = pydicom_file("MR_small.dcm")
    scan = decode(payload, contract(series_description_pattern=None))
    ds = pydicom.dcmread(io.BytesIO(payload))
    assert ds.PixelRepresentation == 1
    np.testing.assert_array_equal(scan.pixels, ds.pixel_array.astype(np.float32))
    assert scan.pixel_spacing == (0.3125, 0.3125)

    def rescale(d: Dataset) -> None:
        d.RescaleSlope, d.RescaleIntercept = "2", "-10"

    scaled = edit(payload, rescale)
    scan2 = decode(scaled, contract(series_description_pattern=None))
    np.testing.assert_allclose(scan2.pixels, ds.pixel_array * 2.0 - 10.0)


def test_rle_is_decoded_without_plugins() -> None:
    scan = decode(pydicom_file("MR_small_RLE.dcm"), contract(series_description_pattern=None))
    assert scan.pixels.shape == (64, 64)


def test_no_preamble_and_implicit_vr_are_accepted() -> None:
    payload = series()[0]
    assert decode(payload[132:]).pixels.shape == (64, 64)  # file meta, no preamble

    ds = pydicom.dcmread(io.BytesIO(payload))
    del ds.file_meta
    ds.preamble = None
    out = io.BytesIO()
    pydicom.dcmwrite(out, ds, implicit_vr=True, little_endian=True)
    scan = decode(out.getvalue())
    np.testing.assert_array_equal(scan.pixels, phantom()[0].astype(np.float32))


def test_absent_pixel_spacing_is_assumed_and_flagged() -> None:
    scan = decode(edit(series()[0], lambda d: delattr(d, "PixelSpacing")))
    assert scan.pixel_spacing == (1.0, 1.0) and scan.pixel_spacing_assumed


# --- rejections -------------------------------------------------------------------


@pytest.mark.parametrize(
    "junk",
    [b"", b"hello world", b"\0" * 200, np.random.default_rng(7).bytes(4096), b"\0" * 128 + b"DICM"],
)
def test_random_bytes_are_not_dicom(junk: bytes) -> None:
    assert rejected(junk).reason == "not_dicom"


def test_payload_cap_is_checked_first() -> None:
    exc = rejected(b"x" * 1001, max_payload_bytes=1000)
    assert exc.reason == "payload_too_large"


@pytest.mark.parametrize("keep", [0.3, 0.6, 0.95])
def test_truncated_dicom_is_rejected(keep: float) -> None:
    payload = series()[0]
    exc = rejected(payload[: int(len(payload) * keep)])
    assert exc.reason in {"pixel_decode_failed", "not_dicom", "missing_tag", "no_pixel_data"}


def test_truncated_header_reads_as_not_dicom_or_missing_tag() -> None:
    payload = series()[0]
    for cut in (140, 300, 600):
        assert rejected(payload[:cut]).reason in {"not_dicom", "missing_tag"}


def test_no_pixel_data() -> None:
    assert rejected(edit(series()[0], lambda d: delattr(d, "PixelData"))).reason == "no_pixel_data"


def test_ct_into_mr_contract_is_wrong_modality() -> None:
    exc = rejected(pydicom_file("CT_small.dcm"))
    assert exc.reason == "wrong_modality"
    assert "CT" in str(exc) and "MR" in str(exc)


def test_series_description_mismatch() -> None:
    payload = series(series_description="T2w FLAIR axial")
    assert rejected(payload[0]).reason == "series_mismatch"
    missing = edit(series()[0], lambda d: delattr(d, "SeriesDescription"))
    assert rejected(missing).reason == "series_mismatch"
    assert decode(missing, contract(series_description_pattern=None)).pixels.size == 64 * 64
    assert decode(series(series_description="sag t1 MPRAGE")[0]).pixels.size == 64 * 64


def huge_header(rows: int = 60000, cols: int = 60000) -> bytes:
    ds = pydicom.dcmread(io.BytesIO(series()[0]))
    ds.Rows, ds.Columns = rows, cols
    ds.PixelData = b"\0" * 16
    out = io.BytesIO()
    ds.save_as(out)
    return out.getvalue()


def test_huge_header_is_rejected_without_allocating() -> None:
    payload = huge_header()
    tracemalloc.start()
    try:
        exc = rejected(payload)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert exc.reason == "pixel_budget_exceeded"
    assert "60000" in str(exc)
    assert peak < 16 << 20  # 60000 x 60000 x 2 bytes would be 7.2 GB


def test_huge_header_within_a_huge_budget_still_fails_safely() -> None:
    exc = rejected(huge_header(3000, 3000), pixel_budget=10**7)
    assert exc.reason == "pixel_decode_failed"


def test_multiframe_photometric_bits_and_samples() -> None:
    base = series()[0]
    frames = edit(base, lambda d: setattr(d, "NumberOfFrames", 2))
    assert rejected(frames).reason == "multiframe_unsupported"
    mono1 = edit(base, lambda d: setattr(d, "PhotometricInterpretation", "MONOCHROME1"))
    assert rejected(mono1).reason == "unsupported_photometric"
    rgb = edit(base, lambda d: setattr(d, "SamplesPerPixel", 3))
    assert rejected(rgb).reason == "unsupported_photometric"
    bits = edit(base, lambda d: setattr(d, "BitsAllocated", 32))
    assert rejected(bits).reason == "unsupported_bits"
    assert rejected(base, contract(bits_allocated=(8,))).reason == "unsupported_bits"


def test_monochrome1_is_flipped_when_the_contract_accepts_it() -> None:
    mono1 = edit(series()[0], lambda d: setattr(d, "PhotometricInterpretation", "MONOCHROME1"))
    scan = decode(mono1, contract(photometric_interpretations=("MONOCHROME1", "MONOCHROME2")))
    np.testing.assert_array_equal(scan.pixels, 65535.0 - phantom()[0].astype(np.float32))


def test_zero_rescale_slope_is_refused() -> None:
    zero = edit(series()[0], lambda d: setattr(d, "RescaleSlope", "0"))
    assert rejected(zero).reason == "pixel_decode_failed"


@pytest.mark.parametrize(
    "keyword", ["SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID", "Modality", "Rows"]
)
def test_missing_required_tag(keyword: str) -> None:
    exc = rejected(edit(series()[0], lambda d: delattr(d, keyword)))
    assert exc.reason == "missing_tag" and keyword in str(exc)


@pytest.mark.filterwarnings("ignore:Invalid value for VR DS")
@pytest.mark.parametrize("spacing", [["0", "0"], ["1e6", "1"], ["0.5"], ["nan", "1"]])
def test_bad_pixel_spacing(spacing: list[str]) -> None:
    exc = rejected(edit(series()[0], lambda d: setattr(d, "PixelSpacing", spacing)))
    assert exc.reason == "bad_geometry"


def test_zero_rows_is_bad_geometry() -> None:
    assert rejected(edit(series()[0], lambda d: setattr(d, "Rows", 0))).reason == "bad_geometry"


def test_deflated_transfer_syntax_is_refused_before_inflating() -> None:
    payload = series()[0]
    ds = pydicom.dcmread(io.BytesIO(payload))
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    assert rejected(out.getvalue()).reason == "unsupported_transfer_syntax"
    meta_end = 132 + 12 + ds.file_meta.FileMetaInformationGroupLength
    deflate = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    body = deflate.compress(b"\0" * (64 << 20)) + deflate.flush()  # 64 MiB inflated
    bomb = out.getvalue()[:meta_end] + body
    tracemalloc.start()
    try:
        assert rejected(bomb).reason == "unsupported_transfer_syntax"
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20


def test_unknown_transfer_syntax() -> None:
    def change(d: Dataset) -> None:
        d.file_meta.TransferSyntaxUID = "1.2.3.4.5"

    out = edit(series()[0], change)
    assert rejected(out).reason in {"unsupported_transfer_syntax", "not_dicom"}


# --- never anything but ScanRejected ------------------------------------------------

VALID = series(1, 32, 32)[0]


def _check_mutant(mutant: bytes) -> None:
    try:
        scan = decode(mutant, contract(series_description_pattern=None))
    except ScanRejected as exc:
        assert exc.reason in REASONS
        return
    assert scan.pixels.ndim == 2 and scan.pixels.dtype == np.float32


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    edits=st.lists(
        st.tuples(st.integers(0, len(VALID) - 1), st.integers(0, 255)), min_size=1, max_size=8
    ),
    cut=st.integers(0, len(VALID)),
    header_only=st.booleans(),
)
def test_mutations_raise_only_scan_rejected(
    edits: list[tuple[int, int]], cut: int, header_only: bool
) -> None:
    data = bytearray(VALID)
    header_end = len(VALID) - 32 * 32 * 2
    for pos, value in edits:
        data[pos % header_end if header_only else pos] = value
    _check_mutant(bytes(data))
    _check_mutant(bytes(data[:cut]))


def test_many_seeded_header_mutations() -> None:
    rng = np.random.default_rng(2024)
    header_end = len(VALID) - 32 * 32 * 2
    for _ in range(1500):
        data = bytearray(VALID)
        for pos in rng.integers(0, header_end, size=rng.integers(1, 6)):
            data[pos] = int(rng.integers(0, 256))
        _check_mutant(bytes(data))


# --- no PHI in rejections -------------------------------------------------------------


def _secret_payload() -> bytes:
    def change(d: Dataset) -> None:
        d.PatientName = "SECRET^PATIENT"
        d.PatientID = "PAT-7731"
        d.PatientBirthDate = "19450101"
        d.StudyDescription = "Hidden study"
        d.SeriesDescription = "T1w for SECRET^PATIENT"

    return edit(series()[0], change)


def test_rejection_messages_hold_no_phi(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    payload = _secret_payload()
    ds = pydicom.dcmread(io.BytesIO(payload))
    uids = [ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID]
    cases = [
        (payload, contract(modality="CT")),
        (payload, contract(series_description_pattern="flair")),
        (payload, contract(photometric_interpretations=("RGB",))),
        (payload, contract(bits_allocated=(8,))),
        (payload[: len(payload) - 100], contract(series_description_pattern=None)),
        (
            edit(payload, lambda d: delattr(d, "PixelData")),
            contract(series_description_pattern=None),
        ),
        (edit(payload, lambda d: setattr(d, "Modality", "SECRET")), contract()),
        (
            edit(payload, lambda d: setattr(d, "Rows", 9000)),
            contract(series_description_pattern=None),
        ),
    ]
    reasons = set()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for data, c in cases:
            exc = rejected(data, c)
            reasons.add(exc.reason)
            text = f"{exc} {exc.reason} {exc.args!r}"
            for secret in (*SECRETS, *uids):
                assert secret not in text, (exc.reason, text)
    assert len(reasons) >= 6
    logged = [r.getMessage() for r in caplog.records] + [str(w.message) for w in caught]
    for message in logged:
        for secret in SECRETS:
            assert secret not in message


def test_pydicom_warnings_quoting_values_are_silenced(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)

    def change(d: Dataset) -> None:
        d.add_new(0x00100020, "LO", "SECRET-ID-" * 10)  # too long for LO: pydicom warns
        d.add_new(0x00100030, "DA", "SECRETDATE")  # not a date: pydicom quotes it

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        payload = edit(series()[0], change)
    caplog.clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        scan = decode(payload)
        derived = _derive(scan)
    logged = [r.getMessage() for r in caplog.records] + [str(w.message) for w in caught]
    assert not [m for m in logged if "SECRET" in m]
    assert b"SECRETDATE" in derived  # the sealed payload still carries the source's module


# --- the derived instance ------------------------------------------------------------


COPIED = (
    "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
    "StudyID", "AccessionNumber", "ReferringPhysicianName", "InstanceNumber",
    "ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "SliceThickness",
    "SliceLocation", "FrameOfReferenceUID",
)  # fmt: skip


def _derive(scan: Scan, model: ModelIdentity = MODEL, output: OutputContract = OUT_MR) -> bytes:
    stored = scan.pixels * 1.5 + 0.4
    return derive_instance(
        scan, stored, model, output, device_id="edge-07", software_version="0.1.0"
    )


def test_derived_instance_tags() -> None:
    payloads = series(3, series_instance_uid=generate_uid())
    src = pydicom.dcmread(io.BytesIO(payloads[1]))
    scan = decode(payloads[1])
    out = pydicom.dcmread(io.BytesIO(_derive(scan)))

    assert out.preamble is not None and out.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert out.SOPClassUID == MRImageStorage == out.file_meta.MediaStorageSOPClassUID
    assert out.SOPInstanceUID == out.file_meta.MediaStorageSOPInstanceUID
    assert out.SOPInstanceUID != src.SOPInstanceUID
    assert out.SeriesInstanceUID != src.SeriesInstanceUID
    assert out.StudyInstanceUID == src.StudyInstanceUID
    for keyword in COPIED:
        assert out[keyword].value == src[keyword].value, keyword
    assert out.Modality == "MR"
    assert list(out.ImageType) == ["DERIVED", "SECONDARY", "OTHER"]
    assert out.SeriesDescription == OUT_MR.series_description
    assert out.SeriesNumber == src.SeriesNumber + 1000
    for seq in (out.SourceImageSequence, out.ReferencedImageSequence):
        assert len(seq) == 1
        assert seq[0].ReferencedSOPClassUID == src.SOPClassUID
        assert seq[0].ReferencedSOPInstanceUID == src.SOPInstanceUID
    assert out.SourceImageSequence[0].PurposeOfReferenceCodeSequence[0].CodeValue == "121322"
    assert MODEL.name in out.DerivationDescription
    assert MODEL.version in out.DerivationDescription
    assert f"sha256:{MODEL.digest}" in out.DerivationDescription
    assert out.BurnedInAnnotation == "NO"
    assert out.Manufacturer and "0.1.0" in out.SoftwareVersions
    assert (out.BitsAllocated, out.BitsStored, out.HighBit, out.PixelRepresentation) == (
        16,
        16,
        15,
        0,
    )
    assert (out.SamplesPerPixel, out.PhotometricInterpretation) == (1, "MONOCHROME2")
    assert float(out.RescaleSlope) == 1.0 and float(out.RescaleIntercept) == 0.0
    expected = np.clip(np.rint(phantom()[1] * 1.5 + 0.4), 0, 65535).astype(np.uint16)
    np.testing.assert_array_equal(out.pixel_array, expected)
    nz = expected[expected > 0]
    lo, hi = np.percentile(nz, [1, 99])
    assert float(out.WindowCenter) == pytest.approx((lo + hi) / 2, rel=1e-4)
    assert float(out.WindowWidth) == pytest.approx(hi - lo, rel=1e-4)


def test_derived_uids_are_deterministic_and_shared_per_series() -> None:
    payloads = series(3)
    scans = [decode(p) for p in payloads]
    first = [_derive(s) for s in scans]
    assert first == [_derive(s) for s in scans]  # byte-for-byte deterministic
    outs = [pydicom.dcmread(io.BytesIO(b)) for b in first]
    assert len({o.SeriesInstanceUID for o in outs}) == 1
    assert len({o.SOPInstanceUID for o in outs}) == 3
    assert (outs[0].SOPInstanceUID, outs[0].SeriesInstanceUID) == derived_uids(
        scans[0], MODEL.digest
    )
    other = ModelIdentity(MODEL.name, "1.3.0", "cd" * 32)
    again = pydicom.dcmread(io.BytesIO(_derive(scans[0], other)))
    assert again.SOPInstanceUID != outs[0].SOPInstanceUID
    assert again.SeriesInstanceUID != outs[0].SeriesInstanceUID
    for o in outs:
        assert len(o.SOPInstanceUID) <= 64 and o.SOPInstanceUID.is_valid


def test_derived_ct_output_and_clipping() -> None:
    scan = decode(series(1)[0])
    ct = OutputContract(modality="CT", scale=1000.0, rescale_intercept=-1024.0, units="HU",
                        series_description="synthetic CT")  # fmt: skip
    stored = np.full(scan.pixels.shape, 70000.0, dtype=np.float32)
    stored[0, :4] = [-5.0, np.nan, 1.49, 1.51]
    out = pydicom.dcmread(
        io.BytesIO(derive_instance(scan, stored, MODEL, ct, device_id="d", software_version="v"))
    )
    assert out.SOPClassUID == CTImageStorage and out.Modality == "CT"
    assert out.RescaleType == "HU" and float(out.RescaleIntercept) == -1024.0
    assert list(out.pixel_array[0, :5]) == [0, 0, 1, 2, 65535]
    assert "synthetic" in out.SeriesDescription.lower()


def test_derived_description_is_marked_synthetic_and_fallback_window() -> None:
    scan = decode(series(1)[0])
    plain = OutputContract(modality="MR", scale=1.0, series_description="T2w")
    zeros = np.zeros(scan.pixels.shape, dtype=np.uint16)
    out = pydicom.dcmread(
        io.BytesIO(derive_instance(scan, zeros, MODEL, plain, device_id="d", software_version="v"))
    )
    assert out.SeriesDescription.startswith("SYNTHETIC")
    assert float(out.WindowWidth) > 0


def test_derive_rejects_bad_arguments() -> None:
    scan = decode(series(1)[0])
    with pytest.raises(ValueError, match="shape"):
        derive_instance(scan, np.zeros((3, 3)), MODEL, OUT_MR, device_id="d", software_version="v")
    with pytest.raises(ValueError, match="modality"):
        derive_instance(scan, scan.pixels, MODEL, OutputContract(modality="PT", scale=1.0),
                        device_id="d", software_version="v")  # fmt: skip


def test_derived_instance_decodes_again() -> None:
    scan = decode(pydicom_file("MR_small.dcm"), contract(series_description_pattern=None))
    again = decode(_derive(scan), contract(series_description_pattern="synthetic"))
    assert again.pixels.shape == scan.pixels.shape
    assert again.pixel_spacing == scan.pixel_spacing


def test_result_message_id() -> None:
    uid, digest = "1.2.3.4", "ab" * 32
    expected = hashlib.sha256(f"{uid}\n{digest}".encode()).hexdigest()[:32]
    assert result_message_id(uid, digest) == expected
    assert len(expected) == 32
    assert result_message_id(uid, "cd" * 32) != expected


def test_scan_rejected_refuses_unknown_reasons() -> None:
    with pytest.raises(ValueError):
        ScanRejected("made_up", "x")


def test_a_known_digest_is_not_recomputed() -> None:
    payload = series(1)[0]
    given = "0" * 64  # the caller's (the inbox's) digest is trusted as given
    assert decode_scan(payload, contract(), pixel_budget=BUDGET, max_payload_bytes=CAP,
                       payload_sha256=given).payload_sha256 == given
    with pytest.raises(ScanRejected) as info:
        decode_scan(b"junk" * 100, contract(), pixel_budget=BUDGET, max_payload_bytes=CAP,
                    payload_sha256=given)
    assert info.value.payload_sha256 == given


def test_pixel_data_shorter_than_the_header_says_is_named_in_numbers() -> None:
    """Rows edited upward (a gateway bug): "ValueError" told the site engineer nothing."""
    base = series()[0]
    head = pydicom.dcmread(io.BytesIO(base))
    rows, cols = int(head.Rows), int(head.Columns)
    taller = edit(base, lambda d: setattr(d, "Rows", rows + 10))
    exc = rejected(taller)
    assert exc.reason == "pixel_decode_failed"
    assert str(exc) == (
        f"PixelData holds {rows * cols * 2} bytes, but Rows x Columns x SamplesPerPixel x "
        f"BitsAllocated ({rows + 10} x {cols} x 1 x 16 bits) needs {(rows + 10) * cols * 2}: "
        "the header and the pixel data disagree")
