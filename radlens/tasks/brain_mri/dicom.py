"""A phantom brain case as the MR study a scanner sends: a localiser, a T2, a T1 before and a
T1 after contrast, each slice its own MR Image Storage file, or each axial series one
Enhanced MR Image (multi-frame) as newer scanners send it.

The study is what the task must choose from: the localiser (three orthogonal slices in one
series, ImageType's fourth value LOCALIZER), the axial T2 (spin echo, long TR and TE), the
axial T1 before contrast (spin echo, short TR and TE) and the same T1 after gadolinium
(ContrastBolusAgent stated, SeriesDescription saying so, as scanners write it). The three
axial series share one frame of reference and the case's grid: ImagePositionPatient and
ImageOrientationPatient come from the SimpleITK image's origin, direction and spacing (LPS,
as DICOM's patient coordinates). Files are named by a hash of their UID, so a folder
listing, and so storescu, sends the slices in no particular order.
"""

from __future__ import annotations

import hashlib
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import MRImageStorage, generate_uid

from radlens.dicom_io.synthetic_header import dataset_item as _item
from radlens.dicom_io.synthetic_header import synthetic_header

BODY_PART = "HEAD"
FIELD_STRENGTH_T = 1.5
CONTRAST_AGENT = "Gadobutrol"

# series number, description, contrast (or None: the localiser), sequence (TR ms, TE ms)
SERIES = (
    (1, "localizer", None, (8.6, 4.0)),
    (2, "t2_tse_tra", "T2", (5000.0, 100.0)),
    (3, "t1_se_tra", "T1", (500.0, 10.0)),
    (4, "t1_se_tra_post_Gd", "T1+C", (500.0, 10.0)),
)


def _uid(*parts: Any) -> str:
    return str(generate_uid(entropy_srcs=[str(p) for p in parts]))


def _mr_dataset(case: Any, *, study_uid: str, series_uid: str, frame_uid: str,
                series_number: int, description: str, instance: int, pixels: np.ndarray,
                position: tuple[float, ...], orientation: tuple[float, ...],
                spacing: tuple[float, float], thickness: float, timing: tuple[float, float],
                localizer: bool, contrast: bool, study_date: str) -> Dataset:
    sop_uid = _uid(study_uid, series_number, instance)
    ds = synthetic_header(
        sop_class_uid=MRImageStorage, sop_uid=sop_uid, study_uid=study_uid,
        series_uid=series_uid, modality="MR", body_part=BODY_PART, patient_id=case.patient_id,
        patient_name=f"Phantom^Brain{case.patient_id[-4:]}", patient_sex="O",
        study_date=study_date, study_time="090000", accession=f"A{case.patient_id}",
        series_number=series_number, instance_number=instance,
        # MR's value 3 has no LOCALIZER term (CT's has): the fourth value, free, says it
        image_type=["ORIGINAL", "PRIMARY", "OTHER"] + (["LOCALIZER"] if localizer else []),
        study_description="MRI brain with and without contrast",
        series_description=description)
    ds.FrameOfReferenceUID = frame_uid
    ds.PositionReferenceIndicator = ""
    ds.ScanningSequence = "GR" if localizer else "SE"
    ds.SequenceVariant = "SP" if localizer else "SK"
    ds.ScanOptions = ""
    ds.MRAcquisitionType = "2D"
    ds.RepetitionTime, ds.EchoTime = timing
    ds.EchoTrainLength = 1 if localizer or timing[1] < 50 else 15
    ds.MagneticFieldStrength = FIELD_STRENGTH_T
    ds.ImagedNucleus = "1H"
    ds.SliceThickness = round(thickness, 3)
    ds.SpacingBetweenSlices = round(thickness, 3)
    ds.PixelSpacing = [round(spacing[0], 6), round(spacing[1], 6)]  # row, column spacing
    ds.ImagePositionPatient = [round(v, 4) for v in position]
    ds.ImageOrientationPatient = [round(v, 6) for v in orientation]
    normal = np.cross(orientation[:3], orientation[3:])
    ds.SliceLocation = round(float(np.dot(normal, position)), 4)
    ds.PatientPosition = "HFS"
    if contrast:
        ds.ContrastBolusAgent = CONTRAST_AGENT
        ds.ContrastBolusRoute = "IV"
        ds.ContrastBolusVolume = 7.5
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
    ds.PixelRepresentation = 1
    ds.WindowCenter, ds.WindowWidth = 700, 1400
    ds.LossyImageCompression = "00"
    ds.PixelData = np.ascontiguousarray(pixels.astype(np.int16)).tobytes()
    return ds


def _localizer(case: Any, image: Any) -> list[tuple[np.ndarray, tuple, tuple, tuple]]:
    """Three orthogonal slices through the middle of ``image`` at its in-plane spacing:
    (pixels, position, orientation (row, column cosines), spacing (row, column))."""
    import SimpleITK as sitk

    step = image.GetSpacing()[0] * 2
    size = image.GetSize()[0] // 2
    middle = np.array(image.TransformContinuousIndexToPhysicalPoint(
        [(n - 1) / 2 for n in image.GetSize()]))
    planes = []
    for row_axis, column_axis in (((1, 0, 0), (0, 1, 0)),  # axial
                                  ((0, 1, 0), (0, 0, -1)),  # sagittal
                                  ((1, 0, 0), (0, 0, -1))):  # coronal
        row, column = np.array(row_axis, float), np.array(column_axis, float)
        normal = np.cross(row, column)
        origin = middle - (size - 1) / 2 * step * (row + column)
        grid = sitk.Image(size, size, 1, sitk.sitkFloat32)
        grid.SetSpacing((step, step, step))
        grid.SetOrigin(tuple(origin))
        grid.SetDirection(tuple(np.column_stack([row, column, normal]).ravel()))
        plane = sitk.Resample(sitk.Cast(image, sitk.sitkFloat32), grid, sitk.Transform(),
                              sitk.sitkLinear, 0.0)
        pixels = sitk.GetArrayFromImage(plane)[0]
        planes.append((np.round(pixels).astype(np.int16), tuple(origin),
                       tuple(row) + tuple(column), (step, step)))
    return planes


def write_brain_study(folder: Path, case: Any, *, uid_seed: str,
                      study_date: date | None = None, enhanced: bool = False) -> list[Path]:
    """The case's study under ``folder``/<case id>: one file a slice, every series; with
    ``enhanced`` each axial series is one Enhanced MR Image (the localiser stays three
    single slices)."""
    import SimpleITK as sitk

    study_uid = _uid(uid_seed, case.case_id, "study")
    frame_uid = _uid(uid_seed, case.case_id, "frame")
    day = (study_date or date(2026, 1, 5) + timedelta(days=int(case.patient_id[-3:]))
           ).strftime("%Y%m%d")
    target = folder / case.case_id
    target.mkdir(parents=True, exist_ok=True)
    written = []
    for number, description, contrast, timing in SERIES:
        series_uid = _uid(study_uid, number)
        common = dict(study_uid=study_uid, series_uid=series_uid, series_number=number,
                      description=description, timing=timing, study_date=day)
        if enhanced and contrast is not None:
            ds = enhanced_mr_dataset(case, contrast, study_uid=study_uid, frame_uid=frame_uid,
                                     series_number=number, description=description,
                                     timing=timing, study_date=day)
            written.append(_save(ds, target))
            continue
        if contrast is None:
            slices = [dict(pixels=p, position=pos, orientation=o, spacing=s,
                           thickness=s[0], localizer=True, contrast=False,
                           frame_uid=_uid(frame_uid, "localizer"))
                      for p, pos, o, s in _localizer(case, case.images["T2"])]
        else:
            image = case.images[contrast]
            values = sitk.GetArrayViewFromImage(image)
            direction = np.asarray(image.GetDirection()).reshape(3, 3)
            orientation = tuple(direction[:, 0]) + tuple(direction[:, 1])
            spacing = image.GetSpacing()
            slices = [dict(pixels=values[k], position=image.TransformIndexToPhysicalPoint(
                               (0, 0, k)), orientation=orientation,
                           spacing=(spacing[1], spacing[0]), thickness=spacing[2],
                           localizer=False, contrast=contrast == "T1+C", frame_uid=frame_uid)
                      for k in range(values.shape[0])]
        for instance, described in enumerate(slices, 1):
            written.append(_save(_mr_dataset(case, instance=instance, **common, **described),
                                 target))
    return written


def _save(ds: Dataset, folder: Path) -> Path:
    """``ds`` in ``folder`` under a hash of its UID: a listing is in no slice order."""
    path = folder / f"{hashlib.sha256(ds.SOPInstanceUID.encode()).hexdigest()[:16]}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def _code_item(value: str, scheme: str, meaning: str, **more: Any) -> Dataset:
    return _item(CodeValue=value, CodingSchemeDesignator=scheme, CodeMeaning=meaning, **more)


BRAIN = ("12738006", "SCT", "Brain")
GADOBUTROL = ("407976008", "SCT", "Gadobutrol")
GADOLINIUM = ("58281002", "SCT", "Gadolinium")
INTRAVENOUS = ("47625008", "SCT", "Intravenous route")


def enhanced_mr_dataset(case: Any, contrast: str, *, study_uid: str, frame_uid: str,
                        series_number: int, description: str, timing: tuple[float, float],
                        study_date: str) -> Dataset:
    """One axial series of the case as a single Enhanced MR Image (multi-frame): every slice
    a frame, its position in the Plane Position functional group, the sequence in the MR
    functional groups, contrast in the Enhanced Contrast/Bolus module when given."""
    import SimpleITK as sitk
    from pydicom.uid import EnhancedMRImageStorage

    image = case.images[contrast]
    values = sitk.GetArrayFromImage(image)
    frames, rows, columns = values.shape
    spacing = image.GetSpacing()
    direction = np.asarray(image.GetDirection()).reshape(3, 3)
    orientation = [round(float(v), 6) for v in (*direction[:, 0], *direction[:, 1])]
    series_uid = _uid(study_uid, series_number, "enhanced")
    sop_uid = _uid(series_uid, 1)
    acquired = f"{study_date}090000"
    weighting = "T2" if contrast == "T2" else "T1"
    with_contrast = contrast == "T1+C"
    ds = synthetic_header(
        sop_class_uid=EnhancedMRImageStorage, sop_uid=sop_uid, study_uid=study_uid,
        series_uid=series_uid, modality="MR", body_part=BODY_PART, patient_id=case.patient_id,
        patient_name=f"Phantom^Brain{case.patient_id[-4:]}", patient_sex="O",
        study_date=study_date, study_time="090000", accession=f"A{case.patient_id}",
        series_number=series_number, instance_number=1,
        image_type=["ORIGINAL", "PRIMARY", "VOLUME", "NONE"],
        study_description="MRI brain with and without contrast",
        series_description=description)
    ds.AcquisitionDateTime = acquired
    ds.AcquisitionDuration = 120.0
    ds.PatientPosition = "HFS"
    ds.ManufacturerModelName = "phantom"
    ds.DeviceSerialNumber = "0"
    ds.SoftwareVersions = "1"
    ds.FrameOfReferenceUID = frame_uid
    ds.PositionReferenceIndicator = ""
    ds.AcquisitionContextSequence = []
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = rows, columns
    ds.NumberOfFrames = frames
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
    ds.PixelRepresentation = 1
    ds.BurnedInAnnotation = "NO"
    ds.LossyImageCompression = "00"
    ds.PresentationLUTShape = "IDENTITY"
    ds.PixelPresentation = "MONOCHROME"
    ds.VolumetricProperties = "VOLUME"
    ds.VolumeBasedCalculationTechnique = "NONE"
    ds.ComplexImageComponent = "MAGNITUDE"
    ds.AcquisitionContrast = weighting
    ds.ContentQualification = "RESEARCH"
    ds.ResonantNucleus = "1H"
    ds.KSpaceFiltering = "NONE"
    ds.MagneticFieldStrength = FIELD_STRENGTH_T
    ds.ApplicableSafetyStandardAgency = "IEC"
    ds.ImageComments = "radlens phantom"
    # MR Pulse Sequence
    ds.PulseSequenceName = "SE"
    ds.MRAcquisitionType = "2D"
    ds.EchoPulseSequence = "SPIN"
    ds.MultipleSpinEcho = "NO"
    ds.MultiPlanarExcitation = "NO"
    ds.PhaseContrast = "NO"
    ds.TimeOfFlightContrast = "NO"
    ds.SteadyStatePulseSequence = "NONE"
    ds.EchoPlanarPulseSequence = "NO"
    ds.SaturationRecovery = "NO"
    ds.SpectrallySelectedSuppression = "NONE"
    ds.OversamplingPhase = "NONE"
    ds.GeometryOfKSpaceTraversal = "RECTILINEAR"
    ds.SegmentedKSpaceTraversal = "SINGLE"
    ds.RectilinearPhaseEncodeReordering = "LINEAR"
    ds.NumberOfKSpaceTrajectories = 1
    if with_contrast:
        ds.ContrastBolusAgentSequence = [_code_item(
            *GADOBUTROL, ContrastBolusAgentNumber=1,
            ContrastBolusAdministrationRouteSequence=[_code_item(*INTRAVENOUS)],
            ContrastBolusIngredientCodeSequence=[_code_item(*GADOLINIUM)],
            ContrastBolusVolume=7.5, ContrastBolusIngredientConcentration=604.72)]
    dimensions = _uid(sop_uid, "dimensions")
    ds.DimensionOrganizationSequence = [_item(DimensionOrganizationUID=dimensions)]
    ds.DimensionOrganizationType = "3D"
    ds.DimensionIndexSequence = [
        _item(DimensionOrganizationUID=dimensions, DimensionIndexPointer=0x00209056,
              FunctionalGroupPointer=0x00209111, DimensionDescriptionLabel="Stack ID"),
        _item(DimensionOrganizationUID=dimensions, DimensionIndexPointer=0x00209057,
              FunctionalGroupPointer=0x00209111,
              DimensionDescriptionLabel="In-Stack Position Number")]
    repetition, echo = timing
    shared = _item(
        PixelMeasuresSequence=[_item(PixelSpacing=[round(spacing[1], 6), round(spacing[0], 6)],
                                     SliceThickness=round(spacing[2], 3),
                                     SpacingBetweenSlices=round(spacing[2], 3))],
        PlaneOrientationSequence=[_item(ImageOrientationPatient=orientation)],
        FrameAnatomySequence=[_item(AnatomicRegionSequence=[_code_item(*BRAIN)],
                                    FrameLaterality="U")],
        PixelValueTransformationSequence=[_item(RescaleIntercept=0, RescaleSlope=1,
                                                RescaleType="US")],
        FrameVOILUTSequence=[_item(WindowCenter=700, WindowWidth=1400)],
        MRImageFrameTypeSequence=[_item(
            FrameType=["ORIGINAL", "PRIMARY", "VOLUME", "NONE"], PixelPresentation="MONOCHROME",
            VolumetricProperties="VOLUME", VolumeBasedCalculationTechnique="NONE",
            ComplexImageComponent="MAGNITUDE", AcquisitionContrast=weighting)],
        MRTimingAndRelatedParametersSequence=[_item(
            RepetitionTime=repetition, FlipAngle=90.0,
            EchoTrainLength=15 if echo > 50 else 1, RFEchoTrainLength=15 if echo > 50 else 1,
            GradientEchoTrainLength=0, GradientOutputType="DB_DT", GradientOutput=10.0,
            OperatingModeSequence=[
                _item(OperatingModeType="STATIC FIELD", OperatingMode="IEC_NORMAL")],
            SpecificAbsorptionRateSequence=[_item(
                SpecificAbsorptionRateDefinition="IEC_WHOLE_BODY",
                SpecificAbsorptionRateValue=0.5)])],
        MRFOVGeometrySequence=[_item(
            InPlanePhaseEncodingDirection="ROW", MRAcquisitionFrequencyEncodingSteps=columns,
            MRAcquisitionPhaseEncodingStepsInPlane=rows, PercentSampling=100.0,
            PercentPhaseFieldOfView=100.0)],
        MREchoSequence=[_item(EffectiveEchoTime=echo)],
        MRModifierSequence=[_item(
            InversionRecovery="NO", FlowCompensation="NONE", T2Preparation="NO",
            SpectrallySelectedExcitation="NONE", SpatialPresaturation="NONE",
            PartialFourier="NO", ParallelAcquisition="NO")],
        MRImagingModifierSequence=[_item(
            MagnetizationTransfer="NONE", BloodSignalNulling="NO", Tagging="NONE",
            TransmitterFrequency=63.87, PixelBandwidth=150.0)],
        MRReceiveCoilSequence=[_item(ReceiveCoilName="HEAD", ReceiveCoilManufacturerName="",
                                     ReceiveCoilType="VOLUME", QuadratureReceiveCoil="YES")],
        MRTransmitCoilSequence=[_item(TransmitCoilName="BODY", TransmitCoilManufacturerName="",
                                      TransmitCoilType="BODY")],
        MRAveragesSequence=[_item(NumberOfAverages=1)])
    if with_contrast:
        shared.ContrastBolusUsageSequence = [_item(
            ContrastBolusAgentNumber=1, ContrastBolusAgentAdministered="YES",
            ContrastBolusAgentDetected="YES", ContrastBolusAgentPhase="STEADY_STATE")]
    ds.SharedFunctionalGroupsSequence = [shared]
    ds.PerFrameFunctionalGroupsSequence = [_item(
        FrameContentSequence=[_item(
            StackID="1", InStackPositionNumber=k + 1, DimensionIndexValues=[1, k + 1],
            FrameAcquisitionDateTime=acquired, FrameReferenceDateTime=acquired,
            FrameAcquisitionDuration=100.0, FrameAcquisitionNumber=1)],
        PlanePositionSequence=[_item(ImagePositionPatient=[
            round(v, 4) for v in image.TransformIndexToPhysicalPoint((0, 0, k))])])
        for k in range(frames)]
    ds.PixelData = np.ascontiguousarray(values.astype(np.int16)).tobytes()
    return ds
