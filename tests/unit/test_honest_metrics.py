"""Figures that do not flatter: the average leaves the background out, lesion detection counts
false positives on normal images, every headline figure has a bootstrap interval, and the test
set is held out by patient before anything is trained or chosen."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from radlens.models.folds import split_with_test
from radlens.models.metrics import (
    Predictions,
    SegmentationMetrics,
    bootstrap_intervals,
    detect_lesions,
    evaluation_report,
    markdown_table,
)


def test_the_average_leaves_the_background_out():
    reference = torch.zeros(1, 20, 20, dtype=torch.long)
    reference[0, 0:4, 0:5] = 2  # 20 malignant pixels
    predicted = torch.zeros_like(reference)
    predicted[0, 0:2, 0:5] = 2  # half of them
    metrics = SegmentationMetrics()
    metrics.update(predicted, reference)
    table = metrics.aggregate()
    assert table["background"]["dice"] > 0.97
    assert table["average"]["dice"] == pytest.approx(2 / 3)  # malignant only: benign absent


def _disc(mask: np.ndarray, centre: tuple[int, int], radius: int) -> None:
    rows, columns = np.ogrid[:mask.shape[0], :mask.shape[1]]
    mask[(rows - centre[0]) ** 2 + (columns - centre[1]) ** 2 <= radius ** 2] = True


def test_detection_counts_found_and_missed_lesions_and_false_positives_on_normal_images():
    reference = np.zeros((64, 64), bool)
    _disc(reference, (15, 15), 6)
    _disc(reference, (45, 45), 6)
    predicted = np.zeros((64, 64), bool)
    _disc(predicted, (16, 15), 6)  # finds the first
    _disc(predicted, (15, 50), 4)  # a false positive beside a real lesion
    assert detect_lesions(predicted, reference) == (2, 1, 0)
    normal = np.zeros((64, 64), bool)
    noise = np.zeros((64, 64), bool)
    _disc(noise, (30, 30), 5)  # a lesion-sized blob
    noise[2, 2:5] = True  # 3 pixels: noise, not a lesion
    assert detect_lesions(noise, normal) == (0, 0, 1)


def test_a_report_has_detection_and_intervals_around_its_figures():
    rng = np.random.default_rng(0)
    metrics = SegmentationMetrics()
    labels = []
    for index in range(30):
        reference = torch.zeros(1, 32, 32, dtype=torch.long)
        predicted = torch.zeros_like(reference)
        label = index % 3
        if label:
            reference[0, 8:20, 8:20] = label
            shift = int(rng.integers(0, 5))
            predicted[0, 8 + shift:20 + shift, 8:20] = label
        elif index % 2:
            predicted[0, 2:8, 2:8] = 1  # a false positive on a normal image
        metrics.update(predicted, reference)
        labels.append(label)
    labels_array = np.array(labels)
    probabilities = np.eye(3)[labels_array] * 0.7 + 0.1
    predictions = Predictions(metrics.aggregate(), labels_array, probabilities,
                              rng.normal(size=(30, 4)), metrics)
    report = evaluation_report(predictions, seed=0)
    detection = report["detection"]
    assert detection["lesions"] == 20 and detection["normal_images"] == 10
    assert detection["fp_per_normal_image"] == pytest.approx(0.5)
    intervals = report["intervals"]
    for name, point in (("lesion_dice", report["segmentation"]["lesion"]["dice"]),
                        ("average_dice", report["segmentation"]["average"]["dice"]),
                        ("fp_per_normal_image", 0.5)):
        low, high = intervals[name]
        assert low <= point <= high and low < high, name
    assert intervals == bootstrap_intervals(predictions, seed=0)  # seeded
    table = markdown_table(report)
    assert "average (lesion classes)" in table and "95 % CI" in table
    assert "false positives per normal image 0.500" in table


def test_the_test_set_is_held_out_by_patient_before_the_folds():
    labels = ["normal", "benign", "malignant"] * 20
    patients = [f"P{i // 2}" for i in range(60)]  # two images a patient
    split = split_with_test(labels, patients, test_fraction=0.2, folds=3, val_fraction=0.2,
                            seed=1)
    test_patients = {patients[i] for i in split.test}
    assert 10 <= len(split.test) <= 14 and len(split.folds) == 3
    for train, val in split.folds:
        assert not {patients[i] for i in train} & {patients[i] for i in val}
        assert not ({patients[i] for i in train} | {patients[i] for i in val}) & test_patients
        assert sorted(train + val + split.test) == list(range(60))
    single = split_with_test(labels, patients, test_fraction=0.0, folds=0, val_fraction=0.25,
                             seed=1)
    assert single.test == [] and len(single.folds) == 1
    with pytest.raises(ValueError, match="patients cannot make"):
        split_with_test(labels[:4], ["A", "A", "B", "B"], test_fraction=0.2, folds=0,
                        val_fraction=0.2, seed=0)


def test_temperature_scaling_calibrates_an_overconfident_model_and_keeps_its_classes(tmp_path):
    from radlens.models.calibration import (
        apply_temperature,
        fit_temperature,
        measure,
        reliability_diagram,
    )

    rng = np.random.default_rng(3)
    n = 2000
    labels = rng.integers(0, 3, n)
    # A model right 70 % of the time that says 0.97 every time: overconfident.
    predicted = np.where(rng.random(n) < 0.7, labels, (labels + rng.integers(1, 3, n)) % 3)
    probabilities = np.full((n, 3), 0.015)
    probabilities[np.arange(n), predicted] = 0.97
    before = measure(probabilities, labels)
    assert before.ece == pytest.approx(0.27, abs=0.03)
    temperature = fit_temperature(probabilities, labels)
    calibrated = apply_temperature(probabilities, temperature)
    after = measure(calibrated, labels)
    assert temperature > 1.5 and after.ece < 0.03 and after.brier < before.brier
    assert np.array_equal(calibrated.argmax(1), probabilities.argmax(1))
    assert np.allclose(apply_temperature(probabilities, 1.0), probabilities)
    with pytest.raises(ValueError, match="positive"):
        apply_temperature(probabilities, 0.0)
    reliability_diagram({"as trained": (probabilities, labels), "calibrated": (calibrated,
                                                                               labels)},
                        tmp_path / "reliability.png", "test")
    assert (tmp_path / "reliability.png").stat().st_size > 5000


def test_the_bootstraps_auc_is_scikit_learns():
    from sklearn.metrics import roc_auc_score

    from radlens.models.metrics import rank_auc

    rng = np.random.default_rng(5)
    for _ in range(20):
        positives = rng.random(80) < 0.3
        scores = np.round(rng.random(80), 1)  # many ties
        assert rank_auc(positives, scores) == pytest.approx(roc_auc_score(positives, scores))
    assert rank_auc(np.zeros(5, bool), np.arange(5.0)) is None
