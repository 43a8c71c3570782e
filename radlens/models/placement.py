"""Where an image lies in a square network input, and back: the geometry every task's
preprocessing shares. Under the ``pad`` aspect policy an image is scaled, keeping its aspect
ratio, until its longer side fills the input, and padded symmetrically with zeros (MONAI's
``SpatialPad``); under ``stretch`` it fills the input whatever its shape. ``to_source`` maps
what the network gives back (probabilities, saliency, a feature grid) onto the image with
the padding cut away first, so a map lands on the pixels it was computed from."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from monai.transforms import SpatialPad


@dataclass(frozen=True)
class Placement:
    """Where a source image lies in the network's input: rows ``top:top + height`` and columns
    ``left:left + width``; the rest is padding."""

    top: int
    left: int
    height: int
    width: int

    @property
    def rows(self) -> slice:
        return slice(self.top, self.top + self.height)

    @property
    def columns(self) -> slice:
        return slice(self.left, self.left + self.width)


def placement(source: Sequence[int], size: Sequence[int], policy: Mapping[str, str]
              ) -> Placement:
    """The box a (H, W) ``source`` occupies in an input of ``size`` under ``policy``."""
    rows, columns = int(size[0]), int(size[1])
    if policy.get("aspect", "stretch") == "stretch":
        return Placement(0, 0, rows, columns)
    height, width = int(source[0]), int(source[1])
    if height < 1 or width < 1:
        raise ValueError(f"cannot place an image of shape {tuple(source)}")
    scale = min(rows / height, columns / width)
    fitted_rows = min(rows, max(1, round(height * scale)))
    fitted_columns = min(columns, max(1, round(width * scale)))
    # SpatialPad's "symmetric" method: the odd pixel of padding goes after the image.
    return Placement((rows - fitted_rows) // 2, (columns - fitted_columns) // 2,
                     fitted_rows, fitted_columns)


def to_source(values: torch.Tensor, source: Sequence[int], size: Sequence[int],
              policy: Mapping[str, str], *, mode: str = "bilinear") -> torch.Tensor:
    """Maps at the network's size, or on a coarser grid over the same input (an encoder's
    features), (..., h, w), back onto a (H, W) ``source`` image: the padding cut away, then
    resized (``mode``: "bilinear" or "nearest"). Leading dimensions are kept."""
    target = (int(source[0]), int(source[1]))
    lead = values.shape[:-2]
    flat = values.float().reshape(-1, 1, *values.shape[-2:])
    options = {"align_corners": False} if mode == "bilinear" else {}
    box = placement(source, size, policy)
    if box != Placement(0, 0, int(size[0]), int(size[1])):
        if tuple(flat.shape[-2:]) != (int(size[0]), int(size[1])):
            flat = F.interpolate(flat, size=tuple(int(n) for n in size), mode=mode, **options)
        flat = flat[..., box.rows, box.columns]
    mapped = F.interpolate(flat, size=target, mode=mode, **options)
    return mapped.reshape(*lead, *target)


def pad(tensor: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """(C, h, w) padded symmetrically with zeros to (C, *size); a no-op when it fills it."""
    if tuple(tensor.shape[-2:]) == tuple(size):
        return tensor
    padded = SpatialPad(spatial_size=tuple(size), method="symmetric", mode="constant")(tensor)
    return torch.as_tensor(padded)
