from __future__ import annotations

import numpy as np
import pytest
import torch

from radlens.models.cards import ModelError
from radlens.models.metrics import SegmentationMetrics, image_probabilities, image_scores
from radlens.models.networks import REGISTRY, build
from radlens.tasks.breast_us.datasets import load_cases
from radlens.tasks.breast_us.infer import Segmenter
from radlens.tasks.breast_us.phantoms import generate, write_dataset
from radlens.tasks.breast_us.train import TrainSettings, train_fold


@pytest.fixture(scope="module")
def tiny_phantoms(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny")
    write_dataset(folder, generate(12, seed=2, size=64, mix=(0.2, 0.4, 0.4)))
    return load_cases(folder)


@pytest.mark.parametrize("arch", sorted(REGISTRY))
def test_each_architecture_trains_with_falling_loss_and_exposes_features(arch, tiny_phantoms,
                                                                         tmp_path):
    settings = TrainSettings(arch=arch, epochs=2, batch_size=4, size=64, patience=10,
                             learning_rate=1e-3)
    result, model = train_fold(0, tiny_phantoms[:8], tiny_phantoms[8:], settings, tmp_path)
    losses = [record.train_loss for record in result.history]
    assert len(losses) == 2 and losses[1] < losses[0], losses
    assert (tmp_path / "fold0" / "curves.png").stat().st_size > 1000
    logits, features = model.eval().forward_with_features(torch.zeros(2, 1, 64, 64))
    assert logits.shape == (2, 3, 64, 64)
    assert len(features) >= 3
    assert all(f.shape[0] == 2 for f in features)
    sizes = [f.shape[-1] for f in features]
    assert sizes == sorted(sizes, reverse=True) and sizes[-1] < 64  # shallow to deep


def test_metrics_hand_computed_cases():
    reference = torch.zeros(1, 10, 10, dtype=torch.long)
    reference[0, 0:4, 0:5] = 2  # 20 malignant pixels
    metrics = SegmentationMetrics()
    metrics.update(reference.clone(), reference)  # perfect
    assert metrics.aggregate()["malignant"]["dice"] == 1.0
    half = torch.zeros_like(reference)
    half[0, 0:2, 0:5] = 2  # predicts 10 of the 20
    metrics = SegmentationMetrics()
    metrics.update(half, reference)
    table = metrics.aggregate()
    assert table["malignant"]["iou"] == pytest.approx(0.5)
    assert table["malignant"]["dice"] == pytest.approx(2 / 3)
    assert table["malignant"]["recall"] == pytest.approx(0.5)
    assert table["malignant"]["precision"] == pytest.approx(1.0)
    assert table["malignant"]["pixel_accuracy"] == pytest.approx(0.9)
    assert table["benign"]["dice"] is None  # absent in both: says nothing
    assert table["lesion"]["dice"] == pytest.approx(2 / 3)
    metrics = SegmentationMetrics()
    metrics.update(torch.zeros_like(reference), reference)  # empty prediction
    assert metrics.aggregate()["malignant"]["dice"] == 0.0
    assert metrics.aggregate()["malignant"]["precision"] == 0.0


def test_image_probabilities_and_scores():
    probs = torch.zeros(2, 3, 16, 16)
    probs[:, 0] = 1.0
    probs[1, 0, 4:8, 4:8], probs[1, 2, 4:8, 4:8] = 0.1, 0.9  # a malignant lesion
    image = image_probabilities(probs, top_k=16)
    assert torch.allclose(image.sum(1), torch.ones(2))
    assert image[0].argmax() == 0 and image[1].argmax() == 2
    scores = image_scores(np.array([0, 2]), image.numpy())
    assert scores.accuracy == 1.0


@pytest.fixture(scope="module")
def segmenter() -> Segmenter:
    return Segmenter("default", device="cpu")


@pytest.mark.parametrize("shape", [(173, 211), (64, 300), (257, 255, 3), (100, 90, 1)])
def test_inference_round_trips_odd_sizes_and_colour(segmenter, shape):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, shape).astype(np.uint8)
    (prediction,) = segmenter.predict([image])
    assert prediction.probabilities.shape == (3, *shape[:2])
    assert np.allclose(prediction.probabilities.sum(0), 1, atol=1e-4)
    assert prediction.image_probabilities.shape == (3,)
    assert prediction.image_probabilities.sum() == pytest.approx(1, abs=1e-5)
    assert prediction.latent.ndim == 1 and prediction.latent.size >= 64
    assert prediction.classes.shape == shape[:2]


def test_batched_inference_matches_one_by_one(segmenter):
    rng = np.random.default_rng(1)
    images = [rng.integers(0, 255, (120, 160)).astype(np.uint8) for _ in range(3)]
    together = segmenter.predict(images)
    alone = [segmenter.predict([image])[0] for image in images]
    for a, b in zip(together, alone, strict=True):
        assert np.allclose(a.probabilities, b.probabilities, atol=1e-4)


def test_bad_model_folders_are_clear_errors(tmp_path):
    with pytest.raises(ModelError, match="no model folder"):
        Segmenter(tmp_path / "absent")
    (tmp_path / "card.json").write_text('{"architecture": "unet", "input_size": [64, 64]}')
    torch.save(build("segresnet").state_dict(), tmp_path / "model.pt")
    with pytest.raises(ModelError, match="weights do not fit unet"):
        Segmenter(tmp_path)


def test_same_seed_trains_the_same_weights(tiny_phantoms, tmp_path):
    settings = TrainSettings(arch="unet", epochs=1, batch_size=4, size=64)
    _, first = train_fold(0, tiny_phantoms[:8], tiny_phantoms[8:], settings, tmp_path / "a")
    _, second = train_fold(0, tiny_phantoms[:8], tiny_phantoms[8:], settings, tmp_path / "b")
    _, other = train_fold(0, tiny_phantoms[:8], tiny_phantoms[8:],
                          TrainSettings(arch="unet", epochs=1, batch_size=4, size=64, seed=1),
                          tmp_path / "c")
    a, b, c = first.state_dict(), second.state_dict(), other.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_a_pinned_version_must_match_the_card():
    card_version = Segmenter("default", device="cpu").version
    assert Segmenter("default", version=card_version, device="cpu").version == card_version
    with pytest.raises(ModelError, match="not the pinned '1999.01.01'"):
        Segmenter("default", version="1999.01.01", device="cpu")
