"""The second stage of the lesion's segmentation: a promptable segmenter refines the coarse
mask from foreground and background points sampled from it.

``sample_points`` draws the prompts (foreground points deep inside the coarse mask,
background points in a ring around it, and the coarse mask itself), and a ``Refiner`` turns
them into a mask:

- ``RandomWalkerRefiner`` (the default, no weights needed): scikit-image's random walker
  deciding only the band along the coarse mask's edge. Every pixel deeper inside the coarse
  mask than ``BAND`` of the photograph's longer side is a foreground seed, every pixel
  farther outside a background seed (the sparse points are among them), and the walker
  places the edge inside that band from the colours: the coarse UNet sees the photograph at
  128 pixels, the walker at up to ``WORKING_SIZE`` on the lesion's box, so the edge it finds
  is finer than the coarse one. The photograph is smoothed first (a median filter takes hair
  and the pigment network's mesh away) and converted to CIELAB; cropping to the lesion's
  box and the working size bound the cost, whatever the photograph's size;
- ``Sam2Refiner``: SAM2 from a folder the site provides (its checkpoint, and the name of its
  config), with the ``sam2`` package installed (the ``sam2`` extra); nothing is downloaded.
  It takes the sparse points, as the published method prompts it.

A refined mask that disagrees with the coarse one it was prompted from (Dice below
``MIN_AGREEMENT``) is not believed: the coarse mask stands and the result says why, because a
refiner that ran off along a hair or into skin of the lesion's colour is worse than the mask
it started from. scikit-image's ``random_walker`` does the solving (the direct sparse solver:
only the band's pixels are unknowns); the seeding, the point sampling and the agreement rule
are written here.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
from scipy import ndimage

log = logging.getLogger(__name__)

WORKING_SIZE = 256  # the random walker's longer side on the lesion's box, in pixels
BAND = 0.015  # half the width of the band the random walker decides, share of the longer side
FOREGROUND_POINTS = 24
BACKGROUND_POINTS = 48
MIN_AGREEMENT = 0.85  # Dice between refined and coarse below which the coarse mask stands
RANDOM_WALKER_BETA = 3000.0


class RefinerError(RuntimeError):
    """A refiner that cannot be loaded as configured (a missing package or checkpoint)."""


@dataclass(frozen=True)
class Prompts:
    """Points in (row, column) of the photograph, inside and outside the lesion, and the
    coarse mask they were drawn from (a refiner may seed from it densely)."""

    foreground: np.ndarray  # (n, 2) int
    background: np.ndarray  # (m, 2) int
    coarse: np.ndarray | None = None  # bool (H, W)


@dataclass(frozen=True)
class Refined:
    """The refined mask, the prompts it came from, and whether it was kept."""

    mask: np.ndarray  # bool (H, W): the refined mask, or the coarse one when not kept
    prompts: Prompts | None  # None: there was no coarse mask to prompt from
    refiner: str
    agreement: float  # Dice between the refiner's mask and the coarse mask
    kept: bool
    note: str = ""  # why the coarse mask stands, when it does


class Refiner(Protocol):
    name: str

    def segment(self, image: np.ndarray, prompts: Prompts) -> np.ndarray:
        """A bool (H, W) lesion mask of the RGB ``image`` (uint8) from ``prompts``."""


def dice(first: np.ndarray, second: np.ndarray) -> float:
    total = int(first.sum()) + int(second.sum())
    return 1.0 if total == 0 else 2.0 * float((first & second).sum()) / total


def sample_points(coarse: np.ndarray, *, foreground: int = FOREGROUND_POINTS,
                  background: int = BACKGROUND_POINTS, seed: int = 0) -> Prompts:
    """Prompts from a coarse mask: foreground points where the mask is deepest (at least 40 %
    of its largest depth), background points in a ring 3 % to 15 % of the image's size
    outside it. Seeded: the same mask gives the same points."""
    region = coarse.astype(bool)
    if not region.any():
        raise ValueError("the coarse mask is empty: there is nothing to refine")
    rng = np.random.default_rng(seed)
    depth = ndimage.distance_transform_edt(region)
    core = np.argwhere(depth >= max(1.0, 0.4 * float(depth.max())))
    span = max(region.shape)
    away = ndimage.distance_transform_edt(~region)
    ring = np.argwhere((away > 0.03 * span) & (away < 0.15 * span))
    if ring.size == 0:  # the lesion fills the frame: take what lies outside it at all
        ring = np.argwhere(away > 0)

    def pick(points: np.ndarray, count: int) -> np.ndarray:
        if len(points) <= count:
            return points.astype(int)
        return points[np.sort(rng.choice(len(points), count, replace=False))].astype(int)

    return Prompts(pick(core, foreground), pick(ring, background), region)


class RandomWalkerRefiner:
    """scikit-image's random walker on the coarse mask's edge band (see the module's
    docstring); with no coarse mask in the prompts, seeded with the points alone."""

    name = "random walker"

    def __init__(self, *, working_size: int = WORKING_SIZE, band: float = BAND,
                 beta: float = RANDOM_WALKER_BETA) -> None:
        self.working_size = working_size
        self.band = band
        self.beta = beta

    def segment(self, image: np.ndarray, prompts: Prompts) -> np.ndarray:
        from skimage.color import rgb2lab
        from skimage.segmentation import random_walker
        from skimage.transform import resize

        height, width = image.shape[:2]
        band = max(1.0, self.band * max(height, width))
        top, left, bottom, right = 0, 0, height, width
        if prompts.coarse is not None and prompts.coarse.any():
            rows, columns = np.nonzero(prompts.coarse)
            margin = int(np.ceil(4 * band)) + 2
            top, bottom = max(0, rows.min() - margin), min(height, rows.max() + margin + 1)
            left, right = max(0, columns.min() - margin), min(width, columns.max() + margin + 1)
        box_height, box_width = bottom - top, right - left
        scale = min(1.0, self.working_size / max(box_height, box_width))
        shape = (max(8, round(box_height * scale)), max(8, round(box_width * scale)))
        small = resize(image[top:bottom, left:right], shape, order=1,
                       anti_aliasing=scale < 1.0, preserve_range=False)
        smooth = np.stack([ndimage.median_filter(small[..., k], size=5) for k in range(3)],
                          axis=-1)
        features = rgb2lab(np.clip(smooth, 0, 1)) / np.array([100.0, 128.0, 128.0])
        labels = np.zeros(shape, dtype=np.int32)
        if prompts.coarse is not None:
            region = resize(prompts.coarse[top:bottom, left:right].astype(np.float32), shape,
                            order=1) > 0.5
            labels[ndimage.distance_transform_edt(region) > band * scale] = 1
            labels[ndimage.distance_transform_edt(~region) > band * scale] = 2
        for value, points in ((1, prompts.foreground), (2, prompts.background)):
            inside = ((points[:, 0] >= top) & (points[:, 0] < bottom)
                      & (points[:, 1] >= left) & (points[:, 1] < right))
            rows = np.clip(np.round((points[inside, 0] - top) * scale).astype(int), 0,
                           shape[0] - 1)
            columns = np.clip(np.round((points[inside, 1] - left) * scale).astype(int), 0,
                              shape[1] - 1)
            labels[rows, columns] = value
        if not (labels == 1).any() or not (labels == 2).any():
            raise ValueError("the random walker needs foreground and background seeds")
        probability = random_walker(features, labels, beta=self.beta, mode="bf",
                                    channel_axis=-1, return_full_prob=True)[0]
        mask = np.zeros((height, width), dtype=bool)
        mask[top:bottom, left:right] = resize(probability, (box_height, box_width),
                                              order=1) > 0.5
        return mask


# The config each published SAM2 checkpoint was released with, for a folder that names none.
SAM2_CONFIGS = {
    "sam2.1_hiera_tiny.pt": "configs/sam2.1/sam2.1_hiera_t.yaml",
    "sam2.1_hiera_small.pt": "configs/sam2.1/sam2.1_hiera_s.yaml",
    "sam2.1_hiera_base_plus.pt": "configs/sam2.1/sam2.1_hiera_b+.yaml",
    "sam2.1_hiera_large.pt": "configs/sam2.1/sam2.1_hiera_l.yaml",
    "sam2_hiera_tiny.pt": "configs/sam2/sam2_hiera_t.yaml",
    "sam2_hiera_small.pt": "configs/sam2/sam2_hiera_s.yaml",
    "sam2_hiera_base_plus.pt": "configs/sam2/sam2_hiera_b+.yaml",
    "sam2_hiera_large.pt": "configs/sam2/sam2_hiera_l.yaml",
}


class Sam2Refiner:
    """SAM2 from a local folder: one checkpoint (``*.pt``) and, unless the checkpoint is one
    of the published ones, a ``sam2.json`` naming its config (``{"config": ...,
    "checkpoint": ...}``). Needs the ``sam2`` package (``pip install radlens[sam2]``)."""

    name = "SAM2"

    def __init__(self, folder: Path, *, device: str = "cpu") -> None:
        folder = Path(folder)
        if not folder.is_dir():
            raise RefinerError(f"SAM2 folder {folder} does not exist")
        stated = folder / "sam2.json"
        if stated.is_file():
            try:
                described = json.loads(stated.read_text())
                config, checkpoint = str(described["config"]), folder / described["checkpoint"]
            except (ValueError, KeyError, TypeError) as exc:
                raise RefinerError(f"{stated} must hold {{\"config\": ..., \"checkpoint\": "
                                   f"...}}: {exc}") from exc
        else:
            known = [p for p in sorted(folder.glob("*.pt")) if p.name in SAM2_CONFIGS]
            if not known:
                raise RefinerError(f"SAM2 folder {folder} has no published checkpoint ("
                                   f"{', '.join(SAM2_CONFIGS)}) and no sam2.json naming one "
                                   "with its config")
            checkpoint, config = known[0], SAM2_CONFIGS[known[0].name]
        if not checkpoint.is_file():
            raise RefinerError(f"SAM2 checkpoint {checkpoint} does not exist")
        try:
            from sam2.build_sam import build_sam2  # type: ignore[import-not-found]
            from sam2.sam2_image_predictor import (  # type: ignore[import-not-found]
                SAM2ImagePredictor,
            )
        except ImportError as exc:
            raise RefinerError("SAM2 needs the sam2 package: pip install 'radlens[sam2]' "
                               f"({exc})") from exc
        self.predictor = SAM2ImagePredictor(build_sam2(config, str(checkpoint),
                                                       device=device))

    def segment(self, image: np.ndarray, prompts: Prompts) -> np.ndarray:
        points = np.concatenate([prompts.foreground, prompts.background])[:, ::-1]  # (x, y)
        labels = np.concatenate([np.ones(len(prompts.foreground), dtype=int),
                                 np.zeros(len(prompts.background), dtype=int)])
        self.predictor.set_image(np.ascontiguousarray(image))
        masks, _, _ = self.predictor.predict(point_coords=points.astype(np.float32),
                                             point_labels=labels, multimask_output=False)
        return np.asarray(masks[0]) > 0


def refine(image: np.ndarray, coarse: np.ndarray, refiner: Refiner, *,
           min_agreement: float = MIN_AGREEMENT) -> Refined:
    """The refined lesion mask of ``image`` prompted from ``coarse`` (its largest connected
    part, holes filled), or the coarse mask with the reason when the refiner's disagrees."""
    prompts = sample_points(coarse)
    region = coarse.astype(bool)
    try:
        segmented = refiner.segment(image, prompts)
    except (ValueError, RuntimeError) as exc:
        return Refined(region, prompts, refiner.name, 0.0, False,
                       f"the {refiner.name} refiner failed ({exc}): the coarse mask stands")
    segmented = largest_region(segmented)
    agreement = dice(segmented, region)
    if agreement < min_agreement:
        return Refined(region, prompts, refiner.name, agreement, False,
                       f"the {refiner.name} mask agreed with the coarse mask at Dice "
                       f"{agreement:.2f}, under {min_agreement:.2f}: the coarse mask stands")
    return Refined(segmented, prompts, refiner.name, agreement, True)


def largest_region(mask: np.ndarray) -> np.ndarray:
    """The largest connected part of ``mask``, its holes filled (empty stays empty): a
    lesion is one region."""
    labels, count = ndimage.label(mask)
    if count == 0:
        return np.zeros(mask.shape, dtype=bool)
    sizes = ndimage.sum_labels(mask, labels, index=np.arange(1, count + 1))
    return ndimage.binary_fill_holes(labels == 1 + int(np.argmax(sizes)))
