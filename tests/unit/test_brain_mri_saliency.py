"""Saliency to masks: the adaptive percentile keeps a peaked map's peak and bounds a
diffuse map's mask, each method gives a map in 0..1 of the slice's size, and an unknown
method is refused. (How well each method's mask matches the tumour is measured by the
evaluation on phantoms, on a trained network.)"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from radlens.tasks.brain_mri.network import DualOutputNet
from radlens.tasks.brain_mri.saliency import (
    METHODS,
    PERCENTILE_RANGE,
    adaptive_mask,
    saliency_map,
    saliency_masks,
    target_layer,
)


def _brain(size: int = 64) -> np.ndarray:
    yy, xx = np.mgrid[:size, :size]
    return (yy - size / 2) ** 2 + (xx - size / 2) ** 2 < (size * 0.45) ** 2


def test_a_peaked_map_keeps_its_peak_and_a_diffuse_one_at_most_a_fifth_of_the_brain():
    brain = _brain()
    yy, xx = np.mgrid[:64, :64]
    peak = np.exp(-((yy - 25) ** 2 + (xx - 38) ** 2) / (2 * 4.0 ** 2))
    percentile, mask = adaptive_mask(peak, brain)
    assert PERCENTILE_RANGE[0] <= percentile <= PERCENTILE_RANGE[1]
    assert mask[25, 38] and not mask[50, 20] and mask.sum() < 0.1 * brain.sum()
    assert not (mask & ~brain).any()
    noise = np.random.default_rng(0).random((64, 64))
    percentile, mask = adaptive_mask(noise, brain)
    assert percentile == PERCENTILE_RANGE[0]  # Otsu splits noise near its middle: clamped
    assert 0.15 * brain.sum() < mask.sum() <= 0.2 * brain.sum() + 1
    flat = np.full((64, 64), 0.5)
    assert not adaptive_mask(flat, brain)[1].any()
    assert not adaptive_mask(peak, np.zeros((64, 64), bool))[1].any()


@pytest.mark.parametrize("backbone", ["resnet10", "efficientnet-b0"])
def test_each_method_gives_a_map_of_the_slice_in_zero_to_one(backbone):
    torch.manual_seed(0)
    network = DualOutputNet(backbone).eval()
    assert target_layer(network).startswith("network.unet.encoder.")
    image = torch.rand(1, 3, 64, 64)
    results = saliency_masks(network, image, 0, _brain())
    assert [r.method for r in results] == list(METHODS)
    for result in results:
        assert result.saliency.shape == (64, 64) and np.isfinite(result.saliency).all()
        assert result.saliency.min() >= 0 and result.saliency.max() <= 1
        assert result.mask.shape == (64, 64) and not (result.mask & ~_brain()).any()
    again = saliency_map(network, image, 0, "Score-CAM")
    assert np.array_equal(again, results[2].saliency)
    with pytest.raises(ValueError, match="unknown saliency method 'LIME'"):
        saliency_map(network, image, 0, "LIME")
