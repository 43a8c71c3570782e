"""A labelled dermoscopy folder as training and evaluation read it: ``labels.csv`` (case_id,
patient_id, label nevus or melanoma; optionally pixel_spacing_mm, descriptors, confounders,
fitzpatrick, site, lesion_id, visit, as ``radlens phantoms --task dermoscopy`` writes them),
``images/<case_id>.png`` or ``.jpg`` (RGB) and, for the segmentation stage, ``masks/<case_id>
.png`` (the lesion white on black). Everything missing or contradictory is refused with the
file named; nothing is guessed."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from radlens.datasets.labels_csv import LabelsCsvError, read_labels_csv

LABELS = ("nevus", "melanoma")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


class DermoscopyDataError(ValueError):
    """A folder the dermoscopy task will not read, with the reason."""


@dataclass(frozen=True)
class DermoscopyRecord:
    case_id: str
    patient_id: str
    label: str  # nevus or melanoma
    image: Path
    mask: Path | None
    spacing_mm: float | None
    descriptors: tuple[str, ...]
    confounders: tuple[str, ...]
    fitzpatrick: int | None

    @property
    def target(self) -> int:
        """1 for melanoma, 0 for nevus."""
        return LABELS.index(self.label)


def _split(cell: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in cell.split(";") if part.strip())


def _number(path: Path, case_id: str, column: str, cell: str) -> float | None:
    if not cell:
        return None
    try:
        value = float(cell)
    except ValueError:
        raise DermoscopyDataError(f"{path}: case {case_id!r} has {column} {cell!r}, not a "
                                  "number") from None
    if not value > 0:
        raise DermoscopyDataError(f"{path}: case {case_id!r} has {column} {cell}; it must be "
                                  "positive")
    return value


def read_folder(folder: Path, *, masks: bool = False) -> list[DermoscopyRecord]:
    """Every case of ``folder`` in labels.csv's order; ``masks``: each must have its mask."""
    labels_path = folder / "labels.csv"
    if not labels_path.is_file():
        raise DermoscopyDataError(f"{folder} has no labels.csv (radlens phantoms --task "
                                  "dermoscopy writes one; see docs/dermoscopy.md)")
    try:
        rows = read_labels_csv(labels_path, labels=LABELS, required=("patient_id", "label"))
    except LabelsCsvError as exc:
        raise DermoscopyDataError(str(exc)) from exc
    records = []
    for case_id, row in rows.items():
        if not row["label"]:
            raise DermoscopyDataError(f"{labels_path}: case {case_id!r} has no label")
        image = next((folder / "images" / f"{case_id}{suffix}" for suffix in IMAGE_SUFFIXES
                      if (folder / "images" / f"{case_id}{suffix}").is_file()), None)
        if image is None:
            raise DermoscopyDataError(f"{folder / 'images'}: no image of case {case_id!r} "
                                      f"({' or '.join(IMAGE_SUFFIXES)})")
        mask: Path | None = folder / "masks" / f"{case_id}.png"
        if not mask.is_file():
            if masks:
                raise DermoscopyDataError(f"{folder / 'masks'}: no mask of case {case_id!r} "
                                          "(the segmentation stage trains on masks)")
            mask = None
        fitzpatrick = row.get("fitzpatrick", "")
        records.append(DermoscopyRecord(
            case_id=case_id, patient_id=row["patient_id"] or case_id, label=row["label"],
            image=image, mask=mask,
            spacing_mm=_number(labels_path, case_id, "pixel_spacing_mm",
                               row.get("pixel_spacing_mm", "")),
            descriptors=_split(row.get("descriptors", "")),
            confounders=_split(row.get("confounders", "")),
            fitzpatrick=int(fitzpatrick) if fitzpatrick.isdigit() else None))
    if not records:
        raise DermoscopyDataError(f"{labels_path} lists no case")
    return records


def load_rgb(path: Path) -> np.ndarray:
    """(H, W, 3) uint8; greyscale and RGBA images are converted, 16-bit ones refused."""
    with Image.open(path) as image:
        if image.mode in ("I", "I;16", "I;16B", "F"):
            raise DermoscopyDataError(f"{path}: a {image.mode} (16-bit or float) image; "
                                      "dermoscopy photographs are 8-bit RGB")
        return np.asarray(image.convert("RGB"), dtype=np.uint8)


def load_mask(path: Path) -> np.ndarray:
    """A bool lesion mask: pixels above half the 8-bit range."""
    with Image.open(path) as image:
        return np.asarray(image.convert("L")) > 127
