"""Training the dual-output network on 2.5-D slice stacks, and reading a whole volume with it.

``train_network`` is the shared epoch loop (``radlens.models.training.fit``) on the joint
loss: the classification's cross-entropy (classes weighted by their inverse frequency among
the training stacks: most slices show no tumour) plus the masks' Dice and cross-entropy, with
flips and quarter turns as augmentation, AdamW, the epoch of lowest validation loss kept.

``read_volume`` is how a trained network reads a series: every stack of the volume
classified and segmented, in batches. The volume's class: for each tumour class, the mean
of its three highest slice probabilities; the largest of those against the slices' "no
tumour" is the answer, so that one or two slices through a small pituitary tumour can carry
a volume the other slices call healthy. The volume's mask is the slices' masks put back in
place (tumour core and oedema), on the network's square; ``to_volume_grid`` returns them to
the volume's own pixels.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from radlens.tasks.brain_mri.datasets import NO_TUMOUR, Stacks
from radlens.tasks.brain_mri.network import CLASSES, DualOutputNet, joint_loss

log = logging.getLogger(__name__)

TOP_SLICES = 3


@dataclass(frozen=True)
class BrainEpoch:
    epoch: int
    train_loss: float
    val_loss: float
    val_accuracy: float  # of the slices' classes
    val_dice: float  # of the tumour core, over the validation slices together
    seconds: float


@dataclass(frozen=True)
class VolumeReading:
    probabilities: dict[str, float]  # each class
    label: str
    masks: np.ndarray  # (Z, size, size) uint8 0/1/2 for the stacks read
    slices: list[int]


def _augment(generator: torch.Generator, images: torch.Tensor, masks: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor]:
    if bool(torch.randint(0, 2, (1,), generator=generator)):
        images, masks = torch.flip(images, (3,)), torch.flip(masks, (3,))  # left-right
    turns = int(torch.randint(0, 4, (1,), generator=generator))
    if turns:
        images, masks = torch.rot90(images, turns, (2, 3)), torch.rot90(masks, turns, (2, 3))
    return images, masks


def train_network(stacks: Stacks, train: Sequence[int], val: Sequence[int], *, backbone: str,
                  epochs: int, batch_size: int, learning_rate: float, patience: int, seed: int,
                  device: str, on_epoch: Callable[[BrainEpoch], None] | None = None
                  ) -> tuple[DualOutputNet, list[BrainEpoch], int]:
    """Train on the stacks at ``train``, validate on ``val``; returns the network holding
    the epoch of lowest validation loss, the history and that epoch."""
    from radlens.models.training import EarlyStopping, fit

    if not train or not val:
        raise ValueError("training needs stacks to train on and stacks to validate on")
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    network = DualOutputNet(backbone).to(device)
    optimiser = torch.optim.AdamW(network.parameters(), lr=learning_rate, weight_decay=1e-4)
    counts = torch.bincount(stacks.classes[list(train)], minlength=len(CLASSES)).float()
    weights = (counts.sum() / counts.clamp_min(1.0) / len(CLASSES)).to(device)

    def batch(indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        chosen = list(indices)
        return (stacks.images[chosen].float().div(255).to(device),
                stacks.masks[chosen].long().to(device), stacks.classes[chosen].to(device))

    def loss_of(classes_out: torch.Tensor, masks_out: torch.Tensor, classes: torch.Tensor,
                masks: torch.Tensor) -> torch.Tensor:
        return joint_loss(classes_out, masks_out, classes, masks, class_weights=weights)

    def run_epoch(epoch: int) -> BrainEpoch:
        started = time.perf_counter()
        network.train()
        order = [train[i] for i in torch.randperm(len(train), generator=generator).tolist()]
        total, seen = 0.0, 0
        for start in range(0, len(order), batch_size):
            images, masks, classes = batch(order[start:start + batch_size])
            images, masks = _augment(generator, images, masks)
            optimiser.zero_grad()
            loss = loss_of(*network(images), classes, masks)
            loss.backward()
            optimiser.step()
            total, seen = total + loss.item() * len(images), seen + len(images)
        network.eval()
        val_total, correct, overlap, size = 0.0, 0, 0.0, 0.0
        with torch.no_grad():
            for start in range(0, len(val), batch_size):
                images, masks, classes = batch(val[start:start + batch_size])
                classes_out, masks_out = network(images)
                val_total += loss_of(classes_out, masks_out, classes, masks).item() * len(images)
                correct += int((classes_out.argmax(dim=1) == classes).sum())
                core = masks_out.argmax(dim=1, keepdim=True) == 1
                truth = masks == 1
                overlap += float((core & truth).sum())
                size += float(core.sum() + truth.sum())
        return BrainEpoch(epoch, total / max(1, seen), val_total / len(val), correct / len(val),
                          2 * overlap / size if size else 1.0, time.perf_counter() - started)

    result = fit(network, epochs=epochs, stopping=EarlyStopping(patience, 1e-4),
                 run_epoch=run_epoch, val_loss=lambda record: record.val_loss,
                 on_epoch=on_epoch)
    return network.cpu().eval(), result.history, result.best_epoch


@torch.no_grad()
def read_volume(network: DualOutputNet, stacks: Stacks, *, batch_size: int = 16,
                device: str = "cpu") -> VolumeReading:
    """One volume's stacks (from ``volume_stacks``) read by ``network``."""
    network = network.to(device).eval()
    if len(stacks.classes) == 0:
        raise ValueError("the volume has no slice that shows a head")
    probabilities, masks = [], []
    for start in range(0, len(stacks.classes), batch_size):
        images = stacks.images[start:start + batch_size].float().div(255).to(device)
        classes_out, masks_out = network(images)
        probabilities.append(torch.softmax(classes_out, dim=1).cpu())
        masks.append(masks_out.argmax(dim=1).to(torch.uint8).cpu())
    slices = torch.cat(probabilities).numpy()
    top = min(TOP_SLICES, len(slices))
    tumour = {name: float(np.sort(slices[:, index])[-top:].mean())
              for index, name in enumerate(CLASSES) if index != NO_TUMOUR}
    raw = {**tumour, "no tumour": 1.0 - max(tumour.values())}
    scale = sum(raw.values())
    stated = {name: value / scale for name, value in raw.items()}
    label = max(stated, key=stated.__getitem__)
    return VolumeReading(stated, label, torch.cat(masks).numpy(), list(stacks.slices))
