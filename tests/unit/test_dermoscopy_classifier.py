"""The classifier's parts: the NT-Xent alignment loss on embeddings with known answers, the
pair similarities its histogram shows, the ViT's tokens as a grid, one training epoch."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from radlens.tasks.dermoscopy.classifier import (
    ABC_FEATURES,
    ClassifierShape,
    CrossModalClassifier,
    nt_xent,
    pair_similarities,
    token_grid,
    train_classifier,
)


def test_nt_xent_of_perfectly_aligned_orthogonal_pairs_has_its_closed_form():
    batch, temperature = 4, 0.1
    aligned = torch.eye(batch)
    expected = math.log(1 + (batch - 1) * math.exp(-1 / temperature))
    assert nt_xent(aligned, aligned, temperature).item() == pytest.approx(expected, rel=1e-3)
    shuffled = aligned[[1, 0, 3, 2]]  # every image paired with another's features
    assert nt_xent(aligned, shuffled, temperature).item() > 5.0
    with pytest.raises(ValueError, match="batch of at least 2"):
        nt_xent(aligned[:1], aligned[:1], temperature)


def test_pair_similarities_split_the_diagonal_from_the_rest():
    image = F.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]), dim=-1)
    positives, negatives = pair_similarities(image, image)
    assert torch.allclose(positives, torch.ones(3))
    assert negatives.numel() == 6 and negatives.min().item() == pytest.approx(0.0, abs=1e-6)


def test_the_vit_gives_a_logit_embeddings_and_a_token_grid():
    shape = ClassifierShape(image_size=32, patch_size=8, hidden_size=32, mlp_dim=64,
                            num_layers=1, num_heads=2, embedding=8)
    network = CrossModalClassifier(shape)
    logits, feature = network(torch.rand(3, 3, 32, 32))
    assert logits.shape == (3,) and feature.shape == (3, 32)
    z_v = network.image_embedding(feature)
    z_c = network.abc_embedding(torch.rand(3, ABC_FEATURES))
    assert torch.allclose(z_v.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert torch.allclose(z_c.norm(dim=-1), torch.ones(3), atol=1e-5)
    similarity = network.descriptor_similarity(feature)
    assert similarity.shape == (3, 13) and similarity.abs().max() <= 1.0 + 1e-5
    assert network.descriptor_logits(feature).shape == (3, 13)
    grid = token_grid(network.tokens(torch.rand(2, 3, 32, 32)), shape.grid)
    assert grid.shape == (2, 32, 4, 4)
    with pytest.raises(ValueError, match="do not make"):
        token_grid(torch.rand(1, 15, 32), 4)


def test_a_frozen_encoder_stays_as_it_was_and_the_heads_train():
    shape = ClassifierShape(image_size=32, patch_size=8, hidden_size=32, mlp_dim=64,
                            num_layers=1, num_heads=2, embedding=8)
    torch.manual_seed(0)
    images = (torch.rand(12, 3, 32, 32) * 255).byte()
    abc = torch.randn(12, ABC_FEATURES)
    targets = torch.tensor([0, 1] * 6)
    descriptors = (torch.rand(12, 13) > 0.5).float()
    descriptors[3] = -1  # a case whose folder states no descriptors
    network, history, best = train_classifier(
        images, abc, targets, list(range(8)), list(range(8, 12)), shape=shape, epochs=2,
        batch_size=4, learning_rate=1e-3, patience=2, alignment_weight=1.0,
        freeze_encoder=True, seed=0, device="cpu", descriptors=descriptors)
    torch.manual_seed(0)  # as training seeds it: the encoder it started from
    reference = CrossModalClassifier(shape)
    encoder_same = all(torch.equal(a, b) for a, b in zip(
        network.encoder.state_dict().values(), reference.encoder.state_dict().values(),
        strict=True))
    assert encoder_same
    assert len(history) == 2 and history[0].val_alignment_loss is not None
    assert history[0].val_descriptor_loss is not None
    assert not any(p.requires_grad for p in network.encoder.parameters())


def test_retrieval_keeps_one_of_each_pair_and_precision_counts_the_true_ones():
    from radlens.tasks.dermoscopy.descriptors import precision_at, ranked

    scores = {"symmetric shape": 0.9, "asymmetric shape": 0.95, "streaks": 0.2,
              "regular border": 0.8, "irregular border": 0.1, "blue-gray areas": 0.7}
    top = ranked(scores)
    assert top == ["asymmetric shape", "regular border", "blue-gray areas"]
    assert precision_at(top, {"asymmetric shape", "irregular border"}) == pytest.approx(1 / 3)
    assert precision_at([], {"streaks"}) == 0.0


def test_confounder_painting_marks_about_its_share_of_photographs_and_repeats():
    from radlens.tasks.dermoscopy.augment import paint_confounders

    images = torch.full((200, 3, 64, 64), 0.8)  # pale skin, nothing on it
    painted = paint_confounders(torch.Generator().manual_seed(3), images, 0.2)
    changed = (painted - images).abs().flatten(1).amax(dim=1) > 0.05
    # an image is painted when ink or hair is drawn for it: 1 - 0.8 ** 2 = 0.36 expected
    assert 0.25 < float(changed.float().mean()) < 0.47
    assert torch.equal(images, torch.full((200, 3, 64, 64), 0.8))  # the input is kept
    again = paint_confounders(torch.Generator().manual_seed(3), images, 0.2)
    assert torch.equal(painted, again)
    # ink is purple (blue above red above green), hair dark: neither is the skin's colour
    marks = painted[changed].permute(0, 2, 3, 1).reshape(-1, 3)
    marks = marks[(marks - 0.8).abs().amax(dim=1) > 0.3]
    purple = (marks[:, 2] > marks[:, 0]) & (marks[:, 0] > marks[:, 1])
    dark = marks.amax(dim=1) < 0.3
    assert bool((purple | dark).all()) and bool(purple.any()) and bool(dark.any())
    assert paint_confounders(torch.Generator(), images, 0.0) is images
