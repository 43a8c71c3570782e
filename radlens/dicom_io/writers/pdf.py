"""The PDF report as DICOM Encapsulated PDF, in the source study and its own series, so that
every PACS and OHIF's PDF viewer show it. pydicom builds it: no library wraps this IOD."""

from __future__ import annotations

from datetime import UTC, datetime

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian, generate_uid

from radlens.dicom_io.writers.common import Equipment, SeriesPlan

ENCAPSULATED_PDF_STORAGE = "1.2.840.10008.5.1.4.1.1.104.1"
PATIENT_AND_STUDY = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex",
                     "StudyInstanceUID", "StudyDate", "StudyTime", "ReferringPhysicianName",
                     "StudyID", "AccessionNumber", "StudyDescription", "IssuerOfPatientID",
                     "OtherPatientIDsSequence", "PatientAge", "PatientWeight")


def build_encapsulated_pdf(pdf: bytes, sources: list[Dataset], equipment: Equipment,
                           plan: SeriesPlan, *, title: str = "radlens report") -> Dataset:
    """Encapsulated PDF IOD around ``pdf``, referencing every source image it reports on."""
    first = sources[0]
    now = datetime.now(UTC)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ENCAPSULATED_PDF_STORAGE
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.SOPClassUID = ENCAPSULATED_PDF_STORAGE
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    for keyword in PATIENT_AND_STUDY:  # Patient and General Study modules, as the source has them
        if keyword in first:
            setattr(ds, keyword, first.data_element(keyword).value)
    for keyword in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate",
                    "StudyTime", "ReferringPhysicianName", "StudyID", "AccessionNumber"):
        if keyword not in ds:
            setattr(ds, keyword, "")  # type 2: present, empty when the source had none
    ds.Modality = "DOC"  # Encapsulated Document Series
    ds.SeriesInstanceUID = plan.series_instance_uid
    ds.SeriesNumber = plan.series_number
    ds.SeriesDescription = plan.description
    ds.Manufacturer = equipment.manufacturer  # General Equipment
    ds.ManufacturerModelName = equipment.model_name
    ds.SoftwareVersions = equipment.software_versions
    ds.ConversionType = "SYN"  # SC Equipment: synthetic image
    ds.InstanceNumber = 1  # Encapsulated Document module
    ds.ContentDate = now.strftime("%Y%m%d")
    ds.ContentTime = now.strftime("%H%M%S")
    ds.InstanceCreationDate, ds.InstanceCreationTime = ds.ContentDate, ds.ContentTime
    ds.AcquisitionDateTime = now.strftime("%Y%m%d%H%M%S")
    ds.BurnedInAnnotation = "NO"
    ds.DocumentTitle = title
    ds.ConceptNameCodeSequence = []
    ds.MIMETypeOfEncapsulatedDocument = "application/pdf"
    references = []
    for source in sources:
        item = Dataset()
        item.ReferencedSOPClassUID = source.SOPClassUID
        item.ReferencedSOPInstanceUID = source.SOPInstanceUID
        references.append(item)
    ds.SourceInstanceSequence = references
    ds.EncapsulatedDocumentLength = len(pdf)
    ds.EncapsulatedDocument = pdf + (b"\0" if len(pdf) % 2 else b"")
    return ds
