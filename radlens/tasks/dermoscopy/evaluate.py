"""Evaluating the dermoscopy model the way the agent runs it (coarse mask, refinement, ABC
features, classifier, temperature), in the published tables' terms and the failure
signatures the published work names.

Reported: accuracy, AUC and the sensitivity at specificity 0.80 of the melanoma probability
as stated (95 % bootstrap intervals, cases resampled), the confusion matrix at 0.5; coarse
and refined mask Dice and IoU, by class and on the images with each confounder, and how
often the refinement was kept; the accuracy on each confounder's images beside the whole;
the cosine similarities of positive pairs (an image and its own features) and negative pairs
(an image and another's), with their histogram (``alignment.png``: positives that stay
scattered mean the alignment failed); the precision at 3 of the retrieved visual
descriptors against the folder's stated ones; the calibration (ECE, Brier,
``reliability.png``).
scikit-learn gives the ROC curve and AUC.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from radlens.tasks.dermoscopy.datasets import DermoscopyRecord, load_mask, load_rgb
from radlens.tasks.dermoscopy.model import DermoscopyModel

log = logging.getLogger(__name__)

SPECIFICITY = 0.80
CLASSES = ("nevus", "melanoma")


@dataclass(frozen=True)
class CaseResult:
    case_id: str
    target: int
    probability: float  # as stated
    probability_as_trained: float
    coarse_dice: float | None
    coarse_iou: float | None
    refined_dice: float | None
    refined_iou: float | None
    refinement_kept: bool
    confounders: tuple[str, ...]
    image_embedding: np.ndarray
    abc_embedding: np.ndarray | None
    retrieved: tuple[str, ...]  # the top three descriptors
    true_descriptors: tuple[str, ...]  # what the folder states (empty: nothing stated)


def _overlap(predicted: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    both = float((predicted & truth).sum())
    either = float((predicted | truth).sum())
    total = float(predicted.sum() + truth.sum())
    return (2 * both / total if total else 1.0), (both / either if either else 1.0)


def evaluate_records(model: DermoscopyModel, records: Sequence[DermoscopyRecord], *,
                     on_case: Callable[[int], None] | None = None) -> list[CaseResult]:
    """Every record through ``model.analyse``, one photograph in memory at a time."""
    results = []
    for number, record in enumerate(records, 1):
        image = load_rgb(record.image)
        analysis = model.analyse(image, record.spacing_mm)
        coarse = refined = (None, None)
        if record.mask is not None:
            truth = load_mask(record.mask)
            if truth.shape == image.shape[:2]:
                coarse = _overlap(analysis.coarse, truth)
                refined = _overlap(analysis.refined.mask, truth)
        results.append(CaseResult(
            case_id=record.case_id, target=record.target, probability=analysis.probability,
            probability_as_trained=analysis.probability_as_trained,
            coarse_dice=coarse[0], coarse_iou=coarse[1], refined_dice=refined[0],
            refined_iou=refined[1], refinement_kept=analysis.refined.kept,
            confounders=record.confounders, image_embedding=analysis.image_embedding,
            abc_embedding=analysis.abc_embedding, retrieved=tuple(analysis.descriptors),
            true_descriptors=record.descriptors))
        if on_case is not None:
            on_case(number)
    return results


def sensitivity_at_specificity(targets: np.ndarray, scores: np.ndarray,
                               specificity: float = SPECIFICITY) -> float | None:
    """The highest sensitivity of any threshold whose specificity is at least
    ``specificity`` (None without both classes)."""
    from sklearn.metrics import roc_curve

    if len(set(targets.tolist())) < 2:
        return None
    false_positive, true_positive, _ = roc_curve(targets, scores)
    allowed = false_positive <= 1.0 - specificity + 1e-12
    return float(true_positive[allowed].max()) if allowed.any() else 0.0


def _mean(values: Sequence[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return float(np.mean(kept)) if kept else None


def _segmentation(results: Sequence[CaseResult]) -> dict[str, Any]:
    return {"cases": sum(r.coarse_dice is not None for r in results),
            "coarse_dice": _mean([r.coarse_dice for r in results]),
            "coarse_iou": _mean([r.coarse_iou for r in results]),
            "refined_dice": _mean([r.refined_dice for r in results]),
            "refined_iou": _mean([r.refined_iou for r in results]),
            "refinement_kept": _mean([float(r.refinement_kept) for r in results])}


def _classification(targets: np.ndarray, probabilities: np.ndarray) -> dict[str, Any]:
    from sklearn.metrics import roc_auc_score

    predicted = (probabilities >= 0.5).astype(int)
    both = len(set(targets.tolist())) == 2
    confusion = [[int(((targets == t) & (predicted == p)).sum()) for p in (0, 1)]
                 for t in (0, 1)]
    return {"cases": int(len(targets)), "melanoma": int(targets.sum()),
            "accuracy": float((predicted == targets).mean()) if len(targets) else None,
            "auc": float(roc_auc_score(targets, probabilities)) if both else None,
            "sensitivity_at_specificity_0.80": sensitivity_at_specificity(targets,
                                                                          probabilities),
            "confusion": confusion}


def alignment_report(results: Sequence[CaseResult], diagram: Path | None) -> dict[str, Any]:
    """Positive and negative pair similarities (and their histogram at ``diagram``)."""
    paired = [r for r in results if r.abc_embedding is not None]
    if len(paired) < 2:
        return {"pairs": len(paired), "positive_median": None, "negative_median": None}
    images = np.stack([r.image_embedding for r in paired])
    features = np.stack([r.abc_embedding for r in paired])  # type: ignore[misc]
    similarity = images @ features.T
    diagonal = np.eye(len(paired), dtype=bool)
    positives, negatives = similarity[diagonal], similarity[~diagonal]
    if diagram is not None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        figure, axis = plt.subplots(figsize=(6, 3.6))
        bins = np.linspace(-1, 1, 41)
        axis.hist(negatives, bins=bins, density=True, alpha=0.6, label="negative pairs")
        axis.hist(positives, bins=bins, density=True, alpha=0.6, label="positive pairs")
        axis.set(xlabel="cosine similarity of image and ABC embeddings", ylabel="density",
                 title="image-feature alignment")
        axis.legend()
        figure.tight_layout()
        figure.savefig(diagram, dpi=110)
        plt.close(figure)
    return {"pairs": len(paired), "positive_median": float(np.median(positives)),
            "negative_median": float(np.median(negatives)),
            "positive_quartiles": [float(v) for v in np.quantile(positives, [0.25, 0.75])],
            "negative_quartiles": [float(v) for v in np.quantile(negatives, [0.25, 0.75])],
            "histogram": diagram.name if diagram is not None else None}


def descriptor_report(results: Sequence[CaseResult]) -> dict[str, Any]:
    """Precision at 3 of the retrieved descriptors against the stated ones, overall and by
    descriptor (how often retrieved, how often then true)."""
    from radlens.tasks.dermoscopy.descriptors import DESCRIPTORS, precision_at

    stated = [r for r in results if r.true_descriptors]
    per = {}
    for name in DESCRIPTORS:
        retrieved = [r for r in stated if name in r.retrieved]
        per[name] = {"true": sum(name in r.true_descriptors for r in stated),
                     "retrieved": len(retrieved),
                     "precision": (sum(name in r.true_descriptors for r in retrieved)
                                   / len(retrieved) if retrieved else None)}
    return {"cases": len(stated),
            "precision_at_3": (float(np.mean([precision_at(list(r.retrieved),
                                                           set(r.true_descriptors))
                                              for r in stated])) if stated else None),
            "by_descriptor": per}


def report(results: Sequence[CaseResult], out: Path, *, temperature: float, seed: int = 0
           ) -> dict[str, Any]:
    """Every figure of the module's docstring, with ``alignment.png`` and
    ``reliability.png`` in ``out``."""
    from radlens.models.calibration import as_trained_and_stated
    from radlens.models.metrics import classification_intervals

    out.mkdir(parents=True, exist_ok=True)
    targets = np.array([r.target for r in results], dtype=int)
    stated = np.array([r.probability for r in results])
    trained = np.array([r.probability_as_trained for r in results])
    whole = _classification(targets, stated)
    pairs = np.stack([1 - stated, stated], axis=1)
    intervals = classification_intervals(targets, pairs, CLASSES, seed)
    sensitivities = []
    rng = np.random.default_rng(seed)
    for _ in range(1000):
        chosen = rng.integers(0, len(targets), len(targets))
        value = sensitivity_at_specificity(targets[chosen], stated[chosen])
        if value is not None:
            sensitivities.append(value)
    whole["intervals"] = {
        "accuracy": intervals.get("accuracy"), "auc": intervals.get("auc_melanoma"),
        "sensitivity_at_specificity_0.80": (
            [float(np.quantile(sensitivities, 0.025)), float(np.quantile(sensitivities, 0.975))]
            if len(sensitivities) >= 500 else None)}
    confounders = sorted({name for r in results for name in r.confounders})
    by_confounder = {}
    for name in confounders:
        chosen = [i for i, r in enumerate(results) if name in r.confounders]
        subset = _classification(targets[chosen], stated[chosen])
        by_confounder[name] = {"cases": len(chosen), "accuracy": subset["accuracy"],
                               "segmentation": _segmentation([results[i] for i in chosen])}
    trained_calibration, stated_calibration = as_trained_and_stated(
        np.stack([1 - trained, trained], axis=1), targets, temperature,
        out / "reliability.png", "melanoma probability")
    return {
        "classification": whole,
        "segmentation": {"all": _segmentation(results),
                         **{name: _segmentation([r for r in results if r.target == index])
                            for index, name in enumerate(CLASSES)}},
        "confounders": by_confounder,
        "alignment": alignment_report(results, out / "alignment.png"),
        "descriptors": descriptor_report(results),
        "calibration": {"temperature": temperature,
                        "as_trained": trained_calibration.as_dict(),
                        "as_stated": (stated_calibration.as_dict()
                                      if stated_calibration is not None else None),
                        "diagram": "reliability.png"},
    }


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f} %"


def _interval(bounds: Sequence[float] | None) -> str:
    return "" if not bounds else f" ({100 * bounds[0]:.1f}-{100 * bounds[1]:.1f})"


def markdown(figures: dict[str, Any], title: str) -> str:
    c = figures["classification"]
    i = c["intervals"]
    auc = "n/a" if c["auc"] is None else f"{c['auc']:.3f}"
    auc_bounds = "" if not i.get("auc") else f" ({i['auc'][0]:.3f}-{i['auc'][1]:.3f})"
    lines = [f"## {title}", "",
             f"{c['cases']} images, {c['melanoma']} melanoma. In brackets, 95 % bootstrap "
             "intervals.", "",
             "| accuracy | AUC | sensitivity at specificity 0.80 |", "|---:|---:|---:|",
             f"| {_pct(c['accuracy'])}{_interval(i.get('accuracy'))} | {auc}{auc_bounds} | "
             f"{_pct(c['sensitivity_at_specificity_0.80'])}"
             f"{_interval(i.get('sensitivity_at_specificity_0.80'))} |", "",
             "Confusion matrix at 0.5 (rows: truth, columns: prediction):", "",
             "| truth \\ predicted | nevus | melanoma |", "|---|---:|---:|"]
    for name, row in zip(CLASSES, c["confusion"], strict=True):
        lines.append(f"| {name} | {row[0]} | {row[1]} |")
    lines += ["", "Lesion masks:", "",
              "| images | coarse Dice | coarse IoU | refined Dice | refined IoU | refinement "
              "kept |", "|---|---:|---:|---:|---:|---:|"]
    for key, segmentation in figures["segmentation"].items():
        lines.append(f"| {key} | {_pct(segmentation['coarse_dice'])} | "
                     f"{_pct(segmentation['coarse_iou'])} | {_pct(segmentation['refined_dice'])}"
                     f" | {_pct(segmentation['refined_iou'])} | "
                     f"{_pct(segmentation['refinement_kept'])} |")
    if figures["confounders"]:
        lines += ["", "On the images with each confounder:", "",
                  "| confounder | images | accuracy | refined Dice |", "|---|---:|---:|---:|"]
        for name, subset in figures["confounders"].items():
            lines.append(f"| {name} | {subset['cases']} | {_pct(subset['accuracy'])} | "
                         f"{_pct(subset['segmentation']['refined_dice'])} |")
    a = figures["alignment"]
    if a.get("positive_median") is not None:
        lines += ["", f"Alignment: median cosine similarity {a['positive_median']:.2f} for "
                  f"positive pairs (an image and its own features), "
                  f"{a['negative_median']:.2f} for negative pairs; histogram "
                  f"`{a['histogram']}`."]
    d = figures.get("descriptors") or {}
    if d.get("precision_at_3") is not None:
        lines += ["", f"Visual descriptors: precision at 3 of the retrieved descriptors "
                  f"{_pct(d['precision_at_3'])} against the {d['cases']} images' stated "
                  "ones.", "", "| descriptor | true of | retrieved for | then true |",
                  "|---|---:|---:|---:|"]
        for name, row in d["by_descriptor"].items():
            lines.append(f"| {name} | {row['true']} | {row['retrieved']} | "
                         f"{_pct(row['precision'])} |")
    cal = figures["calibration"]
    line = (f"Calibration of the melanoma probability: as trained, ECE "
            f"{cal['as_trained']['ece']:.3f}, Brier {cal['as_trained']['brier']:.3f}")
    if cal["as_stated"]:
        line += (f"; as stated (temperature {cal['temperature']:.2f}), ECE "
                 f"{cal['as_stated']['ece']:.3f}, Brier {cal['as_stated']['brier']:.3f}")
    lines += ["", line + f". Reliability diagram: `{cal['diagram']}`."]
    return "\n".join(lines) + "\n"


def write_report(figures: dict[str, Any], out: Path, title: str) -> Path:
    (out / "report.json").write_text(json.dumps(figures, indent=2) + "\n")
    path = out / "report.md"
    path.write_text(markdown(figures, title))
    return path
