"""Datasets in the BUS-UCLM folder layout: ``images/*.png`` with colour-coded ``masks/*.png``.

Masks decode to class indices (0 background, 1 benign = green, 2 malignant = red); the image label
(normal / benign / malignant) comes from ``labels.csv`` when present, else from the mask colours.
Patients come from ``labels.csv`` or, for BUS-UCLM, the file name's prefix (``ALWI_000.png`` is
patient ``ALWI``), so splits never put one patient on both sides.
"""

from __future__ import annotations

import csv
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import (
    Compose,
    RandAdjustContrastd,
    RandAffined,
    RandFlipd,
    RandGaussianNoised,
    RandScaleIntensityd,
)
from PIL import Image

LABELS = ("normal", "benign", "malignant")
INPUT_SIZE = 256
_PATIENT_PREFIX = re.compile(r"^(?P<patient>.+?)_\d+$")


class DatasetError(ValueError):
    """The folder is not a dataset radlens can read."""


@dataclass(frozen=True)
class Case:
    case_id: str
    patient_id: str
    label: str
    image_path: Path
    mask_path: Path


def decode_mask(mask: np.ndarray) -> np.ndarray:
    """RGB (or greyscale) mask to class indices; tolerant of anti-aliased colours."""
    if mask.ndim == 2:
        return (mask > 127).astype(np.uint8)  # binary mask: the label decides benign/malignant
    red, green = mask[..., 0].astype(np.int16), mask[..., 1].astype(np.int16)
    classes = np.zeros(mask.shape[:2], dtype=np.uint8)
    classes[(green > 127) & (green - red > 64)] = 1
    classes[(red > 127) & (red - green > 64)] = 2
    return classes


def label_from_mask(classes: np.ndarray) -> str:
    if (classes == 2).any():
        return "malignant"
    if (classes == 1).any():
        return "benign"
    return "normal"


def load_cases(root: Path) -> list[Case]:
    """Every image with its mask; raises DatasetError naming what is missing."""
    images, masks = root / "images", root / "masks"
    if not images.is_dir() or not masks.is_dir():
        raise DatasetError(f"{root}: expected images/ and masks/ folders")
    listed: dict[str, dict[str, str]] = {}
    labels_csv = root / "labels.csv"
    if labels_csv.is_file():
        with open(labels_csv, newline="") as handle:
            listed = {row["case_id"]: row for row in csv.DictReader(handle)}
    cases = []
    for image_path in sorted(images.glob("*.png")):
        case_id = image_path.stem
        mask_path = masks / image_path.name
        if not mask_path.is_file():
            raise DatasetError(f"{image_path.name} has no mask in {masks}")
        row = listed.get(case_id, {})
        label = row.get("label") or label_from_mask(
            decode_mask(np.asarray(Image.open(mask_path).convert("RGB"))))
        if label not in LABELS:
            raise DatasetError(f"{case_id}: unknown label {label!r}")
        match = _PATIENT_PREFIX.match(case_id)
        patient = row.get("patient_id") or (match.group("patient") if match else case_id)
        cases.append(Case(case_id, patient, label, image_path, mask_path))
    if not cases:
        raise DatasetError(f"{images}: no PNG images")
    return cases


def load_arrays(case: Case, size: int = INPUT_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """Greyscale image in [0, 1] (bilinear) and class-index mask (nearest), both size x size."""
    image = Image.open(case.image_path).convert("L")
    mask_image = Image.open(case.mask_path)
    mask_rgb = np.asarray(mask_image.convert("RGB") if mask_image.mode != "L" else mask_image)
    classes = decode_mask(mask_rgb)
    if mask_rgb.ndim == 2 and case.label == "malignant":
        classes = classes * 2
    image = image.resize((size, size), Image.BILINEAR)
    classes = np.asarray(Image.fromarray(classes).resize((size, size), Image.NEAREST))
    return np.asarray(image, dtype=np.float32) / 255.0, classes.astype(np.int64)


def augmentations(seed: int) -> Compose:
    """Training augmentation: left-right flip only (depth has a direction in ultrasound), small
    rotation/scale, gain, contrast and noise."""
    transforms = Compose([
        RandFlipd(keys=("image", "mask"), spatial_axis=1, prob=0.5),
        RandAffined(keys=("image", "mask"), prob=0.5, rotate_range=0.15,
                    scale_range=(0.1, 0.1), mode=("bilinear", "nearest"),
                    padding_mode="zeros"),
        RandScaleIntensityd(keys="image", factors=0.2, prob=0.5),
        RandAdjustContrastd(keys="image", gamma=(0.7, 1.4), prob=0.3),
        RandGaussianNoised(keys="image", std=0.03, prob=0.3),
    ])
    transforms.set_random_state(seed=seed)
    return transforms


class SegmentationDataset(torch.utils.data.Dataset):
    """Cases held in memory at the network's input size (phantoms and BUS-UCLM are small)."""

    def __init__(self, cases: Sequence[Case], *, size: int = INPUT_SIZE,
                 transform: Compose | None = None) -> None:
        self.cases = list(cases)
        arrays = [load_arrays(c, size) for c in self.cases]
        self.images = np.stack([a[0] for a in arrays])[:, None]
        self.masks = np.stack([a[1] for a in arrays])[:, None]
        self.labels = np.array([LABELS.index(c.label) for c in self.cases])
        self.transform = transform

    def __len__(self) -> int:
        return len(self.cases)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        item = {"image": torch.from_numpy(self.images[index].copy()),
                "mask": torch.from_numpy(self.masks[index].copy())}
        if self.transform is not None:
            item = self.transform(item)
            item = {"image": _plain(item["image"]).float(),
                    "mask": _plain(item["mask"]).round().long()}
        item["label"] = torch.tensor(self.labels[index])
        return item


def _plain(value: torch.Tensor) -> torch.Tensor:
    """MONAI transforms return MetaTensors; training needs none of their metadata."""
    return value.as_tensor() if isinstance(value, MetaTensor) else torch.as_tensor(value)


def folds(cases: Sequence[Case], n_folds: int, seed: int) -> list[tuple[list[int], list[int]]]:
    """Patient-grouped, label-stratified folds: (train indices, validation indices)."""
    from radlens.models.folds import patient_folds

    try:
        return patient_folds([c.label for c in cases], [c.patient_id for c in cases], n_folds,
                             seed)
    except ValueError as exc:
        raise DatasetError(str(exc)) from exc


def holdout(cases: Sequence[Case], val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """One patient-grouped split with about ``val_fraction`` of cases for validation (a larger
    share when there are too few patients for that)."""
    patients = len({c.patient_id for c in cases})
    n_folds = min(max(2, round(1 / val_fraction)), patients)
    return folds(cases, max(n_folds, 2), seed)[0]
