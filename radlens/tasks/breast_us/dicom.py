"""Synthetic ultrasound instances for load tests, benchmarks and interoperability checks.

These are plain speckle frames with valid US Image Storage headers (ultrasound regions included)
and obviously fake patient data. They carry no lesions: realistic phantoms with lesions and masks
come from ``radlens.tasks.breast_us.phantoms``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from radlens.dicom_io.synthetic_header import synthetic_header

US_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.6.1"


def us_instance(*, study_uid: str, series_uid: str, instance_number: int, rows: int = 512,
                columns: int = 1024, spacing_cm: float = 0.01, seed: int = 0,
                patient_id: str = "SYNTH-0001") -> Dataset:
    """One 8-bit MONOCHROME2 ultrasound frame of plain speckle (rows x columns bytes)."""
    rng = np.random.default_rng(seed)
    depth = np.linspace(1.0, 0.35, rows, dtype=np.float32)[:, None]
    speckle = rng.rayleigh(scale=0.35, size=(rows, columns)).astype(np.float32)
    pixels = np.clip(speckle * depth * 180.0, 0, 255).astype(np.uint8)
    return us_dataset(pixels, study_uid=study_uid, series_uid=series_uid,
                      instance_number=instance_number, spacing_cm=spacing_cm,
                      patient_id=patient_id)


def us_dataset(pixels: np.ndarray, *, study_uid: str, series_uid: str, instance_number: int,
               spacing_cm: float, patient_id: str, patient_name: str = "SYNTHETIC^PHANTOM",
               accession: str = "SYNTH", sop_uid: str | None = None) -> Dataset:
    """US Image Storage around an 8-bit greyscale frame, with one 2-D tissue region."""
    if pixels.dtype != np.uint8 or pixels.ndim != 2:
        raise ValueError(f"expected a 2-D uint8 frame, got {pixels.dtype} {pixels.shape}")
    rows, columns = pixels.shape
    ds = synthetic_header(
        sop_class_uid=US_IMAGE_STORAGE, sop_uid=sop_uid or generate_uid(), study_uid=study_uid,
        series_uid=series_uid, modality="US", body_part="BREAST", patient_id=patient_id,
        patient_name=patient_name, patient_sex="O", study_date="20260101",
        study_time="120000", accession=accession, series_number=1,
        instance_number=instance_number, image_type=["ORIGINAL", "PRIMARY", "", "0001"])
    ds.Laterality = "L"
    ds.PatientOrientation = ""
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = rows, columns
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    ds.PixelRepresentation = 0
    region = Dataset()
    region.RegionSpatialFormat = 1
    region.RegionDataType = 1
    region.RegionFlags = 0
    region.RegionLocationMinX0, region.RegionLocationMinY0 = 0, 0
    region.RegionLocationMaxX1, region.RegionLocationMaxY1 = columns - 1, rows - 1
    region.PhysicalUnitsXDirection = 3
    region.PhysicalUnitsYDirection = 3
    region.PhysicalDeltaX = spacing_cm
    region.PhysicalDeltaY = spacing_cm
    ds.SequenceOfUltrasoundRegions = [region]
    ds.PixelData = pixels.tobytes()
    return ds


def write_us_studies(folder: Path, *, studies: int, instances_per_study: int,
                     rows: int = 512, columns: int = 1024) -> Iterator[Path]:
    """Write ``studies`` x ``instances_per_study`` files, one series per study."""
    folder.mkdir(parents=True, exist_ok=True)
    for s in range(studies):
        study_uid, series_uid = generate_uid(), generate_uid()
        for i in range(instances_per_study):
            ds = us_instance(study_uid=study_uid, series_uid=series_uid, instance_number=i + 1,
                             rows=rows, columns=columns, seed=s * 100_000 + i)
            path = folder / f"study{s:03d}_{i:05d}.dcm"
            ds.save_as(path, enforce_file_format=True)
            yield path


def write_phantom_study(folder: Path, pixels: np.ndarray, *, spacing_mm: float, case_id: str,
                        patient_id: str, uid_seed: str, tracked: bool = False) -> Path:
    """One phantom frame as a one-instance US study, ready to push with storescu.

    UIDs derive from ``uid_seed`` and the case, so the same phantom gives the same file.
    ``tracked``: the frame also carries patient geometry (frame of reference, image plane), as
    frames from a position-tracked probe do on fusion-imaging systems.
    """
    folder.mkdir(parents=True, exist_ok=True)
    uid = lambda part: generate_uid(entropy_srcs=[uid_seed, case_id, part])  # noqa: E731
    ds = us_dataset(pixels, study_uid=uid("study"), series_uid=uid("series"), sop_uid=uid("sop"),
                    instance_number=1, spacing_cm=spacing_mm / 10.0, patient_id=patient_id,
                    patient_name=f"PHANTOM^{case_id.upper()}", accession=case_id[-16:])
    ds.StudyDescription = "radlens phantom"
    ds.SeriesDescription = "synthetic breast ultrasound"
    if tracked:
        ds.FrameOfReferenceUID = uid("frame of reference")
        ds.PositionReferenceIndicator = ""
        ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
        ds.ImagePositionPatient = [0.0, 0.0, 0.0]
        ds.PixelSpacing = [spacing_mm, spacing_mm]
        ds.SeriesDescription = "synthetic breast ultrasound (tracked probe)"
    path = folder / "IM0001.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


US_MULTIFRAME_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.3.1"


def us_multiframe_dataset(frames: np.ndarray, *, study_uid: str, series_uid: str,
                          instance_number: int, spacing_cm: float, patient_id: str,
                          sop_uid: str | None = None, frame_time_ms: float = 50.0) -> Dataset:
    """US Multi-frame Image Storage around (frames, rows, columns) uint8: a short cine loop."""
    if frames.dtype != np.uint8 or frames.ndim != 3:
        raise ValueError(f"expected (frames, rows, columns) uint8, got {frames.dtype} "
                         f"{frames.shape}")
    ds = us_dataset(frames[0], study_uid=study_uid, series_uid=series_uid,
                    instance_number=instance_number, spacing_cm=spacing_cm,
                    patient_id=patient_id, sop_uid=sop_uid)
    ds.SOPClassUID = US_MULTIFRAME_IMAGE_STORAGE
    ds.file_meta.MediaStorageSOPClassUID = US_MULTIFRAME_IMAGE_STORAGE
    ds.NumberOfFrames = int(frames.shape[0])
    ds.FrameTime = frame_time_ms
    ds.FrameIncrementPointer = 0x00181063  # Frame Time
    ds.PixelData = np.ascontiguousarray(frames).tobytes()
    return ds
