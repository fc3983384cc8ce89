"""The derived (synthetic) instance: new UIDs, provenance, a correct pixel module.

The result of a model on one scan becomes a DICOM instance of its own, labelled synthetic
and not for diagnostic use, that references its source and names the model (name, version,
digest). UIDs are derived from the source UIDs and the model digest, so reprocessing the
same scan with the same model gives the same instance.
"""

from __future__ import annotations

import hashlib
import re
from contextlib import suppress
from dataclasses import dataclass
from io import BytesIO

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import (
    UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    MRImageStorage,
    generate_uid,
)

from agent.bundle import OutputContract
from agent.dicom import Scan, quiet_pydicom


@dataclass(frozen=True)
class ModelIdentity:
    """The model that made a derived instance: recorded in its provenance and UIDs."""

    name: str
    version: str
    digest: str  # sha256 hex of the served model file



_SOP_CLASS_FOR_MODALITY = {"MR": MRImageStorage, "CT": CTImageStorage}
_SYNTHETIC_MARK = re.compile(r"synthetic|not for diagnostic", re.IGNORECASE)
# Patient and study modules travel unchanged (the payload is sealed); then what places the
# slice in space and in its series, so a viewer overlays the result on its source.
_COPIED = (
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
_TYPE2_EMPTY = (
    "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
    "ReferringPhysicianName", "StudyID", "AccessionNumber", "PositionReferenceIndicator",
    "InstanceNumber",
)  # fmt: skip


def _ds(value: float) -> str:
    return f"{value:.6g}"  # a DS is at most 16 characters


def result_message_id(source_sop_instance_uid: str, model_digest: str) -> str:
    """The idempotency key of a result: the first 32 hex characters of
    ``sha256(f"{source_sop_instance_uid}\\n{model_digest}")``.

    The same source instance served by the same model always gets the same key, whichever
    node served it and however often it was redelivered, so consumers drop duplicates."""
    text = f"{source_sop_instance_uid}\n{model_digest}".encode()
    return hashlib.sha256(text).hexdigest()[:32]


def derived_uids(scan: Scan, model_digest: str) -> tuple[str, str]:
    """The (SOP Instance UID, Series Instance UID) of the instance derived from ``scan``:
    deterministic, so every slice of one source series and model shares one series."""
    sop = generate_uid(entropy_srcs=["iomt/sop", scan.sop_instance_uid, model_digest])
    series = generate_uid(entropy_srcs=["iomt/series", scan.series_instance_uid, model_digest])
    return str(sop), str(series)


def _window(stored: np.ndarray, output: OutputContract) -> tuple[float, float]:
    nonzero = stored[stored > 0]
    if nonzero.size:
        low, high = (float(v) for v in np.percentile(nonzero, [1.0, 99.0]))
    else:
        low, high = 0.0, 65535.0
    high = max(high, low + 1.0)
    slope, intercept = output.rescale_slope, output.rescale_intercept
    return (low + high) / 2 * slope + intercept, max((high - low) * abs(slope), 1.0)


def _to_uint16(stored: np.ndarray) -> np.ndarray:
    if stored.dtype == np.uint16:
        return stored
    values = np.nan_to_num(stored.astype(np.float32), nan=0.0, posinf=65535.0, neginf=0.0)
    return np.clip(np.rint(values), 0, 65535).astype(np.uint16)


def _image_item(scan: Scan, purpose: bool) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = scan.sop_class_uid
    item.ReferencedSOPInstanceUID = scan.sop_instance_uid
    if purpose:  # CID 7202: "Source image for image processing operation"
        code = Dataset()
        code.CodeValue, code.CodingSchemeDesignator = "121322", "DCM"
        code.CodeMeaning = "Source image for image processing operation"
        item.PurposeOfReferenceCodeSequence = Sequence([code])
    return item


def derive_instance(
    scan: Scan,
    stored: np.ndarray,
    model: ModelIdentity,
    output: OutputContract,
    *,
    device_id: str,
    software_version: str,
) -> bytes:
    """Write the model's result for ``scan`` as a Part-10 instance (Explicit VR Little
    Endian) and return its bytes.

    ``stored`` holds stored values (before Rescale) on the source's own grid; they are
    rounded and clipped to uint16. UIDs are derived from the source UIDs and the model
    digest (see ``derived_uids``), the patient and study modules are the source's, and
    the provenance (source references, model name, version and digest) is recorded. The
    output is byte-for-byte deterministic: no timestamps of its own.
    Raises ValueError when ``stored`` does not match the source grid or the output modality
    has no storage class here.
    """
    modality = output.modality.upper()
    if modality not in _SOP_CLASS_FOR_MODALITY:
        raise ValueError(f"output modality {output.modality!r} is not supported (MR, CT)")
    array = np.asarray(stored)
    if array.shape != scan.pixels.shape:
        raise ValueError(f"stored shape {array.shape} != source shape {scan.pixels.shape}")
    pixels = _to_uint16(array)
    sop_uid, series_uid = derived_uids(scan, model.digest)
    src = scan.dataset
    ds = Dataset()
    with quiet_pydicom():
        for keyword in _COPIED:
            with suppress(Exception):  # absent, or a value pydicom cannot convert: omit
                ds[keyword] = src[keyword]
        for keyword in _TYPE2_EMPTY:
            if keyword not in ds:
                setattr(ds, keyword, "")
        ds.SOPClassUID = _SOP_CLASS_FOR_MODALITY[modality]
        ds.SOPInstanceUID = sop_uid
        ds.SeriesInstanceUID = series_uid
        ds.Modality = modality
        description = output.series_description
        if not _SYNTHETIC_MARK.search(description):
            description = f"SYNTHETIC - {description}"
        ds.SeriesDescription = description[:64]
        try:
            source_number = int(src.get("SeriesNumber", 0) or 0)
        except (TypeError, ValueError):
            source_number = 0
        ds.SeriesNumber = source_number + 1000 if 0 <= source_number < 2**31 - 1001 else 1000
        ds.ImageType = ["DERIVED", "SECONDARY"]
        ds.DerivationDescription = (
            f"Synthetic {modality} by model {model.name} {model.version} "
            f"(sha256:{model.digest}); not for diagnostic use"
        )
        ds.SourceImageSequence = Sequence([_image_item(scan, purpose=True)])
        ds.ReferencedImageSequence = Sequence([_image_item(scan, purpose=False)])
        ds.BurnedInAnnotation = "NO"
        ds.Manufacturer = "iomt-edge-agent"
        ds.ManufacturerModelName = model.name[:64]
        ds.SoftwareVersions = [software_version[:64], f"{model.name} {model.version}"[:64]]
        ds.DeviceSerialNumber = device_id[:64]
        if modality == "MR":  # MR Image module, type 1/2: no real acquisition behind it
            ds.ScanningSequence, ds.SequenceVariant = "RM", "NONE"
            ds.ScanOptions = ds.MRAcquisitionType = ds.EchoTime = ds.EchoTrainLength = ""
        else:  # CT Image module; RescaleType is required unless HU
            ds.KVP = ds.AcquisitionNumber = ""
            ds.RescaleType = "HU" if output.units.upper() == "HU" else "US"
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows, ds.Columns = (int(n) for n in pixels.shape)
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.RescaleSlope = _ds(output.rescale_slope)
        ds.RescaleIntercept = _ds(output.rescale_intercept)
        center, width = _window(pixels, output)
        ds.WindowCenter, ds.WindowWidth = _ds(center), _ds(width)
        ds.PixelData = pixels.astype("<u2", copy=False).tobytes()
        ds["PixelData"].VR = "OW"
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
        ds.file_meta.MediaStorageSOPInstanceUID = UID(sop_uid)
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        buffer = BytesIO()
        pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
    return buffer.getvalue()
