"""``radlens train|evaluate --task dermoscopy`` end to end, small: phantoms in, a sealed
weights folder with its card (calibration, OOD threshold, split, held-out test and the
ablation without alignment) out, and an evaluation report in the published tables' terms.
The figures of so short a training mean nothing; what is asserted is that each is there and
consistent."""

from __future__ import annotations

import json
import shutil

from tests.helpers import radlens_cli


def test_train_and_evaluate_write_what_the_card_and_report_promise(tmp_path):
    data, model, report = tmp_path / "data", tmp_path / "model", tmp_path / "eval"
    made = radlens_cli("phantoms", "--task", "dermoscopy", "--out", str(data), "--n", "48",
                       "--size", "64", "--seed", "3")
    assert made.returncode == 0, made.stderr
    trained = radlens_cli("train", "--task", "dermoscopy", "--data", str(data), "--out",
                          str(model), "--epochs", "2", "--batch-size", "8", "--size", "32",
                          "--device", "cpu", "--ablation", timeout=300)
    assert trained.returncode == 0, trained.stderr
    assert "trained the dermoscopy model on 48 images" in trained.stdout
    assert "without alignment:" in trained.stdout
    card = json.loads((model / "card.json").read_text())
    assert card["task"] == "dermoscopy" and card["classes"] == ["nevus", "melanoma"]
    assert card["calibration"]["temperature"] > 0 and card["ood"]["threshold"] > 0
    assert card["provenance"]["split"] == "split.json" and (model / "split.json").is_file()
    assert set(card["features"]["cut_points"]) == {"asymmetry", "border", "colour",
                                                   "diameter_mm"}
    test = card["test"]["classification"]
    assert sum(map(sum, test["confusion"])) == test["cases"] > 0
    assert card["ablation"]["without_alignment"]["classification"]["cases"] == test["cases"]
    for name in ("model.pt", "ood.npz", "curves.png", "metrics.json", "test/report.md",
                 "test/alignment.png", "test/reliability.png"):
        assert (model / name).is_file(), name
    assert (model / "test" / "alignment.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert radlens_cli("models", "verify", str(model)).returncode == 0

    evaluated = radlens_cli("evaluate", "--task", "dermoscopy", "--data", str(data),
                            "--model", str(model), "--out", str(report), timeout=300)
    assert evaluated.returncode == 0, evaluated.stderr
    figures = json.loads((report / "report.json").read_text())
    assert figures["classification"]["cases"] == 48
    assert figures["segmentation"]["all"]["cases"] == 48
    assert set(figures["confounders"]) <= {"hair", "ruler", "ink", "bubbles", "specular",
                                           "vignette"}
    text = (report / "report.md").read_text()
    assert figures["descriptors"]["cases"] == 48
    assert 0.0 <= figures["descriptors"]["precision_at_3"] <= 1.0
    for part in ("sensitivity at specificity 0.80", "refined Dice", "positive pairs",
                 "precision at 3", "Calibration of the melanoma probability"):
        assert part in text, part


def test_a_folder_without_masks_is_refused_with_the_case_named(tmp_path):
    data = tmp_path / "data"
    assert radlens_cli("phantoms", "--task", "dermoscopy", "--out", str(data), "--n", "6",
                       "--size", "64").returncode == 0
    shutil.rmtree(data / "masks")
    trained = radlens_cli("train", "--task", "dermoscopy", "--data", str(data), "--out",
                          str(tmp_path / "model"), "--epochs", "1", "--device", "cpu")
    assert trained.returncode == 1
    assert "no mask of case" in trained.stderr and "D000" in trained.stderr
    assert not (tmp_path / "model" / "model.pt").exists()
