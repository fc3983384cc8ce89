"""The derived (synthetic) instance: new UIDs, provenance, a correct pixel module.

The result of a model on one scan becomes a DICOM instance of its own, labelled synthetic
and not for diagnostic use, that references its source and names the model (name, version,
digest). UIDs are derived from the source UIDs (their site pseudonyms when
de-identifying) and the model digest, so reprocessing the same scan with the same model
gives the same instance. With a ``Deidentifier`` the copied source attributes get their
PS3.15 Annex E actions (``agent.dicom.deid``); the agent's own attributes stay.
"""

from __future__ import annotations

import hashlib
import re
from contextlib import suppress
from dataclasses import dataclass
from io import BytesIO
from typing import TYPE_CHECKING

import numpy as np
import pydicom
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import (
    UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    MRImageStorage,
    generate_uid,
)

from agent.dicom.decode import Scan, quiet_pydicom
from agent.dicom.quantiles import positive_percentiles
from agent.model.bundle import OutputContract

if TYPE_CHECKING:
    from agent.dicom.deid import Deidentifier
    from agent.dicom.derived_writer import DerivedWriter


@dataclass(frozen=True)
class ModelIdentity:
    """The model that made a derived instance: recorded in its provenance and UIDs."""

    name: str
    version: str
    digest: str  # sha256 hex of the served model file


@dataclass(frozen=True)
class DomainMark:
    """The domain-shift score of the slice a derived instance comes from
    (``agent.daemon.domain_check``): recorded in a private block, and in ImageComments when
    flagged (docs/protocol.md, "Domain shift in the derived instance")."""

    score: float | None  # None: the slice had too little body to score
    series_score: float | None
    flagged: bool


DOMAIN_CREATOR = "IOMT-EDGE-AGENT DOMAIN"
DOMAIN_GROUP = 0x0071
IMAGE_COMMENTS = 0x00204000
DOMAIN_TAGS = (IMAGE_COMMENTS, 0x00710010, 0x00711001, 0x00711002, 0x00711003)
DOMAIN_WARNING = ("DOMAIN SHIFT WARNING: the input lies outside the training domain of the "
                  "model (score {score}, series {series}; 1.0 = threshold). A warning about "
                  "the input, not a measure of this image's error. NOT FOR DIAGNOSTIC USE")


def domain_elements(mark: DomainMark | None) -> list[DataElement]:
    """The elements that carry ``mark``, in tag order: ImageComments (flagged only), then the
    private block (0071,0010) creator, (0071,1001) slice score DS, (0071,1002) series score
    DS, (0071,1003) verdict CS (FLAGGED, IN_DOMAIN or UNSCORED)."""
    if mark is None:
        return []
    out = []
    if mark.flagged:
        text = DOMAIN_WARNING.format(score=_score(mark.score), series=_score(mark.series_score))
        out.append(DataElement(IMAGE_COMMENTS, "LT", text))
    out.append(DataElement(0x00710010, "LO", DOMAIN_CREATOR))
    if mark.score is not None:
        out.append(DataElement(0x00711001, "DS", format_ds(mark.score)))
    if mark.series_score is not None:
        out.append(DataElement(0x00711002, "DS", format_ds(mark.series_score)))
    verdict = "UNSCORED" if mark.score is None else "FLAGGED" if mark.flagged else "IN_DOMAIN"
    out.append(DataElement(0x00711003, "CS", verdict))
    return out


def _score(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"



_SOP_CLASS_FOR_MODALITY = {"MR": MRImageStorage, "CT": CTImageStorage}
_SYNTHETIC_MARK = re.compile(r"synthetic|not for diagnostic", re.IGNORECASE)
# Patient and study modules (de-identified when deid is on; the payload is sealed); what places the
# slice in space and in its series, so a viewer overlays the result on its source.
COPIED = (
    "SpecificCharacterSet", "PatientName", "PatientID", "IssuerOfPatientID",
    "PatientBirthDate", "PatientSex", "PatientAge", "PatientSize", "PatientWeight",
    "PatientIdentityRemoved", "DeidentificationMethod",
    "StudyInstanceUID", "StudyDate", "StudyTime", "StudyID", "AccessionNumber",
    "ReferringPhysicianName", "StudyDescription",
    "AcquisitionDate", "AcquisitionTime", "ContentDate", "ContentTime",
    "PatientPosition", "BodyPartExamined", "FrameOfReferenceUID", "PositionReferenceIndicator",
    "InstanceNumber", "ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing",
    "SliceThickness", "SpacingBetweenSlices", "SliceLocation",
)  # fmt: skip
TYPE2_EMPTY = (
    "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
    "ReferringPhysicianName", "StudyID", "AccessionNumber", "PositionReferenceIndicator",
    "InstanceNumber",
)  # fmt: skip
# De-identified, the derived instance records its own de-identification instead.
DEID_MARKERS = ("PatientIdentityRemoved", "DeidentificationMethod")
COPIED_DEID = tuple(k for k in COPIED if k not in DEID_MARKERS)


def copied_keywords(deid: Deidentifier | None) -> tuple[str, ...]:
    """The source attributes the derived instance copies (then de-identifies, with
    ``deid``)."""
    return COPIED if deid is None else COPIED_DEID


def source_uid(uid: str, deid: Deidentifier | None) -> str:
    """A source UID as the derived instance (and its message id) refers to it: the site's
    pseudonym when de-identifying."""
    return uid if deid is None else deid.uid(uid)


def format_ds(value: float) -> str:
    """A DS value string: 6 significant digits (a DS is at most 16 characters)."""
    return f"{value:.6g}"


def result_message_id(source_sop_instance_uid: str, model_digest: str) -> str:
    """The idempotency key of a result: the first 32 hex characters of
    ``sha256(f"{source_sop_instance_uid}\\n{model_digest}")``.

    The same source instance served by the same model always gets the same key, whichever
    node served it and however often it was redelivered, so consumers drop duplicates."""
    text = f"{source_sop_instance_uid}\n{model_digest}".encode()
    return hashlib.sha256(text).hexdigest()[:32]


def derived_uids(scan: Scan, model_digest: str,
                 deid: Deidentifier | None = None) -> tuple[str, str]:
    """The (SOP Instance UID, Series Instance UID) of the instance derived from ``scan``:
    deterministic, so every slice of one source series and model shares one series. With
    ``deid`` they derive from the source UIDs' pseudonyms, so only the site can link them
    to the source."""
    sop = generate_uid(entropy_srcs=["iomt/sop", source_uid(scan.sop_instance_uid, deid),
                                     model_digest])
    series = generate_uid(entropy_srcs=["iomt/series",
                                        source_uid(scan.series_instance_uid, deid), model_digest])
    return str(sop), str(series)


def window(stored: np.ndarray, output: OutputContract) -> tuple[float, float]:
    """(WindowCenter, WindowWidth) in output units from the 1st and 99th percentiles of
    the non-zero stored values (uint16), or the full range for an all-zero image."""
    found = positive_percentiles(stored, (1.0, 99.0))
    low, high = (0.0, 65535.0) if found is None else found
    high = max(high, low + 1.0)
    slope, intercept = output.rescale_slope, output.rescale_intercept
    return (low + high) / 2 * slope + intercept, max((high - low) * abs(slope), 1.0)


def to_uint16(stored: np.ndarray) -> np.ndarray:
    """Stored values rounded and clipped to uint16 (NaN and -inf to 0, +inf to 65535)."""
    if stored.dtype == np.uint16:
        return stored
    # One float32 working copy (float32 first, as before: it decides how a float64 value
    # rounds), changed in place. fmax/fmin ignore NaN, so NaN and -inf become 0 and +inf
    # 65535 with no nan_to_num pass; clipping before rint gives the same integers.
    values = stored.astype(np.float32)
    np.fmax(values, 0.0, out=values)
    np.fmin(values, 65535.0, out=values)
    np.rint(values, out=values)
    return values.astype(np.uint16)


def _image_item(scan: Scan, purpose: bool, deid: Deidentifier | None) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = scan.sop_class_uid
    item.ReferencedSOPInstanceUID = source_uid(scan.sop_instance_uid, deid)
    if purpose:  # CID 7202: "Source image for image processing operation"
        code = Dataset()
        code.CodeValue, code.CodingSchemeDesignator = "121322", "DCM"
        code.CodeMeaning = "Source image for image processing operation"
        item.PurposeOfReferenceCodeSequence = Sequence([code])
    return item


def check_arguments(scan: Scan, stored: np.ndarray, output: OutputContract) -> str:
    """The output modality (upper case) after checking that it has a storage class here and
    that ``stored`` lies on the source grid. Raises ValueError."""
    modality = output.modality.upper()
    if modality not in _SOP_CLASS_FOR_MODALITY:
        raise ValueError(f"output modality {output.modality!r} is not supported (MR, CT)")
    if stored.shape != scan.pixels.shape:
        raise ValueError(f"stored shape {stored.shape} != source shape {scan.pixels.shape}")
    return modality


def output_series_number(scan: Scan) -> int:
    """The derived series' SeriesNumber: the source's + 1000 (1000 when it has none)."""
    try:
        source_number = int(scan.dataset.get("SeriesNumber", 0) or 0)
    except (TypeError, ValueError):
        source_number = 0
    return source_number + 1000 if 0 <= source_number < 2**31 - 1001 else 1000


def derived_dataset(
    scan: Scan,
    pixels: np.ndarray,
    model: ModelIdentity,
    output: OutputContract,
    *,
    device_id: str,
    software_version: str,
    deid: Deidentifier | None = None,
    domain: DomainMark | None = None,
) -> Dataset:
    """The whole derived instance as a pydicom Dataset (file meta included) for uint16
    ``pixels`` on the source grid: what ``derive_instance`` writes, element for element.
    With ``deid`` the copied source attributes and the source references are
    de-identified and the instance is marked so (``Deidentifier.mark``).

    The per-slice writer (``agent.dicom.derived_writer``) builds its per-series template from
    this dataset, and ``derive_instance_generic`` encodes it with pydicom as a whole."""
    modality = check_arguments(scan, pixels, output)
    sop_uid, series_uid = derived_uids(scan, model.digest, deid)
    src = scan.dataset
    ds = Dataset()
    with quiet_pydicom():
        offset = 0 if deid is None else deid.date_offset(src)
        for keyword in copied_keywords(deid):
            with suppress(Exception):  # absent, or a value pydicom cannot convert: omit
                copied = deidentified(src[keyword], deid, offset)
                if copied is not None:
                    ds[keyword] = copied
        for keyword in TYPE2_EMPTY:
            if keyword not in ds:
                setattr(ds, keyword, "")
        ds.SOPClassUID = _SOP_CLASS_FOR_MODALITY[modality]
        ds.SOPInstanceUID = sop_uid
        ds.SeriesInstanceUID = series_uid
        ds.Modality = modality
        ds.SeriesDescription = series_description(output)
        ds.SeriesNumber = output_series_number(scan)
        # Value 3 is required in MR and CT images (dciodvfy checks it): MR has no image
        # flavour for a synthetic image but OTHER; a CT slice is AXIAL (cross-sectional).
        ds.ImageType = ["DERIVED", "SECONDARY", "OTHER" if modality == "MR" else "AXIAL"]
        ds.DerivationDescription = (
            f"Synthetic {modality} by model {model.name} {model.version} "
            f"(sha256:{model.digest}); not for diagnostic use"
        )
        ds.SourceImageSequence = Sequence([_image_item(scan, True, deid)])
        ds.ReferencedImageSequence = Sequence([_image_item(scan, False, deid)])
        if deid is not None:
            deid.mark(ds)
        ds.BurnedInAnnotation = "NO"
        ds.Manufacturer = "iomt-edge-agent"
        ds.ManufacturerModelName = model.name[:64]
        ds.SoftwareVersions = [software_version[:64], f"{model.name} {model.version}"[:64]]
        ds.DeviceSerialNumber = device_id[:64]
        if modality == "MR":  # MR Image module, type 1/2: no real acquisition behind it
            ds.ScanningSequence, ds.SequenceVariant = "RM", "NONE"
            ds.ScanOptions = ds.MRAcquisitionType = ds.EchoTime = ds.EchoTrainLength = ""
            ds.RepetitionTime = ""  # type 2C: required unless an EP sequence with SK
        else:  # CT Image module; RescaleType is required unless HU
            ds.KVP = ds.AcquisitionNumber = ""
            ds.RescaleType = "HU" if output.units.upper() == "HU" else "US"
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows, ds.Columns = (int(n) for n in pixels.shape)
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.RescaleSlope = format_ds(output.rescale_slope)
        ds.RescaleIntercept = format_ds(output.rescale_intercept)
        center, width = window(pixels, output)
        ds.WindowCenter, ds.WindowWidth = format_ds(center), format_ds(width)
        ds.PixelData = pixels.astype("<u2", copy=False).tobytes()
        ds["PixelData"].VR = "OW"
        for elem in domain_elements(domain):
            ds.add(elem)
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
        ds.file_meta.MediaStorageSOPInstanceUID = UID(sop_uid)
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds


def deidentified(elem: DataElement, deid: Deidentifier | None,
                 offset: int) -> DataElement | None:
    """A copied source element as the derived instance holds it (None: removed)."""
    return elem if deid is None else deid.element(elem, offset)


def series_description(output: OutputContract) -> str:
    """The output contract's series description, marked synthetic when it is not yet."""
    description = output.series_description
    if not _SYNTHETIC_MARK.search(description):
        description = f"SYNTHETIC - {description}"
    return description[:64]


def encode_generic(ds: Dataset) -> bytes:
    """A dataset from ``derived_dataset`` as Part-10 bytes, encoded by pydicom as a whole."""
    buffer = BytesIO()
    with quiet_pydicom():
        pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
    return buffer.getvalue()


def derive_instance_generic(
    scan: Scan,
    stored: np.ndarray,
    model: ModelIdentity,
    output: OutputContract,
    *,
    device_id: str,
    software_version: str,
    deid: Deidentifier | None = None,
    domain: DomainMark | None = None,
) -> bytes:
    """``derive_instance`` through pydicom's generic writer (the whole dataset built and
    encoded per slice): the reference the per-series writer is checked against."""
    pixels = to_uint16(np.asarray(stored))
    return encode_generic(derived_dataset(scan, pixels, model, output, device_id=device_id,
                                          software_version=software_version, deid=deid,
                                          domain=domain))


def derive_instance(
    scan: Scan,
    stored: np.ndarray,
    model: ModelIdentity,
    output: OutputContract,
    *,
    device_id: str,
    software_version: str,
    writer: DerivedWriter | None = None,
    deid: Deidentifier | None = None,
    domain: DomainMark | None = None,
) -> bytes:
    """Write the model's result for ``scan`` as a Part-10 instance (Explicit VR Little
    Endian) and return its bytes.

    ``stored`` holds stored values (before Rescale) on the source's own grid; they are
    rounded and clipped to uint16. UIDs are derived from the source UIDs and the model
    digest (see ``derived_uids``), the patient and study modules are the source's, and
    the provenance (source references, model name, version and digest) is recorded. The
    output is byte-for-byte deterministic: no timestamps of its own, and the same bytes as
    ``derive_instance_generic``. ``writer`` keeps the encoded per-series template between
    calls (one per translator; a shared default when None). ``deid``: de-identify
    (PS3.15 Annex E, see ``agent.dicom.deid``); the patient and study modules are then the
    source's de-identified. ``domain``: the slice's domain-shift score, recorded per
    ``domain_elements``.
    Raises ValueError when ``stored`` does not match the source grid or the output modality
    has no storage class here.
    """
    from agent.dicom.derived_writer import default_writer  # it builds on this module

    return (writer or default_writer()).write(
        scan, np.asarray(stored), model, output, device_id=device_id,
        software_version=software_version, deid=deid, domain=domain,
    )
