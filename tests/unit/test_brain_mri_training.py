"""Training the dual-output network on phantom stacks (small: every third slice of four
volumes, 32 pixels, three epochs, the real loop) and reading a whole volume with it."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from radlens.tasks.brain_mri import phantoms
from radlens.tasks.brain_mri.datasets import Stacks, volume_stacks
from radlens.tasks.brain_mri.network import CLASSES
from radlens.tasks.brain_mri.train import read_volume, train_network


def _stacks(cases) -> Stacks:
    import torch

    parts = [volume_stacks(sitk.GetArrayFromImage(c.image), sitk.GetArrayFromImage(c.mask),
                           c.label, size=32, case_id=c.case_id) for c in cases]
    return Stacks(torch.cat([p.images for p in parts]), torch.cat([p.masks for p in parts]),
                  torch.cat([p.classes for p in parts]), [x for p in parts for x in p.cases],
                  [k for p in parts for k in p.slices])


def test_the_network_trains_on_stacks_and_reads_a_volume():
    cases = [phantoms.make_case(9, k, size=32, label=label)  # thick slices: few stacks
             for k, label in zip((0, 1, 5, 4), phantoms.LABELS, strict=True)]
    stacks = _stacks(cases)
    # every third slice of three volumes to train on, of the glioma's to validate on
    train = [i for i, c in enumerate(stacks.cases) if c != cases[0].case_id][::3]
    val = [i for i, c in enumerate(stacks.cases) if c == cases[0].case_id][::3]
    network, history, best = train_network(
        stacks, train, val, backbone="resnet10", epochs=3, batch_size=32, learning_rate=2e-3,
        patience=3, seed=0, device="cpu")
    assert [h.epoch for h in history] == [1, 2, 3] and 1 <= best <= 3
    assert history[-1].train_loss < history[0].train_loss
    assert all(0.0 <= h.val_dice <= 1.0 and 0.0 <= h.val_accuracy <= 1.0 for h in history)
    glioma = _stacks(cases[:1])
    reading = read_volume(network, glioma)
    assert set(reading.probabilities) == set(CLASSES) and reading.label in CLASSES
    assert sum(reading.probabilities.values()) == pytest.approx(1.0)
    assert reading.masks.shape == (len(glioma.slices), 32, 32)
    assert set(np.unique(reading.masks)) <= {0, 1, 2}
    with pytest.raises(ValueError, match="stacks to train on and stacks to validate on"):
        train_network(stacks, train, [], backbone="resnet10", epochs=1, batch_size=8,
                      learning_rate=1e-3, patience=1, seed=0, device="cpu")
