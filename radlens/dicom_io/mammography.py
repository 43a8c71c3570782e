"""Phantom mammograms as DICOM: a patient's four views as one study, the way a mammography
unit sends them.

Most studies are Digital Mammography X-Ray Image Storage - For Presentation (modality MG),
with ImageLaterality, ViewPosition and its coded View Code Sequence, PatientOrientation as
mammography defines it, BodyPartExamined BREAST, and BurnedInAnnotation YES (every view carries
its laterality marker in the pixels). Some are, like a tomosynthesis unit's output, synthesized
2D images (ImageType DERIVED\\PRIMARY with GENERATED_2D), so that a model's scope and its
figures can be stated per kind of image.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian, generate_uid

MG_FOR_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.2"
# View Code Sequence (CID 4014) and the breast (CID 4031), SNOMED CT
VIEW_CODES = {"CC": ("399162004", "cranio-caudal"), "MLO": ("399368009", "medio-lateral oblique")}
BREAST = ("76752008", "Breast")
# PatientOrientation of a mammogram (PS3.3 C.8.11.7.1.1): the row then the column direction,
# with the chest wall on the image's left for a left breast and on its right for a right one.
PATIENT_ORIENTATION = {("L", "CC"): ["A", "R"], ("R", "CC"): ["P", "L"],
                       ("L", "MLO"): ["A", "FR"], ("R", "MLO"): ["P", "FL"]}
BITS_STORED = 12


def _code(value: str, meaning: str, scheme: str = "SCT") -> Dataset:
    item = Dataset()
    item.CodeValue = value
    item.CodingSchemeDesignator = scheme
    item.CodeMeaning = meaning
    return item


def mammogram_dataset(view: Any, *, study_uid: str, series_uid: str, sop_uid: str,
                      instance_number: int, synthesized: bool = False) -> Dataset:
    """One view (a ``MammoView``) as an MG For Presentation instance, 12 bits stored."""
    rows, columns = view.image.shape
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = MG_FOR_PRESENTATION
    ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.ImageType = (["DERIVED", "PRIMARY", "", "GENERATED_2D"] if synthesized
                    else ["ORIGINAL", "PRIMARY"])
    ds.SOPClassUID = MG_FOR_PRESENTATION
    ds.SOPInstanceUID = sop_uid
    ds.StudyDate, ds.StudyTime = "20260101", "090000"
    ds.ContentDate, ds.ContentTime = ds.StudyDate, ds.StudyTime
    ds.AccessionNumber = view.patient_id[-16:]
    ds.Modality = "MG"
    ds.Manufacturer = "radlens synthetic"
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = "radlens phantom mammography"
    ds.SeriesDescription = ("synthetic mammogram (synthesized 2D)" if synthesized
                            else "synthetic mammogram")
    ds.PatientName = f"PHANTOM^{view.patient_id}"
    ds.PatientID = view.patient_id
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "F"
    ds.BodyPartExamined = "BREAST"
    ds.ViewPosition = view.view
    ds.PositionerType = "MAMMOGRAPHIC"
    ds.DetectorType = "DIRECT"
    ds.ImagerPixelSpacing = [view.pixel_spacing_mm, view.pixel_spacing_mm]
    ds.PixelSpacing = [view.pixel_spacing_mm, view.pixel_spacing_mm]
    ds.PixelSpacingCalibrationType = "GEOMETRY"
    ds.PixelSpacingCalibrationDescription = "phantom: the breast at the detector plane"
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.StudyID = "1"
    ds.SeriesNumber = 2 if synthesized else 1
    ds.InstanceNumber = instance_number
    ds.PatientOrientation = PATIENT_ORIENTATION[(view.laterality, view.view)]
    ds.ImageLaterality = view.laterality
    ds.OrganExposed = "BREAST"
    ds.BreastImplantPresent = "YES" if "implant" in view.confounders else "NO"
    ds.PartialView = "NO"
    ds.BurnedInAnnotation = "YES"  # the laterality marker, and acquisition text on some
    ds.PresentationIntentType = "FOR PRESENTATION"
    ds.AnatomicRegionSequence = [_code(*BREAST)]
    view_item = _code(*VIEW_CODES[view.view])
    view_item.ViewModifierCodeSequence = []
    ds.ViewCodeSequence = [view_item]
    ds.AcquisitionContextSequence = []
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = rows, columns
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, BITS_STORED, BITS_STORED - 1
    ds.PixelRepresentation = 0
    ds.PixelIntensityRelationship = "LOG"
    ds.PixelIntensityRelationshipSign = 1
    ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = 0, 1, "US"
    ds.PresentationLUTShape = "IDENTITY"
    ds.LossyImageCompression = "00"
    ds.WindowCenter, ds.WindowWidth = 2048, 4096
    # No VOILUTFunction: LINEAR is its default, and OHIF 3.13 refuses to display an image that
    # states it (cornerstone3D: "Invalid VOI LUT function").
    scaled = (view.image.astype(np.uint32) * ((1 << BITS_STORED) - 1) // 255).astype(np.uint16)
    ds.PixelData = scaled.tobytes()
    return ds


def write_mammo_study(folder: Path, views: Sequence[Any], *, uid_seed: str,
                      synthesized: bool | None = None) -> list[Path]:
    """A patient's views as one study (one file a view) under ``folder``. Whether the study is
    synthesized 2D is drawn from the patient (about one in four) unless given."""
    folder.mkdir(parents=True, exist_ok=True)
    patient = views[0].patient_id

    def uid(*parts: object) -> str:
        return str(generate_uid(entropy_srcs=[uid_seed, patient, *map(str, parts)]))

    if synthesized is None:
        synthesized = int(uid("kind").rsplit(".", 1)[-1]) % 4 == 0
    paths = []
    for number, view in enumerate(views, 1):
        ds = mammogram_dataset(view, study_uid=uid("study"), series_uid=uid("series"),
                               sop_uid=uid("sop", view.case_id), instance_number=number,
                               synthesized=synthesized)
        path = folder / f"{view.laterality}{view.view}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths
