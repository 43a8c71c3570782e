"""The dual-output network: each compared backbone gives class logits and masks of the
input's size, the classification-only view feeds saliency, and joint training on a tiny
batch lowers the joint loss."""

from __future__ import annotations

import pytest
import torch

from radlens.tasks.brain_mri.network import (
    BACKBONES,
    CLASSES,
    SEGMENTS,
    ClassificationOnly,
    DualOutputNet,
    joint_loss,
)


@pytest.mark.parametrize("backbone", BACKBONES)
def test_each_backbone_gives_classes_and_masks_of_the_input_size(backbone):
    network = DualOutputNet(backbone).eval()
    with torch.no_grad():
        classes, masks = network(torch.zeros(2, 3, 64, 64))
        only = ClassificationOnly(network)(torch.zeros(2, 3, 64, 64))
    assert classes.shape == (2, len(CLASSES)) and masks.shape == (2, len(SEGMENTS), 64, 64)
    assert torch.equal(only, classes)


def test_an_unknown_backbone_is_refused_by_name():
    with pytest.raises(ValueError, match="unknown backbone 'vgg11': one of efficientnet-b0"):
        DualOutputNet("vgg11")


def test_joint_training_lowers_the_joint_loss_on_a_tiny_batch():
    torch.manual_seed(0)
    network = DualOutputNet("resnet10")
    images = torch.rand(4, 3, 32, 32)
    masks = torch.zeros(4, 1, 32, 32, dtype=torch.long)
    masks[:2, :, 10:20, 10:20] = 1
    masks[:2, :, 8:10, 8:22] = 2
    images[:2, :, 10:20, 10:20] += 1.0  # the "tumour" is bright
    classes = torch.tensor([0, 0, 3, 3])
    optimiser = torch.optim.Adam(network.parameters(), lr=1e-3)
    first = None
    for _ in range(15):
        optimiser.zero_grad()
        loss = joint_loss(*network(images), classes, masks)
        loss.backward()
        optimiser.step()
        first = first if first is not None else float(loss)
    assert float(loss) < 0.7 * first
