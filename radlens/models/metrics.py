"""Segmentation and image-level metrics, accumulated like MONAI's metric objects, and the
report in the published table's layout (with a linear probe on pooled encoder latents).

Pixel metrics are computed per image and class from MONAI's confusion counts, then averaged over
the images where the class is present in the reference or the prediction (an image with neither
says nothing about that class). At pixel level F1 equals Dice by definition; both are reported so
the table has the published layout. The "average" row averages the lesion classes only: the
background's Dice (near 1 on every image) would lift it while saying nothing of the lesions.

Beside the pixel figures, lesion detection: a reference lesion (a connected component) is found
when a predicted lesion of at least ``MIN_LESION_PIXELS`` overlaps it with an IoU of at least
``DETECTION_IOU``; every predicted lesion on an image without a reference lesion is a false
positive. Every headline figure comes with a 95 % bootstrap interval over images
(``bootstrap_intervals``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from monai.metrics import get_confusion_matrix
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, roc_auc_score
from sklearn.model_selection import StratifiedKFold, cross_val_predict
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from radlens.models.networks import (
    CLASS_NAMES,
    NUM_CLASSES,
    SegmentationNetwork,
    pooled_latents,
)

PIXEL_METRICS = ("iou", "dice", "pixel_accuracy", "precision", "recall", "f1")
IMAGE_LABELS = ("normal", "benign", "malignant")
LESION_CLASSES = CLASS_NAMES[1:]  # what the "average" row averages: not the background
DETECTION_IOU = 0.1  # a predicted lesion this close to a reference one finds it
MIN_LESION_PIXELS = 20  # as the agent's lesion finder: smaller regions are noise
BOOTSTRAP_RESAMPLES = 1000


def _one_hot(classes: torch.Tensor) -> torch.Tensor:
    """(B, H, W) class indices -> (B, C, H, W) one-hot."""
    return torch.nn.functional.one_hot(classes.long(), NUM_CLASSES).permute(0, 3, 1, 2).float()


def _ratio(numerator: np.ndarray, denominator: np.ndarray, when_empty: float) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denominator > 0, numerator / np.maximum(denominator, 1e-12), when_empty)


@dataclass
class SegmentationMetrics:
    """Accumulate (prediction, reference) class maps; ``aggregate`` gives the published table."""

    confusion: list[np.ndarray] = field(default_factory=list)  # each (B, C, 4): tp fp tn fn
    lesion_dice: list[float] = field(default_factory=list)  # per image with a reference lesion
    # per image: (reference lesions, of them found, predicted lesions on a normal image)
    detection: list[tuple[int, int, int]] = field(default_factory=list)
    detect: bool = True  # False: skip lesion detection (an epoch's validation needs no more)

    def update(self, predicted: torch.Tensor, reference: torch.Tensor) -> None:
        predicted, reference = predicted.detach().cpu(), reference.detach().cpu()
        if predicted.ndim == 4:
            predicted, reference = predicted[:, 0], reference[:, 0]
        counts = get_confusion_matrix(_one_hot(predicted), _one_hot(reference),
                                      include_background=True)
        self.confusion.append(counts.numpy())
        for pred, ref in zip(predicted > 0, reference > 0, strict=True):
            if ref.any():
                overlap = float((pred & ref).sum())
                self.lesion_dice.append(2 * overlap / float(pred.sum() + ref.sum()))
            if self.detect:
                self.detection.append(detect_lesions(pred.numpy(), ref.numpy()))

    def per_image(self) -> dict[str, np.ndarray]:
        """Each metric as an (images, classes) array, NaN where the class is absent in both."""
        counts = np.concatenate(self.confusion)
        tp, fp, tn, fn = (counts[..., i] for i in range(4))
        present = (tp + fp + fn) > 0
        precision = _ratio(tp, tp + fp, 0.0)
        recall = _ratio(tp, tp + fn, 0.0)
        values = {
            "iou": _ratio(tp, tp + fp + fn, np.nan),
            "dice": _ratio(2 * tp, 2 * tp + fp + fn, np.nan),
            "pixel_accuracy": (tp + tn) / (tp + fp + tn + fn),
            "precision": precision,
            "recall": recall,
            "f1": _ratio(2 * precision * recall, precision + recall, 0.0),
        }
        return {name: np.where(present, value, np.nan) for name, value in values.items()}

    def aggregate(self) -> dict[str, dict[str, float | None]]:
        """{class name or "average": {metric: mean over images}}; None where never present."""
        table: dict[str, dict[str, float | None]] = {}
        per_image = self.per_image()
        for index, name in enumerate(CLASS_NAMES):
            table[name] = {metric: _nanmean(values[:, index])
                           for metric, values in per_image.items()}
        table["average"] = {
            metric: _nanmean(np.array([table[c][metric] if table[c][metric] is not None
                                       else np.nan for c in LESION_CLASSES], dtype=float))
            for metric in PIXEL_METRICS
        }
        table["lesion"] = {"dice": _nanmean(np.array(self.lesion_dice, dtype=float)),
                           "images": float(len(self.lesion_dice))}
        return table

    def detection_summary(self) -> dict[str, float | int | None]:
        """Per-lesion sensitivity and false positives per normal image."""
        found = np.array(self.detection, dtype=float).reshape(-1, 3)
        lesions, detected = int(found[:, 0].sum()), int(found[:, 1].sum())
        normal = found[:, 0] == 0
        false_positives = int(found[normal, 2].sum())
        return {"lesions": lesions, "detected": detected,
                "sensitivity": detected / lesions if lesions else None,
                "normal_images": int(normal.sum()), "false_positives": false_positives,
                "fp_per_normal_image": (false_positives / int(normal.sum())
                                        if normal.any() else None),
                "iou_threshold": DETECTION_IOU, "min_lesion_pixels": MIN_LESION_PIXELS}


def detect_lesions(predicted: np.ndarray, reference: np.ndarray) -> tuple[int, int, int]:
    """(reference lesions, of them found, predicted lesions when the reference has none) of
    one image's lesion masks (any lesion class)."""
    from scipy import ndimage

    predicted_labels, predicted_count = ndimage.label(predicted)
    sizes = np.bincount(predicted_labels.ravel(), minlength=predicted_count + 1)
    kept = [i for i in range(1, predicted_count + 1) if sizes[i] >= MIN_LESION_PIXELS]
    reference_labels, reference_count = ndimage.label(reference)
    if reference_count == 0:
        return 0, 0, len(kept)
    # One pass over the pixels: the intersection of every (reference, predicted) pair.
    pairs = np.bincount(reference_labels.ravel() * (predicted_count + 1)
                        + predicted_labels.ravel(),
                        minlength=(reference_count + 1) * (predicted_count + 1)
                        ).reshape(reference_count + 1, predicted_count + 1)
    reference_sizes = pairs.sum(axis=1)
    candidates = np.array(kept, dtype=np.int64)
    found = 0
    for index in range(1, reference_count + 1):
        overlap = pairs[index, candidates]
        union = reference_sizes[index] + sizes[candidates] - overlap
        if np.any(overlap >= DETECTION_IOU * union):
            found += 1
    return reference_count, found, 0


def _nanmean(values: np.ndarray) -> float | None:
    values = np.asarray(values, dtype=float)
    values = values[~np.isnan(values)]
    return float(values.mean()) if values.size else None


def image_probabilities(probabilities: torch.Tensor, top_k: int = 64) -> torch.Tensor:
    """Normal / benign / malignant probabilities of whole images from segmentation probabilities.

    The evidence for a lesion class is the mean of its ``top_k`` most confident pixels, so a
    small lesion counts as much as a large one; P(normal) is what the stronger class leaves.
    """
    flat = probabilities[:, 1:].flatten(2)
    k = min(top_k, flat.shape[-1])
    evidence = flat.topk(k, dim=-1).values.mean(-1)  # (B, 2): benign, malignant
    lesion = evidence.max(dim=1).values
    share = evidence / evidence.sum(dim=1, keepdim=True).clamp_min(1e-8)
    return torch.cat([(1 - lesion)[:, None], lesion[:, None] * share], dim=1)


@dataclass(frozen=True)
class ImageScores:
    accuracy: float
    auc_ovr: float | None
    per_class_auc: dict[str, float | None]


def image_scores(labels: np.ndarray, probabilities: np.ndarray) -> ImageScores:
    """Accuracy of the arg-max and one-vs-rest AUC (None where a class has one outcome only)."""
    accuracy = float(accuracy_score(labels, probabilities.argmax(axis=1)))
    per_class: dict[str, float | None] = {}
    for index, name in enumerate(IMAGE_LABELS):
        positives = labels == index
        per_class[name] = (float(roc_auc_score(positives, probabilities[:, index]))
                           if 0 < positives.sum() < len(labels) else None)
    valid = [v for v in per_class.values() if v is not None]
    return ImageScores(accuracy, float(np.mean(valid)) if valid else None, per_class)


@dataclass
class Predictions:
    segmentation: dict[str, dict[str, float | None]]
    labels: np.ndarray  # (N,) 0 normal, 1 benign, 2 malignant
    image_probabilities: np.ndarray  # (N, 3)
    latents: np.ndarray  # (N, C) deepest encoder map, global-average pooled
    metrics: SegmentationMetrics | None = None  # the per-image counts, for the intervals


@torch.inference_mode()
def predict(model: SegmentationNetwork, loader: torch.utils.data.DataLoader,
            device: torch.device) -> Predictions:
    model.eval()
    metrics = SegmentationMetrics()
    labels, probabilities, latents = [], [], []
    for batch in loader:
        images = batch["image"].to(device)
        logits, features = model.forward_with_features(images)
        probs = logits.softmax(dim=1)
        # max's indices over the class channel: argmax over a leading dimension is ~15x slower
        # on the CPU; both give the first of equal values.
        metrics.update(probs.max(dim=1).indices, batch["mask"][:, 0])
        probabilities.append(image_probabilities(probs).cpu().numpy())
        latents.append(pooled_latents(features).float().cpu().numpy())
        labels.append(batch["label"].numpy())
    return Predictions(metrics.aggregate(), np.concatenate(labels),
                       np.concatenate(probabilities), np.concatenate(latents), metrics)


def linear_probe(latents: np.ndarray, labels: np.ndarray, seed: int = 0) -> dict[str, Any]:
    """Cross-validated logistic regression on latents alone: how well they separate classes."""
    counts = np.bincount(labels, minlength=3)
    folds = int(min(5, counts[counts > 0].min()))
    if folds < 2 or (counts > 0).sum() < 2:
        return {"accuracy": None, "auc_ovr": None, "per_class_auc": {}, "folds": 0}
    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=5000, C=0.5))
    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    proba = cross_val_predict(probe, latents, labels, cv=splitter, method="predict_proba")
    full = np.zeros((len(labels), 3))
    full[:, np.unique(labels)] = proba
    scores = image_scores(labels, full)
    return {**asdict(scores), "folds": folds}


def _percentile_intervals(samples: dict[str, list[float]], resamples: int
                          ) -> dict[str, list[float] | None]:
    """Each figure's 2.5th and 97.5th percentiles over the resamples that gave it; None when
    fewer than half did."""
    return {name: ([float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))]
                   if len(values) >= resamples / 2 else None)
            for name, values in samples.items()}


def rank_auc(positives: np.ndarray, scores: np.ndarray) -> float | None:
    """ROC AUC as the Mann-Whitney statistic on mid-ranks (ties count a half), equal to
    scikit-learn's ``roc_auc_score`` and fast enough to run a thousand times; None when one
    outcome is missing."""
    from scipy.stats import rankdata

    positives = np.asarray(positives, dtype=bool)
    n_pos = int(positives.sum())
    n_neg = len(positives) - n_pos
    if n_pos == 0 or n_neg == 0:
        return None
    ranks = rankdata(scores)
    return float((ranks[positives].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def bootstrap_intervals(predictions: Predictions, seed: int = 0,
                        resamples: int = BOOTSTRAP_RESAMPLES) -> dict[str, list[float] | None]:
    """95 % percentile intervals of the headline figures, resampling images with replacement
    (the images are the independent units; their pixels are not). Checked first: SciPy's
    ``stats.bootstrap`` resamples one statistic at a time; every figure here must come from
    the same resampled images, and AUC needs both outcomes in a resample, so the loop is
    written out. A figure that cannot be computed on a resample (no lesion drawn) is left out
    of that resample; None when fewer than half the resamples give it."""
    metrics = predictions.metrics
    if metrics is None or not metrics.confusion or not metrics.detect:
        return {}
    dice = metrics.per_image()["dice"]  # (N, classes)
    n = dice.shape[0]
    lesion_dice = np.full(n, np.nan)
    detection = np.array(metrics.detection, dtype=float).reshape(-1, 3)
    with_lesion = detection[:, 0] > 0
    lesion_dice[with_lesion] = np.asarray(metrics.lesion_dice, dtype=float)  # same order
    labels, probabilities = predictions.labels, predictions.image_probabilities
    rng = np.random.default_rng(seed)
    samples: dict[str, list[float]] = {}

    def keep(name: str, value: float | None) -> None:
        if value is not None and np.isfinite(value):
            samples.setdefault(name, []).append(float(value))

    for _ in range(resamples):
        chosen = rng.integers(0, n, n)
        for index in range(1, len(CLASS_NAMES)):
            keep(f"dice_{CLASS_NAMES[index]}", _nanmean(dice[chosen, index]))
        per_class = [_nanmean(dice[chosen, index]) for index in range(1, len(CLASS_NAMES))]
        present = [v for v in per_class if v is not None]
        keep("average_dice", float(np.mean(present)) if present else None)
        keep("lesion_dice", _nanmean(lesion_dice[chosen]))
        found = detection[chosen]
        lesions = found[:, 0].sum()
        keep("sensitivity", found[:, 1].sum() / lesions if lesions else None)
        normal = found[:, 0] == 0
        keep("fp_per_normal_image", found[normal, 2].mean() if normal.any() else None)
        truth, chosen_probabilities = labels[chosen], probabilities[chosen]
        keep("accuracy", float((chosen_probabilities.argmax(1) == truth).mean()))
        aucs = [auc for index in range(len(IMAGE_LABELS))
                if (auc := rank_auc(truth == index, chosen_probabilities[:, index])) is not None]
        keep("auc_ovr", float(np.mean(aucs)) if aucs else None)
    return _percentile_intervals(samples, resamples)


def classification_intervals(labels: np.ndarray, probabilities: np.ndarray,
                             class_names: tuple[str, ...], seed: int = 0,
                             resamples: int = BOOTSTRAP_RESAMPLES
                             ) -> dict[str, list[float] | None]:
    """95 % bootstrap intervals (cases resampled) of a classifier's accuracy, each class's
    one-vs-rest AUC and their mean; None where fewer than half the resamples hold both
    outcomes of a class."""
    rng = np.random.default_rng(seed)
    n = len(labels)
    samples: dict[str, list[float]] = {}
    for _ in range(resamples):
        chosen = rng.integers(0, n, n)
        truth, scores = labels[chosen], probabilities[chosen]
        samples.setdefault("accuracy", []).append(float((scores.argmax(1) == truth).mean()))
        aucs = []
        for index, name in enumerate(class_names):
            auc = rank_auc(truth == index, scores[:, index])
            if auc is not None:
                aucs.append(auc)
                samples.setdefault(f"auc_{name}", []).append(auc)
        if aucs:
            samples.setdefault("mean_auc", []).append(float(np.mean(aucs)))
    return _percentile_intervals(samples, resamples)


def evaluation_report(predictions: Predictions, seed: int = 0, *,
                      intervals: bool = True) -> dict[str, Any]:
    """The published table's figures, lesion detection and (``intervals``) the bootstrap
    intervals; a fold's validation report, used only to choose, leaves them out."""
    from_segmentation = image_scores(predictions.labels, predictions.image_probabilities)
    report = {
        "images": int(len(predictions.labels)),
        "class_counts": {name: int((predictions.labels == i).sum())
                         for i, name in enumerate(IMAGE_LABELS)},
        "segmentation": predictions.segmentation,
        "image_level": {
            "from_segmentation": asdict(from_segmentation),
            "linear_probe_on_latents": linear_probe(predictions.latents, predictions.labels,
                                                    seed),
        },
    }
    if predictions.metrics is not None and predictions.metrics.detect:
        report["detection"] = predictions.metrics.detection_summary()
        report["intervals"] = bootstrap_intervals(predictions, seed) if intervals else {}
    return report


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.2f}"


def markdown_table(report: dict[str, Any], title: str = "Evaluation") -> str:
    """The published layout: classes as rows, IoU / Dice / pixel accuracy / precision / recall /
    F1 as columns (percent), then the image-level results."""
    lines = [f"## {title}", "", f"{report['images']} images: " + ", ".join(
        f"{n} {k}" for k, n in report["class_counts"].items()), "",
        "| class | IoU | Dice | pixel accuracy | precision | recall | F1 |",
        "|---|---:|---:|---:|---:|---:|---:|"]
    for name in (*CLASS_NAMES, "average"):
        row = report["segmentation"][name]
        label = "average (lesion classes)" if name == "average" else name
        lines.append(f"| {label} | " + " | ".join(_pct(row[m]) for m in PIXEL_METRICS) + " |")
    lesion = report["segmentation"]["lesion"]
    intervals = report.get("intervals") or {}

    def ci(name: str) -> str:
        bounds = intervals.get(name)
        return f" (95 % CI {_pct(bounds[0])}-{_pct(bounds[1])})" if bounds else ""

    lines += ["", f"Lesion Dice (benign and malignant together, per image with a lesion): "
              f"{_pct(lesion['dice'])} %{ci('lesion_dice')} over {int(lesion['images'])} "
              "images"]
    if intervals:
        lines.append("Dice, 95 % bootstrap intervals over images: " + "; ".join(
            f"{name} {_pct(report['segmentation'][name]['dice'])}{ci('dice_' + name)}"
            for name in LESION_CLASSES)
            + f"; average {_pct(report['segmentation']['average']['dice'])}"
            f"{ci('average_dice')}")
    detection = report.get("detection")
    if detection:
        sensitivity = detection["sensitivity"]
        fp = detection["fp_per_normal_image"]
        lines.append(
            f"Lesion detection (IoU >= {detection['iou_threshold']}): sensitivity "
            f"{_pct(sensitivity)} %{ci('sensitivity')} ({detection['detected']} of "
            f"{detection['lesions']} lesions); false positives per normal image "
            f"{'n/a' if fp is None else f'{fp:.3f}'}"
            + (f" (95 % CI {intervals['fp_per_normal_image'][0]:.3f}-"
               f"{intervals['fp_per_normal_image'][1]:.3f})"
               if intervals.get("fp_per_normal_image") else "")
            + f" over {detection['normal_images']} normal images")
    lines += ["",
              "| image-level | accuracy | AUC (one-vs-rest) | normal | benign | malignant |",
              "|---|---:|---:|---:|---:|---:|"]
    for source, scores in report["image_level"].items():
        per_class = scores.get("per_class_auc", {})
        suffix = ("", "")
        if source == "from_segmentation":
            suffix = (ci("accuracy"), ci("auc_ovr"))
        lines.append(f"| {source.replace('_', ' ')} | {_pct(scores['accuracy'])}{suffix[0]} | "
                     f"{_pct(scores['auc_ovr'])}{suffix[1]} | " + " | ".join(
                         _pct(per_class.get(k)) for k in IMAGE_LABELS) + " |")
    return "\n".join(lines) + "\n"
