"""DICOM PS3.15 Annex E, Table E.1-1 (Application Level Confidentiality Profile
Attributes), the subset this agent applies, kept as data.

Each row: the attribute keyword, its action in the Basic Profile, and the options under
which it is retained instead (``P``: Retain Patient Characteristics, 113108, action K;
``V``: Retain Device Identity, 113109, action K; ``T``: Retain Longitudinal Temporal
Information with Modified Dates, 113107, action C: the date is shifted).

Actions (PS3.15 E.1.1): ``D`` replace with a dummy value of the same VR; ``Z`` replace with
a zero-length value (or a dummy one); ``X`` remove; ``K`` keep (sequences: de-identified
inside); ``C`` clean; ``U`` replace the UID with one mapped consistently; combinations
(``X/Z``, ``X/D``, ``Z/D``, ``X/Z/D``, ``X/Z/U*``) leave the choice to what the output IOD
requires: ``agent.dicom.deid`` picks the least disclosing one (X, unless the attribute is
type 2 in the output: Z; ``U*``: keep the sequence with its UIDs replaced).

Which subset: every attribute that ``agent.dicom.derive`` copies from a source instance
(``derive.COPIED``), every identifying attribute of the patient, study, series, equipment
and general-image modules that a scanner commonly writes, the attributes that reference
other instances, and every instance UID of the table. Beyond the rows, ``deid`` removes
every private element (odd groups), curve data (50xx) and overlay data and comments
(60xx,3000 / 60xx,4000), and maps any UI value that is not a well-known (registered) UID.
An attribute in none of these is kept (K), as the profile does for attributes it does not
list. To extend: add a row (keyword as in pydicom's data dictionary; the test
``test_every_table_keyword_is_a_dicom_keyword`` checks it) with its action and option
letters copied from the standard's table.
"""

from __future__ import annotations

from dataclasses import dataclass

from pydicom.datadict import tag_for_keyword

#: (keyword, Basic Profile action, options that retain it: P, V and/or T)
TABLE_E1_1: tuple[tuple[str, str, str], ...] = (
    # -- patient
    ("PatientName", "Z", ""),
    ("PatientID", "Z", ""),
    ("IssuerOfPatientID", "X", ""),
    ("PatientBirthDate", "Z", "T"),
    ("PatientBirthTime", "X", "T"),
    ("PatientSex", "Z", "P"),
    ("PatientAge", "X", "P"),
    ("PatientSize", "X", "P"),
    ("PatientWeight", "X", "P"),
    ("PatientSexNeutered", "X/Z", "P"),
    ("EthnicGroup", "X", "P"),
    ("SmokingStatus", "X", "P"),
    ("PregnancyStatus", "X", "P"),
    ("MedicalAlerts", "X", "P"),
    ("Allergies", "X", "P"),
    ("PatientState", "X", "P"),
    ("OtherPatientIDs", "X", ""),
    ("OtherPatientIDsSequence", "X", ""),
    ("OtherPatientNames", "X", ""),
    ("PatientBirthName", "X", ""),
    ("PatientMotherBirthName", "X", ""),
    ("PatientAddress", "X", ""),
    ("PatientTelephoneNumbers", "X", ""),
    ("MilitaryRank", "X", ""),
    ("MedicalRecordLocator", "X", ""),
    ("Occupation", "X", ""),
    ("AdditionalPatientHistory", "X", ""),
    ("PatientComments", "X", ""),
    ("ResponsiblePerson", "X", ""),
    ("ResponsibleOrganization", "X", ""),
    ("PatientInsurancePlanCodeSequence", "X", ""),
    ("CurrentPatientLocation", "X", ""),
    ("AdmissionID", "X", ""),
    ("ReferencedPatientSequence", "X", ""),
    # -- study and request
    ("StudyInstanceUID", "U", ""),
    ("StudyDate", "Z", "T"),
    ("StudyTime", "Z", "T"),
    ("StudyID", "Z", ""),
    ("AccessionNumber", "Z", ""),
    ("StudyDescription", "X", ""),
    ("StudyComments", "X", ""),
    ("ReferringPhysicianName", "Z", ""),
    ("ReferringPhysicianAddress", "X", ""),
    ("ReferringPhysicianTelephoneNumbers", "X", ""),
    ("ReferringPhysicianIdentificationSequence", "X", ""),
    ("PhysiciansOfRecord", "X", ""),
    ("NameOfPhysiciansReadingStudy", "X", ""),
    ("RequestingPhysician", "X", ""),
    ("RequestingService", "X", ""),
    ("ReasonForStudy", "X", ""),
    ("RequestedProcedureDescription", "X/Z", ""),
    ("RequestedProcedureID", "X", ""),
    ("RequestAttributesSequence", "X", ""),
    ("ProcedureCodeSequence", "X/Z", ""),
    ("ReferencedStudySequence", "X/Z", ""),
    ("AdmittingDiagnosesDescription", "X", ""),
    ("TimezoneOffsetFromUTC", "X", "T"),
    # -- series, procedure step, acquisition
    ("SeriesInstanceUID", "U", ""),
    ("SeriesDate", "X/D", "T"),
    ("SeriesTime", "X/D", "T"),
    ("SeriesDescription", "X", ""),
    ("ProtocolName", "X/D", ""),
    ("OperatorsName", "X/Z/D", ""),
    ("PerformingPhysicianName", "X", ""),
    ("PerformingPhysicianIdentificationSequence", "X", ""),
    ("PerformedProcedureStepID", "X", ""),
    ("PerformedProcedureStepDescription", "X", ""),
    ("PerformedProcedureStepStartDate", "X", "T"),
    ("PerformedProcedureStepStartTime", "X", "T"),
    ("PerformedStationName", "X", "V"),
    ("PerformedLocation", "X", ""),
    ("ReferencedPerformedProcedureStepSequence", "X/Z/D", ""),
    ("AcquisitionDate", "X/Z", "T"),
    ("AcquisitionTime", "X/Z", "T"),
    ("AcquisitionDateTime", "X/D", "T"),
    ("AcquisitionComments", "X", ""),
    ("ContrastBolusAgent", "Z/D", ""),
    # -- instance and image
    ("SOPInstanceUID", "U", ""),
    ("MediaStorageSOPInstanceUID", "U", ""),
    ("InstanceCreationDate", "X/D", "T"),
    ("InstanceCreationTime", "X/Z/D", "T"),
    ("InstanceCreatorUID", "U", ""),
    ("ContentDate", "Z/D", "T"),
    ("ContentTime", "Z/D", "T"),
    ("ImageComments", "X", ""),
    ("DerivationDescription", "X", ""),
    ("FrameOfReferenceUID", "U", ""),
    ("SynchronizationFrameOfReferenceUID", "U", ""),
    ("ConcatenationUID", "U", ""),
    ("DimensionOrganizationUID", "U", ""),
    ("IrradiationEventUID", "U", ""),
    ("StorageMediaFileSetUID", "U", ""),
    ("ReferencedSOPInstanceUID", "U", ""),
    ("ReferencedFrameOfReferenceUID", "U", ""),
    ("UID", "U", ""),
    ("ReferencedImageSequence", "X/Z/U*", ""),
    ("SourceImageSequence", "X/Z/U*", ""),
    ("OriginalAttributesSequence", "X", ""),
    ("DigitalSignaturesSequence", "X", ""),
    ("ContentCreatorName", "Z", ""),
    ("PersonName", "D", ""),
    ("VerifyingObserverName", "D", ""),
    # -- institution and equipment
    ("InstitutionName", "X/Z/D", ""),
    ("InstitutionAddress", "X", ""),
    ("InstitutionalDepartmentName", "X", ""),
    ("InstitutionCodeSequence", "X/Z/D", ""),
    ("StationName", "X/Z/D", "V"),
    ("DeviceSerialNumber", "X/Z/D", "V"),
    ("DeviceUID", "U", "V"),
    ("GantryID", "X", "V"),
    ("GeneratorID", "X", "V"),
    ("CassetteID", "X", "V"),
    ("PlateID", "X", "V"),
    ("DetectorID", "X/D", "V"),
    ("DateOfLastCalibration", "X", "T"),
    ("TimeOfLastCalibration", "X", "T"),
)  # fmt: skip

OPTION_LETTERS = {"P": "patient", "V": "device", "T": "dates"}


@dataclass(frozen=True)
class Rule:
    """One row of the table, by tag."""

    keyword: str
    action: str  # the Basic Profile action
    retained_by: frozenset[str]  # option names ("patient", "device", "dates") that keep it


def _rules() -> dict[int, Rule]:
    rules: dict[int, Rule] = {}
    for keyword, action, letters in TABLE_E1_1:
        tag = tag_for_keyword(keyword)
        if tag is None:
            raise ValueError(f"Table E.1-1 row {keyword!r} is not a DICOM keyword")
        rules[tag] = Rule(keyword, action, frozenset(OPTION_LETTERS[c] for c in letters))
    return rules


#: Table E.1-1 rows by tag
RULES: dict[int, Rule] = _rules()
