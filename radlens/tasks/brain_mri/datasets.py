"""Brain MRI datasets: a folder of volumes with masks and a table, and the 2.5-D slice stacks
the network trains on.

A folder holds ``labels.csv`` (``case_id``, ``patient_id``, ``label``; the phantoms add the
side, volume and structures), ``images/<case>.nii.gz`` (the T1 after contrast) and
``masks/<case>.nii.gz`` (0 background, 1 tumour core, 2 oedema), in any format SimpleITK
reads. ``volume_stacks`` turns one volume into the network's input: its intensities scaled to
its head's 1st and 99th percentiles, each axial slice with its two neighbours as three
channels, placed on a square of ``size`` pixels (aspect kept, padded); each stack's class is
the case's when the slice holds tumour core and "no tumour" otherwise, as the published
slice sets label them. Stacks are kept as uint8 (a quarter of float32's memory), and a
dataset takes at most ``MAX_STACKS``.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from radlens.tasks.brain_mri.network import CLASSES

MAX_STACKS = 200_000  # about 10 GB at 128 pixels: far above any phantom set, a bound all the same
HEAD_THRESHOLD = 0.05  # of the 99th percentile: darker pixels are air
NO_TUMOUR = CLASSES.index("no tumour")


class BrainDataError(ValueError):
    """A dataset folder radlens cannot read as brain MRI volumes, and why."""


@dataclass(frozen=True)
class BrainRecord:
    case_id: str
    patient_id: str
    label: str
    image: Path
    mask: Path | None


@dataclass
class Stacks:
    """2.5-D slice stacks of one or more volumes."""

    images: torch.Tensor  # (N, 3, size, size) uint8
    masks: torch.Tensor  # (N, 1, size, size) uint8: 0, 1 core, 2 oedema
    classes: torch.Tensor  # (N,) index into CLASSES
    cases: list[str]  # the case each stack came from
    slices: list[int]  # its slice index in that case's volume


def _first(folder: Path, stem: str) -> Path | None:
    for suffix in (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd"):
        path = folder / f"{stem}{suffix}"
        if path.is_file():
            return path
    return None


def read_folder(folder: Path, *, masks: bool = True) -> list[BrainRecord]:
    """The folder's cases, each with its volume (and mask when ``masks``); a missing file or
    an unknown label is refused naming the case."""
    table = folder / "labels.csv"
    if not table.is_file():
        raise BrainDataError(f"{folder} has no labels.csv")
    records = []
    with table.open(newline="") as handle:
        for number, row in enumerate(csv.DictReader(handle), start=2):
            case = (row.get("case_id") or "").strip()
            label = (row.get("label") or "").strip()
            if not case:
                raise BrainDataError(f"{table} line {number}: no case_id")
            if label not in CLASSES:
                raise BrainDataError(f"{table} line {number}: label {label!r} is not one of "
                                     f"{', '.join(CLASSES)}")
            image = _first(folder / "images", case)
            if image is None:
                raise BrainDataError(f"{folder / 'images'} has no volume for {case}")
            mask = _first(folder / "masks", case)
            if masks and mask is None:
                raise BrainDataError(f"{folder / 'masks'} has no mask for {case}")
            records.append(BrainRecord(case, (row.get("patient_id") or case).strip(), label,
                                       image, mask))
    if not records:
        raise BrainDataError(f"{table} lists no case")
    return records


def scaled_volume(values: np.ndarray) -> np.ndarray:
    """(Z, Y, X) intensities in 0..1: 0 at the head's 1st percentile, 1 at its 99th."""
    values = values.astype(np.float32)
    top = float(np.percentile(values, 99.5))
    head = values[values > HEAD_THRESHOLD * top] if top > 0 else values.ravel()
    if head.size == 0:
        return np.zeros_like(values)
    low, high = np.percentile(head, [1, 99])
    return np.clip((values - low) / max(float(high - low), 1e-6), 0.0, 1.0)


def volume_stacks(volume: np.ndarray, mask: np.ndarray | None, label: str, *, size: int,
                  case_id: str = "") -> Stacks:
    """Every axial slice of ``volume`` (Z, Y, X) that shows head, with its neighbours, on a
    ``size`` square; ``mask`` (same shape) gives each stack's mask and class."""
    from monai.transforms import Resize, SpatialPad

    from radlens.models.placement import placement

    if mask is not None and mask.shape != volume.shape:
        raise BrainDataError(f"{case_id}: mask {mask.shape} does not match its volume "
                             f"{volume.shape}")
    if label not in CLASSES:
        raise BrainDataError(f"{case_id}: label {label!r} is not one of {', '.join(CLASSES)}")
    scaled = scaled_volume(volume)
    box = placement(volume.shape[1:], (size, size), {"aspect": "pad"})
    resize_image = Resize(spatial_size=(box.height, box.width), mode="bilinear",
                          anti_aliasing=True)
    resize_mask = Resize(spatial_size=(box.height, box.width), mode="nearest")
    pad = SpatialPad(spatial_size=(size, size), method="symmetric", mode="constant")
    shown = [k for k in range(volume.shape[0]) if (scaled[k] > 0.1).mean() > 0.02]
    images, masks, classes = [], [], []
    for k in shown:
        neighbours = scaled[[max(0, k - 1), k, min(volume.shape[0] - 1, k + 1)]]
        stack = pad(resize_image(torch.from_numpy(neighbours)))
        images.append((torch.as_tensor(stack).clamp(0, 1) * 255).round().to(torch.uint8))
        if mask is not None:
            placed = pad(resize_mask(torch.from_numpy(mask[k:k + 1].astype(np.float32))))
            masks.append(torch.as_tensor(placed).round().to(torch.uint8))
            core = bool((mask[k] == 1).any())
        else:
            masks.append(torch.zeros((1, size, size), dtype=torch.uint8))
            core = False
        classes.append(CLASSES.index(label) if core and label != "no tumour" else NO_TUMOUR)
    if not images:
        return Stacks(torch.zeros((0, 3, size, size), dtype=torch.uint8),
                      torch.zeros((0, 1, size, size), dtype=torch.uint8),
                      torch.zeros(0, dtype=torch.long), [], [])
    return Stacks(torch.stack(images), torch.stack(masks), torch.tensor(classes),
                  [case_id] * len(images), shown)


def dataset_stacks(records: list[BrainRecord], *, size: int) -> Stacks:
    """The stacks of every record, read one volume at a time."""
    import SimpleITK as sitk

    parts = []
    total = 0
    for record in records:
        volume = sitk.GetArrayFromImage(sitk.ReadImage(str(record.image)))
        mask = (sitk.GetArrayFromImage(sitk.ReadImage(str(record.mask)))
                if record.mask is not None else None)
        part = volume_stacks(volume, mask, record.label, size=size, case_id=record.case_id)
        total += len(part.classes)
        if total > MAX_STACKS:
            raise BrainDataError(f"more than {MAX_STACKS} slices in the dataset: train on a "
                                 "part of it")
        parts.append(part)
    return Stacks(torch.cat([p.images for p in parts]), torch.cat([p.masks for p in parts]),
                  torch.cat([p.classes for p in parts]),
                  [c for p in parts for c in p.cases], [k for p in parts for k in p.slices])
