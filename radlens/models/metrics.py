"""Segmentation and image-level metrics, accumulated like MONAI's metric objects, and the
report in the published table's layout (with a linear probe on pooled encoder latents).

Pixel metrics are computed per image and class from MONAI's confusion counts, then averaged over
the images where the class is present in the reference or the prediction (an image with neither
says nothing about that class). At pixel level F1 equals Dice by definition; both are reported so
the table has the published layout.
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
            metric: _nanmean(np.array([table[c][metric] for c in CLASS_NAMES], dtype=float))
            for metric in PIXEL_METRICS
        }
        table["lesion"] = {"dice": _nanmean(np.array(self.lesion_dice, dtype=float)),
                           "images": float(len(self.lesion_dice))}
        return table


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
        metrics.update(probs.argmax(dim=1), batch["mask"][:, 0])
        probabilities.append(image_probabilities(probs).cpu().numpy())
        latents.append(pooled_latents(features).float().cpu().numpy())
        labels.append(batch["label"].numpy())
    return Predictions(metrics.aggregate(), np.concatenate(labels),
                       np.concatenate(probabilities), np.concatenate(latents))


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


def evaluation_report(predictions: Predictions, seed: int = 0) -> dict[str, Any]:
    from_segmentation = image_scores(predictions.labels, predictions.image_probabilities)
    return {
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
        lines.append(f"| {name} | " + " | ".join(_pct(row[m]) for m in PIXEL_METRICS) + " |")
    lesion = report["segmentation"]["lesion"]
    lines += ["", f"Lesion Dice (benign and malignant together, per image with a lesion): "
              f"{_pct(lesion['dice'])} % over {int(lesion['images'])} images", "",
              "| image-level | accuracy | AUC (one-vs-rest) | normal | benign | malignant |",
              "|---|---:|---:|---:|---:|---:|"]
    for source, scores in report["image_level"].items():
        per_class = scores.get("per_class_auc", {})
        lines.append(f"| {source.replace('_', ' ')} | {_pct(scores['accuracy'])} | "
                     f"{_pct(scores['auc_ovr'])} | " + " | ".join(
                         _pct(per_class.get(k)) for k in IMAGE_LABELS) + " |")
    return "\n".join(lines) + "\n"
