"""Phantom dermoscopy images as DICOM, the two ways they reach a PACS.

- **Dermoscopic Photography Image** (modality DMS), as a dermatoscope or a teledermatology
  system that speaks the current standard sends it: its Dermoscopic Image module says how the
  image was taken (contact or non-contact, the light's polarization, the immersion medium,
  the optical magnification), the anatomic region says where on the body, uncompressed RGB.
- **VL Photographic Image** (modality XC), as older systems file a dermoscopic photograph: the
  same pixels, often compressed as baseline JPEG (YBR_FULL_422, encoded by highdicom's
  ``encode_frame``, which uses Pillow), with less said about how it was taken.

Pixel Spacing is stated on some (a calibrated dermatoscope knows its field of view), not on
others, so that the task is seen to measure the diameter only where it can. Each case is one
study of one image; the study date is the visit's, so that a follow-up visit of the same
lesion is a later study of the same patient.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.sr.codedict import codes
from pydicom.uid import JPEGBaseline8Bit, generate_uid

from radlens.dicom_io.synthetic_header import synthetic_header
from radlens.tasks.dermoscopy.scope import (  # noqa: F401 (re-exported)
    DERMOSCOPIC_PHOTOGRAPHY,
    VL_PHOTOGRAPHIC,
)

BODY_PART = "SKIN"
# What the phantom dermatoscope is: contact, cross-polarized or not, x10.
OPTICAL_MAGNIFICATION = 10.0


def _code(code: Any) -> Dataset:
    item = Dataset()
    item.CodeValue = code.value
    item.CodingSchemeDesignator = code.scheme_designator
    item.CodeMeaning = code.meaning
    return item


def _site_region(case: Any) -> Dataset:
    from radlens.tasks.dermoscopy.phantoms import SITES

    return _code(getattr(codes.SCT, SITES[case.site]))


def dermoscopy_dataset(case: Any, *, kind: str, study_uid: str, series_uid: str, sop_uid: str,
                       spacing: bool, jpeg: bool = False) -> Dataset:
    """One case (a ``DermoscopyCase``) as a Dermoscopic Photography Image (``kind`` "DMS") or
    a VL Photographic Image (``kind`` "XC"), RGB, or baseline JPEG with ``jpeg``."""
    if kind not in ("DMS", "XC"):
        raise ValueError(f"kind must be DMS or XC, not {kind!r}")
    rows, columns, _ = case.image.shape
    dms = kind == "DMS"
    ds = synthetic_header(
        sop_class_uid=DERMOSCOPIC_PHOTOGRAPHY if dms else VL_PHOTOGRAPHIC, sop_uid=sop_uid,
        study_uid=study_uid, series_uid=series_uid, modality=kind,
        body_part=BODY_PART, patient_id=case.patient_id,
        patient_name=f"PHANTOM^{case.patient_id}", patient_sex="F" if
        int(case.patient_id[-1]) % 2 else "M", study_date=case.study_date, study_time="100000",
        accession=f"{case.patient_id[-10:]}{case.lesion_id}{case.visit}", series_number=1,
        instance_number=1, image_type=["ORIGINAL", "PRIMARY"],
        study_description="radlens phantom dermoscopy",
        series_description=f"dermoscopy, lesion {case.lesion_id} ({case.site})",
        character_set="ISO_IR 192")
    ds.AcquisitionDateTime = f"{case.study_date}100000"
    ds.AcquisitionDate, ds.AcquisitionTime = case.study_date, "100000"
    ds.AnatomicRegionSequence = [_site_region(case)]
    ds.BurnedInAnnotation = "NO"
    ds.PatientOrientation = ""  # a photograph of the skin: no patient axes along its rows
    ds.AcquisitionContextSequence = []
    if dms:
        ds.InstanceCreationDate, ds.InstanceCreationTime = case.study_date, "100000"
        ds.ManufacturerModelName = "phantom dermatoscope"
        ds.DeviceSerialNumber = "0"
        ds.SoftwareVersions = "1"
        ds.ContentQualification = "PRODUCT"
        ds.FrameOfReferenceUID = generate_uid(entropy_srcs=[sop_uid, "frame of reference"])
        ds.PositionReferenceIndicator = ""
        ds.RecognizableVisualFeatures = "NO"  # skin at x10: no face, no tattoo
        ds.EmitterColorTemperature = None  # the dermatoscope's LEDs: not stated
        ds.ContactMethod = "CONTACT"
        ds.ImmersionMedia = ["ULTRASOUND_GEL"] if "bubbles" in case.confounders else ["ALCOHOL"]
        ds.LightSourcePolarization = "NON_POLARIZED"
        ds.OpticalMagnificationFactor = OPTICAL_MAGNIFICATION
        ds.ImageLaterality = case.laterality or "U"
    elif case.laterality:  # on a paired site; absent on the back and abdomen
        ds.Laterality = case.laterality
    ds.SamplesPerPixel = 3
    ds.Rows, ds.Columns = rows, columns
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    ds.PixelRepresentation = 0
    ds.PlanarConfiguration = 0
    if spacing:
        ds.PixelSpacing = [round(case.pixel_spacing_mm, 6), round(case.pixel_spacing_mm, 6)]
    if jpeg:
        from highdicom.frame import encode_frame

        frame = encode_frame(np.ascontiguousarray(case.image), JPEGBaseline8Bit, 8, 8,
                             "YBR_FULL_422", 0, 0)
        ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
        ds.PhotometricInterpretation = "YBR_FULL_422"
        ds.PixelData = encapsulate([frame])
        ds["PixelData"].VR = "OB"
        ds.LossyImageCompression = "01"
        ds.LossyImageCompressionRatio = round(case.image.nbytes / len(frame), 2)
        ds.LossyImageCompressionMethod = "ISO_10918_1"
    else:
        ds.PhotometricInterpretation = "RGB"
        ds.LossyImageCompression = "00"
        ds.PixelData = np.ascontiguousarray(case.image).tobytes()
    return ds


def write_dermoscopy_study(folder: Path, case: Any, *, uid_seed: str,
                           kind: str | None = None) -> Path:
    """A case as one study of one image under ``folder``. Unless ``kind`` is given, about
    seven cases in ten are Dermoscopic Photography, the rest VL Photographic, half of those
    as baseline JPEG; Pixel Spacing is stated on about six in ten. The lesion's visits share
    the patient, not the study."""
    folder.mkdir(parents=True, exist_ok=True)

    def uid(*parts: object) -> str:
        return str(generate_uid(entropy_srcs=[uid_seed, case.case_id, *map(str, parts)]))

    draw = int(uid("kind").rsplit(".", 1)[-1])
    kind = kind or ("DMS" if draw % 10 < 7 else "XC")
    ds = dermoscopy_dataset(case, kind=kind, study_uid=uid("study"), series_uid=uid("series"),
                            sop_uid=uid("sop"), spacing=(draw // 10) % 10 < 6,
                            jpeg=kind == "XC" and (draw // 100) % 2 == 0)
    path = folder / f"{case.case_id}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path
