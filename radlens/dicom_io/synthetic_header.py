"""The header every phantom object shares, whatever task's phantoms it carries: file meta, the
patient, study, series and instance modules, and who made it. Each task's phantoms add their
modality's own attributes (ultrasound regions, mammography views) and pixels."""

from __future__ import annotations

from typing import Any

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian

MANUFACTURER = "radlens synthetic"


def synthetic_header(*, sop_class_uid: str, sop_uid: str, study_uid: str, series_uid: str,
                     modality: str, body_part: str, patient_id: str, patient_name: str,
                     patient_sex: str, study_date: str, study_time: str, accession: str,
                     series_number: int, instance_number: int, image_type: list[str],
                     study_description: str | None = None,
                     series_description: str | None = None,
                     character_set: str | None = None) -> Dataset:
    """A Dataset with its file meta (Explicit VR Little Endian) and the identity of one
    phantom object; dates as DA/TM strings, the content date and time the study's."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class_uid
    ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    if character_set is not None:
        ds.SpecificCharacterSet = character_set
    ds.SOPClassUID = sop_class_uid
    ds.SOPInstanceUID = sop_uid
    ds.ImageType = image_type
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = patient_sex
    ds.StudyDate, ds.StudyTime = study_date, study_time
    ds.ContentDate, ds.ContentTime = study_date, study_time
    ds.AccessionNumber = accession
    ds.ReferringPhysicianName = ""
    ds.StudyID = "1"
    ds.Modality = modality
    ds.Manufacturer = MANUFACTURER
    ds.BodyPartExamined = body_part
    if study_description is not None:
        ds.StudyDescription = study_description
    if series_description is not None:
        ds.SeriesDescription = series_description
    ds.SeriesNumber = series_number
    ds.InstanceNumber = instance_number
    return ds


def dataset_item(**values: Any) -> Dataset:
    """A sequence item with the given keywords set: the nested functional groups of the
    multi-frame phantoms are many of these."""
    item = Dataset()
    for keyword, value in values.items():
        setattr(item, keyword, value)
    return item
