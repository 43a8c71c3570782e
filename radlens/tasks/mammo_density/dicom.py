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
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from radlens.dicom_io.synthetic_header import dataset_item, synthetic_header

MG_FOR_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.2"
BREAST_TOMOSYNTHESIS = "1.2.840.10008.5.1.4.1.1.13.1.3"
TOMOSYNTHESIS_SLICES = 6
SLICE_THICKNESS_MM = 1.0
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


def _header(view: Any, sop_class_uid: str, sop_uid: str, *, study_uid: str, series_uid: str,
            series_number: int, instance_number: int, series_description: str,
            image_type: list[str]) -> Dataset:
    """What every phantom mammography object of a patient shares: file meta, patient,
    study, series and instance."""
    return synthetic_header(
        sop_class_uid=sop_class_uid, sop_uid=sop_uid, study_uid=study_uid, series_uid=series_uid,
        modality="MG", body_part="BREAST", patient_id=view.patient_id,
        patient_name=f"PHANTOM^{view.patient_id}", patient_sex="F", study_date="20260101",
        study_time="090000", accession=view.patient_id[-16:], series_number=series_number,
        instance_number=instance_number, image_type=image_type,
        study_description="radlens phantom mammography",
        series_description=series_description, character_set="ISO_IR 192")


def mammogram_dataset(view: Any, *, study_uid: str, series_uid: str, sop_uid: str,
                      instance_number: int, synthesized: bool = False) -> Dataset:
    """One view (a ``MammoView``) as an MG For Presentation instance, 12 bits stored."""
    rows, columns = view.image.shape
    ds = _header(view, MG_FOR_PRESENTATION, sop_uid, study_uid=study_uid,
                 series_uid=series_uid, series_number=2 if synthesized else 1,
                 instance_number=instance_number,
                 series_description=("synthetic mammogram (synthesized 2D)" if synthesized
                                     else "synthetic mammogram"),
                 image_type=(["DERIVED", "PRIMARY", "", "GENERATED_2D"] if synthesized
                             else ["ORIGINAL", "PRIMARY"]))
    ds.ViewPosition = view.view
    ds.PositionerType = "MAMMOGRAPHIC"
    ds.DetectorType = "DIRECT"
    ds.ImagerPixelSpacing = [view.pixel_spacing_mm, view.pixel_spacing_mm]
    ds.PixelSpacing = [view.pixel_spacing_mm, view.pixel_spacing_mm]
    ds.PixelSpacingCalibrationType = "GEOMETRY"
    ds.PixelSpacingCalibrationDescription = "phantom: the breast at the detector plane"
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


def tomosynthesis_dataset(view: Any, *, study_uid: str, series_uid: str, sop_uid: str,
                          frame_of_reference_uid: str, instance_number: int,
                          slices: int = TOMOSYNTHESIS_SLICES) -> Dataset:
    """One view as a Breast Tomosynthesis Image (an enhanced multi-frame volume of
    ``slices`` planes, the view's tissue in focus on the middle one and blurred with distance
    from it), with the acquisition a tomosynthesis unit states. No model of radlens reads
    it: it is there so that routing is seen to refuse it, with the reason."""
    from scipy import ndimage

    rows, columns = view.image.shape
    spacing = round(float(view.pixel_spacing_mm), 6)
    frame_type = ["ORIGINAL", "PRIMARY", "TOMOSYNTHESIS", "NONE"]
    ds = _header(view, BREAST_TOMOSYNTHESIS, sop_uid, study_uid=study_uid,
                 series_uid=series_uid, series_number=3, instance_number=instance_number,
                 series_description="synthetic breast tomosynthesis", image_type=frame_type)
    ds.InstanceCreationDate, ds.InstanceCreationTime = ds.ContentDate, ds.ContentTime
    ds.ManufacturerModelName = "phantom tomosynthesis"
    ds.DeviceSerialNumber = "0"
    ds.SoftwareVersions = "1"
    ds.FrameOfReferenceUID = frame_of_reference_uid
    ds.PositionReferenceIndicator = ""
    ds.ContentQualification = "PRODUCT"
    ds.BurnedInAnnotation = "NO"
    ds.PixelPresentation = "MONOCHROME"
    ds.VolumetricProperties = "VOLUME"
    ds.VolumeBasedCalculationTechnique = "NONE"
    ds.AcquisitionContextSequence = []
    view_item = _code(*VIEW_CODES[view.view])
    view_item.ViewModifierCodeSequence = []
    ds.ViewCodeSequence = [view_item]
    ds.BreastImplantPresent = "YES" if "implant" in view.confounders else "NO"
    ds.PartialView = "NO"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = rows, columns
    ds.NumberOfFrames = slices
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, BITS_STORED, BITS_STORED - 1
    ds.PixelRepresentation = 0
    ds.PresentationLUTShape = "IDENTITY"
    ds.LossyImageCompression = "00"
    ds.SharedFunctionalGroupsSequence = [dataset_item(
        PixelMeasuresSequence=[dataset_item(PixelSpacing=[spacing, spacing],
                                     SliceThickness=SLICE_THICKNESS_MM)],
        PlaneOrientationSequence=[dataset_item(ImageOrientationPatient=[1, 0, 0, 0, 1, 0])],
        FrameAnatomySequence=[dataset_item(AnatomicRegionSequence=[_code(*BREAST)],
                                    FrameLaterality=view.laterality)],
        PixelValueTransformationSequence=[dataset_item(RescaleIntercept=0, RescaleSlope=1,
                                                RescaleType="US")])]
    dimensions = generate_uid(entropy_srcs=[sop_uid, "dimensions"])
    ds.DimensionOrganizationSequence = [dataset_item(DimensionOrganizationUID=dimensions)]
    ds.DimensionOrganizationType = "3D"
    ds.DimensionIndexSequence = [dataset_item(DimensionOrganizationUID=dimensions,
                                       DimensionIndexPointer=0x00200032,
                                       FunctionalGroupPointer=0x00209113)]
    ds.PerFrameFunctionalGroupsSequence = [dataset_item(
        FrameContentSequence=[dataset_item(DimensionIndexValues=[k + 1],
                                    FrameAcquisitionDateTime="20260101090000",
                                    FrameReferenceDateTime="20260101090000",
                                    FrameAcquisitionDuration=100.0)],
        PlanePositionSequence=[dataset_item(ImagePositionPatient=[0, 0, k * SLICE_THICKNESS_MM])],
        XRay3DFrameTypeSequence=[dataset_item(FrameType=frame_type, PixelPresentation="MONOCHROME",
                                       VolumetricProperties="VOLUME",
                                       VolumeBasedCalculationTechnique="NONE",
                                       ReconstructionIndex=1)])
        for k in range(slices)]
    ds.XRay3DReconstructionSequence = [dataset_item(
        ReconstructionDescription="phantom: the view blurred away from its focal plane",
        ApplicationName="radlens", ApplicationVersion="1", ApplicationManufacturer="radlens",
        AlgorithmType="ITERATIVE", AlgorithmDescription="none", AcquisitionIndex=[1])]
    ds.XRay3DAcquisitionSequence = [dataset_item(
        FieldOfViewShape="RECTANGLE",
        FieldOfViewDimensionsInFloat=[round(rows * spacing, 3), round(columns * spacing, 3)],
        FieldOfViewOrigin=[0, 0], XRayReceptorType="DIGITAL_DETECTOR",
        AnodeTargetMaterial="TUNGSTEN", BodyPartThickness=50, CompressionForce=100,
        DetectorTemperature=30, DistanceSourceToDetector=650, DistanceSourceToPatient=600,
        EstimatedRadiographicMagnificationFactor=1.08, ExposureControlMode="AUTOMATIC",
        ExposureControlModeDescription="phantom", FilterMaterial=["ALUMINUM"],
        FilterType="FLAT", FocalSpots=[0.3], HalfValueLayer=0.5,
        PaddleDescription="phantom", PerProjectionAcquisitionSequence=[dataset_item(
            KVP=30, XRayTubeCurrentInmA=100.0, FrameAcquisitionDuration=100.0,
            ExposureTimeInms=100.0, ExposureInmAs=10.0, RelativeXRayExposure=1000,
            PositionerPrimaryAngle=0.0)])]
    image = view.image.astype(np.float32)
    middle = (slices - 1) / 2
    planes = [ndimage.gaussian_filter(image, sigma=0.8 * abs(k - middle)) for k in range(slices)]
    scaled = (np.stack(planes) * ((1 << BITS_STORED) - 1) / 255).round().clip(
        0, (1 << BITS_STORED) - 1).astype(np.uint16)
    ds.PixelData = scaled.tobytes()
    return ds


def write_mammo_study(folder: Path, views: Sequence[Any], *, uid_seed: str,
                      synthesized: bool | None = None,
                      tomosynthesis: bool = False) -> list[Path]:
    """A patient's views as one study (one file a view) under ``folder``. Whether the study is
    synthesized 2D is drawn from the patient (about one in four) unless given. With
    ``tomosynthesis`` each view also gets a Breast Tomosynthesis volume (``<view>_TOMO.dcm``),
    as a unit sends a combined 2D and 3D examination."""
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
    if tomosynthesis:
        for number, view in enumerate(views, 1):
            ds = tomosynthesis_dataset(
                view, study_uid=uid("study"), series_uid=uid("tomosynthesis series"),
                sop_uid=uid("tomosynthesis", view.case_id),
                frame_of_reference_uid=uid("frame of reference", view.case_id),
                instance_number=number)
            path = folder / f"{view.laterality}{view.view}_TOMO.dcm"
            ds.save_as(path, enforce_file_format=True)
            paths.append(path)
    return paths
