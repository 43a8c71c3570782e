"""The first stage of the lesion's segmentation: a light MONAI UNet gives a coarse mask.

The photograph reaches the network as the other tasks' images do: its intensities divided by
255 (8-bit RGB), scaled keeping its aspect ratio until its longer side fills the input and
padded with black (MONAI's ``Resize`` and ``SpatialPad``, placed by
``radlens.models.placement``), and the network's probability is mapped
back onto the photograph with the padding cut away (``to_source``). The coarse mask is the
largest connected part of the probability above one half, its holes filled: a lesion is one
region. Training is the shared epoch loop (``radlens.models.training.fit``) on the Dice plus
cross-entropy loss (MONAI's ``DiceCELoss``), with flips and quarter turns, since a
dermatoscope has no up.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from monai.networks.nets import UNet
from monai.transforms import Resize, SpatialPad

from radlens.models.placement import placement, to_source
from radlens.tasks.dermoscopy.refine import largest_region

log = logging.getLogger(__name__)

SEGMENTER_SIZE = 128  # the coarse stage's input, pixels a side
PAD = {"aspect": "pad"}


def build_coarse_unet() -> UNet:
    """About half a million parameters: coarse is its job, the refiner does the edges."""
    return UNet(spatial_dims=2, in_channels=3, out_channels=1, channels=(16, 32, 64, 128),
                strides=(2, 2, 2), num_res_units=1)


def prepare_rgb(image: np.ndarray, size: int = SEGMENTER_SIZE) -> torch.Tensor:
    """(3, size, size) float32 in 0..1 from an (H, W, 3) uint8 photograph, aspect kept."""
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"an RGB image (H, W, 3) is needed, not {image.shape}")
    box = placement(image.shape[:2], (size, size), PAD)
    channels = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))).float() / 255
    resized = Resize(spatial_size=(box.height, box.width), mode="bilinear",
                     align_corners=False, anti_aliasing=True)(channels)
    padded = SpatialPad(spatial_size=(size, size), method="symmetric", mode="constant")(
        resized)
    return torch.as_tensor(padded, dtype=torch.float32)


def prepare_mask(mask: np.ndarray, size: int = SEGMENTER_SIZE) -> torch.Tensor:
    """(1, size, size) float32 0/1, placed as its photograph is."""
    box = placement(mask.shape, (size, size), PAD)
    resized = Resize(spatial_size=(box.height, box.width), mode="nearest")(
        torch.from_numpy(mask.astype(np.float32))[None])
    padded = SpatialPad(spatial_size=(size, size), method="symmetric", mode="constant")(
        resized)
    return torch.as_tensor(padded, dtype=torch.float32)


class CoarseSegmenter:
    """The trained coarse UNet on a device."""

    def __init__(self, network: torch.nn.Module, *, size: int = SEGMENTER_SIZE,
                 device: str = "cpu") -> None:
        self.network = network.to(device).eval()
        self.size = size
        self.device = device

    @torch.no_grad()
    def probability(self, image: np.ndarray) -> np.ndarray:
        """The lesion probability (H, W) float32 over the photograph."""
        logits = self.network(prepare_rgb(image, self.size)[None].to(self.device))
        mapped = to_source(torch.sigmoid(logits)[0, 0].cpu(), image.shape[:2],
                           (self.size, self.size), PAD)
        return mapped.numpy().astype(np.float32)

    def mask(self, image: np.ndarray) -> np.ndarray:
        return largest_region(self.probability(image) > 0.5)


@dataclass(frozen=True)
class SegmenterEpoch:
    epoch: int
    train_loss: float
    val_loss: float
    val_dice: float
    seconds: float


def augment(generator: torch.Generator, *batches: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The same random quarter turn and flip for every (N, C, H, W) batch given (images and
    their masks): a dermatoscope has no up, and neither the masks nor the ABC features
    change with either."""
    turns = int(torch.randint(0, 4, (1,), generator=generator))
    if turns:
        batches = tuple(torch.rot90(batch, turns, (2, 3)) for batch in batches)
    if bool(torch.randint(0, 2, (1,), generator=generator)):
        batches = tuple(torch.flip(batch, (3,)) for batch in batches)
    return batches


def train_coarse(images: torch.Tensor, masks: torch.Tensor, train: Sequence[int],
                 val: Sequence[int], *, epochs: int, batch_size: int, learning_rate: float,
                 patience: int, seed: int, device: str,
                 on_epoch: Callable[[SegmenterEpoch], None] | None = None
                 ) -> tuple[torch.nn.Module, list[SegmenterEpoch], int]:
    """Train the coarse UNet on prepared ``images`` (N, 3, s, s) and ``masks`` (N, 1, s, s)
    held as uint8 (the memory of a quarter of float32); returns the network holding the
    epoch with the lowest validation loss, the history and that epoch."""
    import time

    from monai.losses import DiceCELoss

    from radlens.models.training import EarlyStopping, fit

    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    network = build_coarse_unet().to(device)
    optimiser = torch.optim.AdamW(network.parameters(), lr=learning_rate, weight_decay=1e-4)
    loss_function = DiceCELoss(sigmoid=True)
    order = list(train)

    def batches(indices: Sequence[int]):
        for start in range(0, len(indices), batch_size):
            chosen = list(indices[start:start + batch_size])
            yield (images[chosen].float().div(255).to(device),
                   masks[chosen].float().to(device))

    def run_epoch(epoch: int) -> SegmenterEpoch:
        started = time.perf_counter()
        network.train()
        permutation = torch.randperm(len(order), generator=generator).tolist()
        total, seen = 0.0, 0
        for x, y in batches([order[i] for i in permutation]):
            x, y = augment(generator, x, y)
            optimiser.zero_grad()
            loss = loss_function(network(x), y)
            loss.backward()
            optimiser.step()
            total, seen = total + loss.item() * len(x), seen + len(x)
        network.eval()
        val_total, overlap, size = 0.0, 0.0, 0.0
        with torch.no_grad():
            for x, y in batches(list(val)):
                logits = network(x)
                val_total += loss_function(logits, y).item() * len(x)
                predicted = (torch.sigmoid(logits) > 0.5).float()
                overlap += float((predicted * y).sum())
                size += float(predicted.sum() + y.sum())
        return SegmenterEpoch(epoch, total / max(1, seen), val_total / max(1, len(val)),
                              2 * overlap / size if size else 1.0,
                              time.perf_counter() - started)

    result = fit(network, epochs=epochs, stopping=EarlyStopping(patience, 1e-4),
                 run_epoch=run_epoch, val_loss=lambda record: record.val_loss,
                 on_epoch=on_epoch)
    return network.cpu().eval(), result.history, result.best_epoch
