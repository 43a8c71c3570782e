"""Where the shipped density model looks: Grad-CAM back on the mammogram, and its share on
breast tissue against artifacts and background, checked against the phantoms' region maps."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from radlens.models.cards import model_folder
from radlens.tasks.mammo_density.model import prepare, to_original
from radlens.tasks.mammo_density.phantoms import ARTIFACT, PECTORAL, TISSUE, generate
from radlens.tasks.mammo_density.saliency import (
    LOW_TISSUE_SHARE,
    artifact_mask,
    attention_shares,
    explain,
)
from radlens.tasks.mammo_density.train import load_model


def test_maps_return_to_the_original_grid_where_the_breast_is():
    view = list(generate(1, 5, size=192))[0][0]  # a right breast: flipped on the canvas
    prepared = prepare(view.image, 96)
    assert prepared.flipped
    back = to_original(prepared.pixels, prepared, view.image.shape)
    breast = np.isin(view.regions, [TISSUE, PECTORAL])
    # the prepared pixels, mapped back, land on the breast and not on the background
    assert back[breast].mean() > 5 * max(back[~breast].mean(), 1e-6)
    assert back.shape == view.image.shape


def test_artifacts_are_found_without_labels():
    views = [v for patient in generate(4, 8, size=192) for v in patient]
    recalls = []
    for view in views:
        truth = view.regions == ARTIFACT
        found = artifact_mask(view.image)
        recalls.append((found & truth).sum() / truth.sum())
        assert (found & (view.regions == TISSUE)).sum() < 0.05 * (view.regions == TISSUE).sum()
    assert np.mean(recalls) > 0.8


def test_attention_shares_split_the_mass():
    breast = np.zeros((10, 10), bool)
    breast[:, :5] = True
    artifacts = np.zeros((10, 10), bool)
    artifacts[0, 0] = True
    cam = np.zeros((10, 10))
    cam[0, 0] = 1.0  # all of it on the marker
    assert attention_shares(cam, breast, artifacts) == {"tissue": 0.0, "artifacts": 1.0,
                                                        "outside": 0.0}
    cam[:, :5] = 1.0
    shares = attention_shares(cam, breast, artifacts)
    assert shares["tissue"] > 0.95 and sum(shares.values()) == 1.0


def test_the_shipped_model_looks_at_tissue_and_leaves_no_hooks_behind():
    model, _ = load_model(model_folder("density"))
    layer = model.get_submodule("image_encoder.layer4")
    views = [v for patient in generate(2, 31, size=224) for v in patient]
    explanations = [explain(model, v.image) for v in views]
    assert not layer._forward_hooks and not layer._backward_hooks
    for view, explanation in zip(views, explanations, strict=True):
        assert explanation.cam.shape == view.image.shape
        assert 0.0 <= explanation.cam.min() and explanation.cam.max() <= 1.0 + 1e-6
        assert explanation.category == max(explanation.probabilities,
                                           key=explanation.probabilities.get)
    shares = [e.shares["tissue"] for e in explanations]
    assert np.mean(shares) > LOW_TISSUE_SHARE, shares
    assert sum(e.category == v.density for e, v in zip(explanations, views, strict=True)) >= 6
    assert Path(model_folder("density") / "model.pt").is_file()
