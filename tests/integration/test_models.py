"""The model commands end to end, and the shipped model held to its card."""

from __future__ import annotations

import json
import re

import pytest
import torch

from radlens.models.cards import model_folder, verify
from tests.helpers import radlens_cli

FRESH_SEED = 4242  # neither the training seed nor the card's measurement seed


@pytest.mark.slow
def test_shipped_model_meets_its_card(tmp_path):
    card = json.loads((model_folder("default") / "card.json").read_text())
    assert "not for diagnostic use" in card["intended_use"].lower()
    assert (model_folder("default") / "model.pt").stat().st_size <= 20 * 2**20
    acceptance = card["acceptance"]
    made = radlens_cli("phantoms", "--out", str(tmp_path / "fresh"), "--n", "300", "--seed",
                       str(FRESH_SEED))
    assert made.returncode == 0, made.stderr
    result = radlens_cli("evaluate", "--data", str(tmp_path / "fresh"), "--out",
                         str(tmp_path / "eval"), "--device", "cpu", timeout=600)
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    lesion_dice = report["segmentation"]["lesion"]["dice"]
    accuracy = report["image_level"]["from_segmentation"]["accuracy"]
    assert lesion_dice >= acceptance["lesion_dice_min"], report["segmentation"]
    assert accuracy >= acceptance["image_accuracy_min"], report["image_level"]
    assert report["model"]["name"] == card["name"]
    assert "| malignant |" in (tmp_path / "eval" / "report.md").read_text()


def test_train_command_writes_a_usable_weights_folder(tmp_path):
    assert radlens_cli("phantoms", "--out", str(tmp_path / "data"), "--n", "24", "--seed", "9",
                       "--size", "64").returncode == 0
    out = tmp_path / "model"
    trained = radlens_cli("train", "--data", str(tmp_path / "data"), "--out", str(out),
                          "--arch", "segresnet", "--epochs", "2", "--folds", "2", "--size",
                          "64", "--batch-size", "4", "--device", "cpu")
    assert trained.returncode == 0, trained.stderr
    assert "trained segresnet on 24 cases" in trained.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    assert len(metrics["folds"]) == 2
    assert metrics["settings"]["t_max"] == 100 and metrics["settings"]["eta_min"] == 1e-6
    assert metrics["summary"]["lesion_dice"]["std"] is not None
    for fold in (0, 1):
        assert (out / f"fold{fold}" / "curves.png").is_file()
    card = json.loads((out / "card.json").read_text())
    assert card["architecture"] == "segresnet"
    assert card["training"]["command"].startswith("radlens train --data")
    evaluated = radlens_cli("evaluate", "--data", str(tmp_path / "data"), "--model", str(out),
                            "--out", str(tmp_path / "eval"), "--device", "cpu")
    assert evaluated.returncode == 0, evaluated.stderr
    assert "linear probe on latents" in evaluated.stdout

    # The card reproduces the model: the split by case ID, the seed, the environment, and a
    # version and hashes that belong to these weights only.
    split = json.loads((out / "split.json").read_text())
    cases = sorted(p.stem for p in (tmp_path / "data" / "images").glob("*.png"))
    assert split["seed"] == 0 and split["selected_fold"] == metrics["selected_fold"]
    assert sorted([c for fold in split["folds"] for c in fold["validation"]]
                  + split["test"]) == cases
    assert 3 <= len(split["test"]) <= 7  # about a fifth, held out first
    for fold in split["folds"]:
        assert not set(fold["train"]) & set(fold["validation"])
        assert not (set(fold["train"]) | set(fold["validation"])) & set(split["test"])
    # The test set is reported with intervals and lesion detection; nothing was chosen on it.
    test = metrics["test"]
    assert test["images"] == len(split["test"]) == card["test"]["images"]
    assert {"lesions", "sensitivity", "fp_per_normal_image"} <= set(test["detection"])
    assert "Test (held out" in (out / "card.md").read_text()
    assert "test (" in trained.stdout and "held-out images" in trained.stdout
    # Calibration fitted on validation, measured on test, stated by the agent.
    assert card["calibration"]["temperature"] > 0 and (out / "reliability.png").is_file()
    assert {"before", "after"} <= set(test["calibration"])
    assert "## Calibration" in (out / "card.md").read_text()
    assert "Calibration of the image probabilities" in evaluated.stdout
    assert (tmp_path / "eval" / "reliability.png").is_file()
    assert re.fullmatch(r"\d{4}\.\d{2}\.\d{2}-[0-9a-f]{8}", card["version"]), card["version"]
    provenance = card["provenance"]
    assert set(provenance["sha256"]) == {"model.pt", "ood.npz"}
    assert provenance["environment"]["libraries"]["torch"] == torch.__version__
    assert provenance["split"] == "split.json" and provenance["seed"] == 0
    assert provenance["command"].startswith("radlens train")
    assert "## Provenance" in (out / "card.md").read_text()
    state = torch.load(out / "model.pt", weights_only=True)  # loads with no GPU
    assert all(tensor.device.type == "cpu" for tensor in state.values())

    assert verify(out) == []
    exported = radlens_cli("export", "--model", str(out), "--out", str(tmp_path / "model.ts"))
    assert exported.returncode == 0, exported.stderr
    extra = {"card.json": ""}
    network = torch.jit.load(str(tmp_path / "model.ts"), _extra_files=extra)
    assert network(torch.zeros(1, 1, 64, 64)).shape == (1, 3, 64, 64)
    assert json.loads(extra["card.json"])["version"] == card["version"]
    with open(out / "ood.npz", "ab") as handle:
        handle.write(b"\0")
    tampered = radlens_cli("models", "verify", str(out))
    assert tampered.returncode == 1 and "ood.npz differs from the card" in tampered.stderr


def test_compare_trains_architectures_side_by_side(tmp_path):
    assert radlens_cli("phantoms", "--out", str(tmp_path / "data"), "--n", "16", "--seed", "3",
                       "--size", "64").returncode == 0
    result = radlens_cli("evaluate", "--data", str(tmp_path / "data"), "--out",
                         str(tmp_path / "cmp"), "--compare", "unet,deeplabv3", "--epochs", "1",
                         "--device", "cpu")
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "cmp" / "report.json").read_text())
    assert list(report["architectures"]) == ["unet", "deeplabv3"]
    table = (tmp_path / "cmp" / "report.md").read_text()
    assert "| unet |" in table and "| deeplabv3 |" in table


def test_models_command_lists_architectures_and_the_shipped_model():
    result = radlens_cli("models")
    assert result.returncode == 0, result.stderr
    for name in ("unet", "attention_unet", "segresnet", "deeplabv3"):
        assert name in result.stdout
    assert "shipped: default = radlens-unet-phantom" in result.stdout


def test_unknown_architecture_is_a_usage_error(tmp_path):
    result = radlens_cli("train", "--data", str(tmp_path), "--out", str(tmp_path / "o"),
                         "--arch", "resnet9000")
    assert result.returncode == 2
    assert "unknown architecture 'resnet9000'" in result.stderr


def test_cohort_command_reproduces_the_published_tables(tmp_path):
    assert radlens_cli("phantoms", "--out", str(tmp_path / "data"), "--n", "60", "--seed",
                       "56").returncode == 0
    result = radlens_cli("cohort", "--data", str(tmp_path / "data"), "--out",
                         str(tmp_path / "cohort"), "--device", "cpu")
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "cohort" / "cohort.json").read_text())
    assert [row["algorithm"] for row in report["clustering"]] == [
        "kmeans", "agglomerative", "spectral", "gmm", "birch", "dbscan", "optics", "meanshift",
        "affinity_propagation"]
    for picture in ("tsne_classes.png", "tsne_clusters.png"):
        assert (tmp_path / "cohort" / picture).stat().st_size > 5000
    per_class = {row["group"]: row for row in report["per_class"]}
    assert set(per_class) == {"normal", "benign", "malignant"}
    assert per_class["normal"]["lesions"] == 0
    assert per_class["benign"]["compactness"] > per_class["malignant"]["compactness"]
    assert per_class["benign"]["edge_sharpness"] > per_class["malignant"]["edge_sharpness"]
    assert per_class["benign"]["area_mm2"] > 0
    clusters = report["per_cluster"]
    assert sum(row["samples"] for row in clusters) == 60
    for row in clusters:
        assert sum(row["class_percent"].values()) == pytest.approx(100)
    assert report["linear_probe"]["accuracy"] > 0.6
    assert "| malignant |" in result.stdout and "Per cluster" in result.stdout
