"""Synthetic ultrasound instances for load tests, benchmarks and interoperability checks.

These are plain speckle frames with valid US Image Storage headers (ultrasound regions included)
and obviously fake patient data. They carry no lesions: realistic phantoms with lesions and masks
come from ``radlens.models.phantoms``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian, generate_uid

US_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.6.1"


def us_instance(*, study_uid: str, series_uid: str, instance_number: int, rows: int = 512,
                columns: int = 1024, spacing_cm: float = 0.01, seed: int = 0,
                patient_id: str = "SYNTH-0001") -> Dataset:
    """One 8-bit MONOCHROME2 ultrasound frame (rows x columns bytes of pixel data)."""
    rng = np.random.default_rng(seed)
    depth = np.linspace(1.0, 0.35, rows, dtype=np.float32)[:, None]
    speckle = rng.rayleigh(scale=0.35, size=(rows, columns)).astype(np.float32)
    pixels = np.clip(speckle * depth * 180.0, 0, 255).astype(np.uint8)

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = US_IMAGE_STORAGE
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.SOPClassUID = US_IMAGE_STORAGE
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.PatientName = "SYNTHETIC^PHANTOM"
    ds.PatientID = patient_id
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "O"
    ds.StudyDate = "20260101"
    ds.StudyTime = "120000"
    ds.AccessionNumber = "SYNTH"
    ds.ReferringPhysicianName = ""
    ds.StudyID = "1"
    ds.Modality = "US"
    ds.Laterality = "L"
    ds.PatientOrientation = ""
    ds.ImageType = ["ORIGINAL", "PRIMARY", "", "0001"]
    ds.ContentDate = ds.StudyDate
    ds.ContentTime = ds.StudyTime
    ds.SeriesNumber = 1
    ds.InstanceNumber = instance_number
    ds.Manufacturer = "radlens synthetic"
    ds.BodyPartExamined = "BREAST"
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
