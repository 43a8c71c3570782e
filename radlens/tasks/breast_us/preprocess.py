"""One preprocessing for the lesion model: training, evaluation and the agent turn an image into
the network's input with the same function, and the card says which (``preprocessing``).

A model trained on one input and run on another is not the model its card measured: training
once divided 8-bit PNGs by 255 and resized them with PIL, while the agent stretched each image
from its own minimum to its maximum and resized with torch, so 18 of 80 phantoms reached the
network with different values. Now the card names the policy and everything calls ``prepare``:

- ``bit-depth`` (what training writes into new cards): grey levels divided by 255, or, for an
  image whose values exceed 255, by the smallest 2^n - 1 that holds them (its bit depth), so a
  stored value means the same brightness on every image; MONAI's ``ScaleIntensityRange`` and
  ``Resize`` (bilinear);
- ``min-max`` (cards written before the policy was recorded, as the shipped model's was until
  it was retrained): each image stretched from its minimum to its maximum, as the agent always
  did for them, so their outputs do not change.

Its geometry is the ``aspect`` policy:

- ``pad`` (new cards): the image is scaled, keeping its aspect ratio, until its longer side fills
  the input, and the shorter side is padded symmetrically with black (MONAI's ``SpatialPad``).
  A lesion keeps its shape: orientation ("taller than wide") and roundness are among the
  ultrasound findings that tell benign from malignant, and stretching a 4:3 frame into a square
  changes both;
- ``stretch`` (cards from before the policy, and ``--aspect stretch``): resized to the square
  whatever the aspect ratio.

``placement`` says where the image lies in the input and ``to_source`` maps anything the
network gives back (probabilities, saliency) from the input to the image: the padding is cut
away before resizing, so a map lands on the pixels it was computed from. Resampling to a
physical spacing (mm per pixel) is not a policy here: ultrasound frames of one probe depth
already share their spacing, and the lesion model was trained on frames, not on millimetres.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from monai.transforms import Resize, ScaleIntensityRange

from radlens.models.placement import Placement, placement, to_source  # noqa: F401 (re-exported)
from radlens.models.placement import pad as _pad

BIT_DEPTH = {"intensity": "bit-depth", "resize": "bilinear", "aspect": "pad"}
MIN_MAX = {"intensity": "min-max", "resize": "bilinear", "aspect": "stretch"}
INTENSITIES = ("bit-depth", "min-max")
ASPECTS = ("pad", "stretch")
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


def policy_of(card: Mapping[str, Any]) -> dict[str, str]:
    """The card's preprocessing; cards from before it was recorded get ``min-max``, and cards
    that name no aspect policy were trained on stretched images."""
    stated = card.get("preprocessing")
    if stated is None:
        return dict(MIN_MAX)
    policy = {"resize": "bilinear", "aspect": "stretch", **dict(stated)}
    if policy["intensity"] not in INTENSITIES or policy["aspect"] not in ASPECTS or \
            policy["resize"] != "bilinear":
        raise ValueError(f"unknown preprocessing {dict(stated)} (intensity one of "
                         f"{INTENSITIES}, aspect one of {ASPECTS}, resize bilinear)")
    return policy


def training_policy(aspect: str = "pad") -> dict[str, str]:
    """The policy a model trained now records: bit-depth intensities, ``aspect`` geometry."""
    if aspect not in ASPECTS:
        raise ValueError(f"unknown aspect policy {aspect!r} (known: {ASPECTS})")
    return {**BIT_DEPTH, "aspect": aspect}


def grey(image: np.ndarray) -> np.ndarray:
    """A 2-D float32 image: (H, W), (H, W, 1), or (H, W, 3) colour as ITU-R 601 luma."""
    array = np.asarray(image, dtype=np.float32)
    if array.ndim == 3:
        if array.shape[-1] == 3:
            array = array @ _LUMA
        elif array.shape[-1] == 1:
            array = array[..., 0]
        else:
            raise ValueError(f"expected 1 or 3 channels, got {array.shape[-1]}")
    if array.ndim != 2:
        raise ValueError(f"expected a 2-D image, got shape {np.shape(image)}")
    return array


def bit_depth_top(array: np.ndarray) -> float:
    """255, or the smallest 2^n - 1 that holds the image's largest value."""
    high = float(array.max()) if array.size else 0.0
    return 255.0 if high <= 255 else float(2 ** int(np.ceil(np.log2(high + 1))) - 1)


def prepare(image: np.ndarray, size: tuple[int, int], policy: Mapping[str, str]) -> torch.Tensor:
    """The network's input (1, 1, *size) from one image, under ``policy``."""
    array = grey(image)
    box = placement(array.shape, size, policy)
    if policy["intensity"] == "min-max":
        low, high = float(array.min()), float(array.max())
        scaled = (array - low) / (high - low) if high > low else np.zeros_like(array)
        tensor = F.interpolate(torch.from_numpy(np.ascontiguousarray(scaled))[None, None],
                               size=(box.height, box.width), mode="bilinear",
                               align_corners=False)
        return _pad(tensor[0], size).reshape(1, 1, *size)
    scale = ScaleIntensityRange(a_min=0.0, a_max=bit_depth_top(array), b_min=0.0, b_max=1.0,
                                clip=True, dtype=np.float32)
    resize = Resize(spatial_size=(box.height, box.width), mode="bilinear", align_corners=False,
                    anti_aliasing=False)
    resized = resize(scale(torch.from_numpy(np.ascontiguousarray(array))[None]))
    return _pad(torch.as_tensor(resized, dtype=torch.float32), size).reshape(1, 1, *size)


def prepare_mask(classes: np.ndarray, size: tuple[int, int],
                 policy: Mapping[str, str] = BIT_DEPTH) -> np.ndarray:
    """Class indices placed as their image is (nearest; padding is background), (size) int64."""
    box = placement(np.shape(classes)[:2], size, policy)
    resize = Resize(spatial_size=(box.height, box.width), mode="nearest")
    resized = resize(torch.from_numpy(np.ascontiguousarray(classes, dtype=np.float32))[None])
    return _pad(torch.as_tensor(resized), size)[0].round().long().numpy()
