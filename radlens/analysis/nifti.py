"""NIfTI export for 3D Slicer and ITK-SNAP users, and anatomy from a named label map.

A 2-D frame of shape (rows, columns) is written with x = column and y = row, and an affine whose
diagonal is the physical spacing (mm); when the spacing is unknown the affine is the identity
and the header's description says so, rather than inventing millimetres.

Anatomy (docs/method.md): a label map on the image grid (NIfTI) plus a names table (CSV with
``label,name``) turns any mask into the named structures it overlaps and by how much.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from radlens.findings import StudyFindings

UNKNOWN_SPACING_NOTE = "pixel spacing unknown: affine in pixels, not mm"


def to_nifti(array: np.ndarray, spacing_mm: tuple[float, float] | None,
             description: str = "radlens") -> nib.Nifti1Image:
    """(rows, columns) or (frames, rows, columns) -> NIfTI with x = column, y = row, z = frame."""
    data = np.asarray(array)
    if data.ndim == 2:
        data = data[None]
    if data.ndim != 3:
        raise ValueError(f"expected a 2-D frame or a stack of frames, got shape {array.shape}")
    volume = np.transpose(data, (2, 1, 0))  # (columns, rows, frames)
    affine = np.eye(4)
    if spacing_mm is not None:
        affine[0, 0], affine[1, 1] = spacing_mm[1], spacing_mm[0]
    image = nib.Nifti1Image(volume, affine)
    note = description if spacing_mm is not None else f"{description}; {UNKNOWN_SPACING_NOTE}"
    image.header["descrip"] = note[:79].encode()
    image.header.set_xyzt_units("mm")
    return image


def from_nifti(path: Path) -> tuple[np.ndarray, tuple[float, float]]:
    """Back to (frames, rows, columns) and (row mm, column mm)."""
    image = nib.load(str(path))
    volume = np.asarray(image.dataobj)
    if volume.ndim == 2:
        volume = volume[..., None]
    zooms = image.header.get_zooms()
    return np.transpose(volume, (2, 1, 0)), (float(zooms[1]), float(zooms[0]))


def export_study(results: Path, out: Path) -> list[Path]:
    """Every kept frame map of one study's results folder as NIfTI: the class map, each class
    probability and each saliency map, with the image's spacing from findings.json."""
    findings = StudyFindings.model_validate_json((results / "findings.json").read_text())
    written = []
    out.mkdir(parents=True, exist_ok=True)
    for image in findings.images:
        spacing_mm = ((image.spacing.row_mm, image.spacing.column_mm) if image.spacing
                      else None)
        for frame in image.predictions:
            if not frame.maps_file:
                continue
            maps = np.load(results / frame.maps_file)
            stem = Path(frame.maps_file).stem
            arrays = {"classes": maps["classes"].astype(np.uint8)}
            for index, name in enumerate(("background", "benign", "malignant")):
                arrays[f"probability_{name}"] = maps["probabilities"][index].astype(np.float32)
            for key in maps.files:
                if key.startswith("saliency_"):
                    arrays[key.replace("++", "pp")] = maps[key].astype(np.float32)
            for name, array in arrays.items():
                path = out / f"{stem}_{name}.nii.gz"
                nib.save(to_nifti(array, spacing_mm, f"radlens {name}"), str(path))
                written.append(path)
    return written


@dataclass(frozen=True)
class Overlap:
    label: int
    name: str
    pixels: int
    fraction_of_mask: float  # how much of the mask lies in this structure


class LabelMap:
    """Named structures on the image grid."""

    def __init__(self, labels: np.ndarray, names: dict[int, str]) -> None:
        if labels.ndim != 2:
            raise ValueError(f"a label map is one 2-D frame, got shape {labels.shape}")
        self.labels = labels.astype(np.int64)
        self.names = names

    @classmethod
    def load(cls, nifti: Path, names_csv: Path) -> LabelMap:
        volume, _ = from_nifti(nifti)
        with open(names_csv, newline="") as handle:
            names = {int(row["label"]): row["name"] for row in csv.DictReader(handle)}
        return cls(volume[0], names)

    def overlaps(self, mask: np.ndarray) -> list[Overlap]:
        """The named structures a mask overlaps, largest share first (label 0 is outside)."""
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != self.labels.shape:
            raise ValueError(f"mask {mask.shape} is not on the label map's grid "
                             f"{self.labels.shape}")
        total = int(mask.sum())
        if not total:
            return []
        counts = np.bincount(self.labels[mask], minlength=1)
        found = [Overlap(int(label), self.names.get(int(label), f"label {label}"), int(n),
                         n / total) for label, n in enumerate(counts) if n and label != 0]
        return sorted(found, key=lambda o: -o.pixels)
