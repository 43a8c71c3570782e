"""The breast density model: preparation, the weighted contrastive loss, seeded training, the
evaluation table, through ``radlens train --task density`` and ``radlens evaluate``."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from scipy import ndimage

from radlens.tasks.mammo_density.model import (
    DESCRIPTIONS,
    DensityCLIP,
    Vocabulary,
    breast_region,
    class_weights,
    prepare,
    weighted_contrastive_loss,
)
from radlens.tasks.mammo_density.phantoms import ARTIFACT, PECTORAL, TISSUE, generate
from radlens.tasks.mammo_density.train import (
    DensityTrainSettings,
    balanced_epoch,
    density_metrics,
    load_model,
    patient_folds,
    run_density_training,
)
from tests.helpers import radlens_cli


def test_prepare_drops_markers_crops_to_the_breast_and_puts_the_chest_wall_left():
    views = [v for patient in generate(6, 4, size=192) for v in patient
             if set(v.confounders) <= {"marker", "text"}]
    assert {v.laterality for v in views} == {"L", "R"}
    for view in views:
        breast = np.isin(view.regions, [TISSUE, PECTORAL])
        apart = (view.regions == ARTIFACT) & ~ndimage.binary_dilation(breast, iterations=3)
        assert apart.any()
        region = breast_region(view.image)
        assert not (region & apart).any()  # burned-in text and markers are left out
        assert (region & breast).sum() > 0.95 * breast.sum()
        prepared = prepare(view.image, 96)
        assert prepared.pixels.shape == (96, 96) and prepared.pixels.dtype == np.float32
        assert prepared.flipped == (view.laterality == "R")
        columns = prepared.pixels.mean(axis=0)
        assert columns[:10].mean() > columns[-10:].mean()  # tissue against the left edge


def test_weighted_contrastive_loss_weights_the_rare_category():
    weights = class_weights([0, 1, 1, 1, 1, 1, 1, 2, 2, 3])
    assert weights[3] > weights[2] > weights[1]  # the rarer, the heavier
    assert float(weights.mean()) == pytest.approx(1.0)
    labels = torch.tensor([1, 1, 1, 3])
    right = torch.full((4, 4), -5.0)
    right[torch.arange(4), labels] = 5.0
    wrong_on_rare = right.clone()
    wrong_on_rare[3] = torch.tensor([-5.0, -5.0, 5.0, -5.0])
    wrong_on_common = right.clone()
    wrong_on_common[0] = torch.tensor([-5.0, -5.0, 5.0, -5.0])
    assert weighted_contrastive_loss(right, labels, weights) < 0.1
    # one mistake costs more on a D than on a B when the classes are weighted
    assert weighted_contrastive_loss(wrong_on_rare, labels, weights) > \
        weighted_contrastive_loss(wrong_on_common, labels, weights)
    assert weighted_contrastive_loss(wrong_on_rare, labels, None) == pytest.approx(
        float(weighted_contrastive_loss(wrong_on_common, labels, None)), rel=0.35)


def test_undersampling_caps_the_majority_and_folds_keep_patients_together(tmp_path):
    labels = np.array([0] * 10 + [1] * 60 + [2] * 50 + [3] * 12)
    epoch = balanced_epoch(labels, np.random.default_rng(0), ratio=2.0)
    counts = np.bincount(labels[epoch], minlength=4)
    assert counts.tolist() == [10, 20, 20, 12]
    from radlens.tasks.mammo_density.train import DensityCase

    cases = [DensityCase(f"c{i}", f"p{i // 4}", int(labels[i]), tmp_path) for i in range(132)]
    for train, val in patient_folds(cases, 3, seed=1):
        assert not {cases[i].patient_id for i in train} & {cases[i].patient_id for i in val}


def test_the_model_scores_any_description_and_the_four_prompts():
    vocabulary = Vocabulary(list(DESCRIPTIONS.values()))
    model = DensityCLIP(vocabulary).eval()
    images = torch.rand(3, 1, 64, 64)
    assert model(images).shape == (3, 4)
    rephrased = vocabulary.encode(["extremely dense breasts", "fatty breasts"])
    assert model(images, rephrased).shape == (3, 2)
    assert vocabulary.encode(["entirely unknownword"])[0, 2] == vocabulary.index["<unk>"]


def test_metrics_count_adjacent_errors():
    labels = np.array([0, 1, 2, 3, 1, 2])
    probabilities = np.eye(4)[[0, 2, 2, 3, 1, 0]] * 0.9 + 0.025
    metrics = density_metrics(labels, probabilities)
    assert metrics["accuracy"] == pytest.approx(4 / 6)
    assert metrics["errors"] == 2 and metrics["adjacent_errors"] == 1
    assert metrics["confusion"][1] == [0, 1, 1, 0]


def test_training_is_seeded_and_the_cli_trains_and_evaluates(tmp_path):
    data = tmp_path / "data"
    made = radlens_cli("phantoms", "--task", "mammo_density", "--out", str(data), "--n", "12",
                       "--size", "96")
    assert made.returncode == 0, made.stderr
    settings = DensityTrainSettings(epochs=2, folds=2, size=64, batch_size=8, device="cpu")
    first = run_density_training(data, settings, tmp_path / "a")
    second = run_density_training(data, settings, tmp_path / "b")
    assert first["folds"] == second["folds"]
    a, _ = load_model(tmp_path / "a")
    b, card = load_model(tmp_path / "b")
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(x, y), name
    assert card["scope"]["modalities"] == ["MG"] and card["task"] == "density"
    assert (tmp_path / "a" / "ood.npz").is_file() and card["ood"]["threshold"] > 0
    assert card["ood"]["held_out"]["abstain_rate"] <= 0.1
    assert (tmp_path / "a" / "curves.png").stat().st_size > 1000
    # Seeded weights, the same hash; the card records it, and the split is saved.
    card_a = json.loads((tmp_path / "a" / "card.json").read_text())
    assert card_a["provenance"]["sha256"]["model.pt"] == card["provenance"]["sha256"]["model.pt"]
    assert set(card["provenance"]["sha256"]) == {"model.pt", "ood.npz"}
    split = json.loads((tmp_path / "a" / "split.json").read_text())
    assert len(split["folds"]) == 2 and split == json.loads((tmp_path / "b" /
                                                             "split.json").read_text())
    # A fifth of the patients held out first: the card's test figures, with intervals.
    assert split["test"] and card["test"]["cases"] == len(split["test"])
    low, high = card["test"]["intervals"]["accuracy"]
    assert low <= card["test"]["accuracy"] <= high
    # Temperature scaling fitted on validation; ECE and Brier on test, before and after.
    temperature = card["calibration"]["temperature"]
    assert 0.05 <= temperature <= 20 and card["calibration"]["fitted_on"].startswith("validation")
    tested = card["test"]["calibration"]
    assert tested["temperature"] == temperature and 0 <= tested["before"]["ece"] <= 1
    assert (tested["after"] is None) == (temperature == 1.0)
    assert (tmp_path / "a" / "reliability.png").stat().st_size > 1000
    from radlens.models.cards import verify

    assert verify(tmp_path / "a") == []

    trained = radlens_cli("train", "--task", "mammo_density", "--data", str(data), "--out",
                          str(tmp_path / "cli"), "--epochs", "1", "--folds", "2", "--size", "64",
                          "--device", "cpu", "--test", str(data), "--ablation", timeout=600)
    assert trained.returncode == 0, trained.stderr
    assert "trained the density model on 48 views of 12 patients" in trained.stdout
    assert "fresh cases: accuracy" in trained.stdout
    assert "without class weights: accuracy" in trained.stdout
    shipped_card = json.loads((tmp_path / "cli" / "card.json").read_text())
    assert shipped_card["test"]["cases"] == 48
    assert set(shipped_card["ablation"]["without_class_weights"]["auc"]) == set("ABCD")
    evaluated = radlens_cli("evaluate", "--task", "mammo_density", "--data", str(data), "--model",
                            str(tmp_path / "cli"), "--out", str(tmp_path / "report"),
                            "--device", "cpu", timeout=600)
    assert evaluated.returncode == 0, evaluated.stderr
    assert "Confusion matrix" in evaluated.stdout and "| D (" in evaluated.stdout
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert report["cases"] == 48 and sum(map(sum, report["confusion"])) == 48
    assert "Calibration of the category probabilities" in evaluated.stdout
    assert report["calibration"]["temperature"] == shipped_card["calibration"]["temperature"]
    assert report["intervals"]["accuracy"][0] <= report["accuracy"]
    assert (tmp_path / "report" / "reliability.png").is_file()
    missing = radlens_cli("evaluate", "--task", "mammo_density", "--data", str(data), "--model",
                          str(tmp_path / "nowhere"), "--out", str(tmp_path / "r2"))
    assert missing.returncode == 1 and "no model folder" in missing.stderr
    assert len(list(generate(1, 0, size=64))[0]) == 4


def test_shipped_density_model_meets_its_card_on_fresh_phantoms(tmp_path):
    """The shipped model (trained by radlens train --task density) on phantoms it never saw:
    accuracy >= 0.80 and every category's AUC >= 0.90, as its card states; <= 20 MB."""
    from radlens.models.cards import model_folder
    from radlens.tasks.mammo_density.phantoms import write_dataset
    from radlens.tasks.mammo_density.train import evaluate_density_folder

    folder = model_folder("density")
    assert sum(p.stat().st_size for p in folder.iterdir()) <= 20 * 2**20
    card = json.loads((folder / "card.json").read_text())
    assert card["task"] == "density" and card["scope"]["modalities"] == ["MG"]
    assert card["test"]["accuracy"] >= 0.80
    assert all(v >= 0.90 for v in card["test"]["auc"].values())
    assert "without_class_weights" in card["ablation"]
    write_dataset(tmp_path / "fresh", generate(30, 4242, size=256))
    metrics = evaluate_density_folder(tmp_path / "fresh", folder, tmp_path / "report",
                                      device="cpu")
    assert metrics["accuracy"] >= 0.80, metrics
    assert all(v is None or v >= 0.90 for v in metrics["auc"].values()), metrics["auc"]


def test_the_agent_states_the_calibrated_category_probabilities():
    """With a temperature in the card the agent states softmax(log p / T): the category (the
    arg-max) stays, a confident probability comes down for T > 1; without one, as given."""
    from radlens.config import DensitySettings
    from radlens.models.calibration import apply_temperature
    from radlens.models.cards import model_folder
    from radlens.tasks.mammo_density.analyser import DensityAnalyser

    card = json.loads((model_folder("density") / "card.json").read_text())
    given = {"A": 0.02, "B": 0.9, "C": 0.06, "D": 0.02}
    plain = DensityAnalyser(model=None, card={**card, "calibration": None}, ood=None,
                            settings=DensitySettings(), task=None)
    assert plain._stated(given) == given
    warm = DensityAnalyser(model=None, card={**card, "calibration": {"temperature": 2.0}},
                           ood=None, settings=DensitySettings(), task=None)
    stated = warm._stated(given)
    expected = apply_temperature(np.array([list(given.values())]), 2.0)[0]
    assert list(stated.values()) == pytest.approx(list(expected))
    assert max(stated, key=stated.get) == "B" and stated["B"] < 0.9
    assert sum(stated.values()) == pytest.approx(1.0)
