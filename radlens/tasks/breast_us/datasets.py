"""The lesion task's datasets: images with masks in any layout radlens declares (BUS-UCLM's
colour masks, class-index masks, binary masks with a labels file, NIfTI pairs, nnU-Net's raw
layout; ``radlens.datasets.segmentation``), read without guessing.

Mask classes are 0 background, 1 benign, 2 malignant (green and red in colour masks); the
image label (normal / benign / malignant) is ``labels.csv``'s, which must agree with the mask,
or the mask's. Patients come from ``labels.csv`` or, for BUS-UCLM, the file name's prefix
(``ALWI_000.png`` is patient ``ALWI``), so splits never put one patient on both sides.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
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

from radlens.datasets.segmentation import (
    DatasetError,
    Layout,
    SegmentationCase,
    decode_colour,
    read_grey,
    read_mask,
    read_segmentation_folder,
)
from radlens.tasks.breast_us.classes import LABELS, LESION_MASKS

INPUT_SIZE = 256

Case = SegmentationCase
__all__ = ["LABELS", "LESION_MASKS", "Case", "DatasetError", "SegmentationDataset",
           "augmentations", "decode_mask", "folds", "load_arrays", "load_cases"]


def decode_mask(mask: np.ndarray) -> np.ndarray:
    """A BUS-UCLM colour mask (or a binary greyscale one: lesion above 127) to class indices."""
    if mask.ndim == 2:
        return (mask > 127).astype(np.uint8)
    return decode_colour(mask, LESION_MASKS).astype(np.uint8)


def load_cases(root: Path, layout: Layout | None = None) -> list[Case]:
    """Every image with its mask, in ``layout`` or the one the masks show; raises
    DatasetError naming what is missing, ambiguous or contradictory."""
    return read_segmentation_folder(root, LESION_MASKS, layout=layout).cases


def load_arrays(case: Case, size: int = INPUT_SIZE,
                policy: Mapping[str, str] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The network's input as the agent makes it (``preprocess.prepare`` under ``policy``; by
    default the one new cards record) and the class-index mask placed alike (nearest),
    size x size."""
    from radlens.tasks.breast_us.preprocess import BIT_DEPTH, prepare, prepare_mask

    policy = policy or BIT_DEPTH
    image = prepare(read_grey(case.image_path), (size, size), policy)[0, 0].numpy()
    classes = prepare_mask(read_mask(case, LESION_MASKS), (size, size), policy)
    return image.astype(np.float32), classes.astype(np.int64)


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
                 transform: Compose | None = None,
                 policy: Mapping[str, str] | None = None) -> None:
        """``policy``: the preprocessing (``preprocess``) of the model these cases train or
        evaluate; by default the one new cards record."""
        self.cases = list(cases)
        arrays = [load_arrays(c, size, policy) for c in self.cases]
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
