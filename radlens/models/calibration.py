"""Calibration, for every task: whether a model's probabilities mean what they say, and
temperature scaling to make them.

A score is not a probability until it is checked: of the images a model calls malignant with
probability 0.9, about 9 in 10 should be. The expected calibration error (ECE: the gap between
confidence and accuracy, averaged over equal-width confidence bins weighted by their images),
the Brier score and a reliability diagram measure it. Temperature scaling (Guo et al., 2017)
divides the log-probabilities by one number T fitted on validation images by minimising their
negative log-likelihood; it keeps every image's predicted class and only changes how sure the
model says it is. Checked first: scikit-learn's ``CalibratedClassifierCV`` wraps an estimator it
refits, and ``calibration_curve`` bins one class; torch minimises the one parameter directly.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

ECE_BINS = 15


@dataclass(frozen=True)
class Calibration:
    """How sure a model's probabilities may be taken to be, on one set of images."""

    ece: float
    brier: float
    images: int

    def as_dict(self) -> dict[str, float | int]:
        return {"ece": self.ece, "brier": self.brier, "images": self.images}


def card_temperature(card: Mapping[str, Any]) -> float:
    """The temperature a model card's ``calibration`` fitted; 1 (none) for cards without."""
    return float((card.get("calibration") or {}).get("temperature", 1.0))


def _log(probabilities: np.ndarray) -> np.ndarray:
    return np.log(np.clip(np.asarray(probabilities, dtype=np.float64), 1e-12, 1.0))


def apply_temperature(probabilities: np.ndarray, temperature: float) -> np.ndarray:
    """Probabilities (N, classes) rescaled: softmax(log p / T). T = 1 changes nothing."""
    if temperature <= 0:
        raise ValueError(f"a temperature must be positive, not {temperature}")
    scaled = _log(probabilities) / temperature
    scaled -= scaled.max(axis=1, keepdims=True)
    exp = np.exp(scaled)
    return exp / exp.sum(axis=1, keepdims=True)


def fit_temperature(probabilities: np.ndarray, labels: np.ndarray) -> float:
    """The T that minimises the negative log-likelihood of ``labels`` (N,) under
    ``apply_temperature(probabilities, T)``, searched in log space (T in [0.05, 20])."""
    if len(labels) < 2:
        raise ValueError("temperature scaling needs at least two validation images")
    logp = torch.tensor(_log(probabilities))
    target = torch.tensor(np.asarray(labels), dtype=torch.long)
    log_t = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    optimiser = torch.optim.LBFGS([log_t], lr=0.1, max_iter=200, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimiser.zero_grad()
        loss = torch.nn.functional.cross_entropy(logp / log_t.exp(), target)
        loss.backward()
        return loss

    optimiser.step(closure)
    return float(np.clip(float(log_t.detach().exp()), 0.05, 20.0))


def measure(probabilities: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS) -> Calibration:
    """ECE of the predicted class's probability (equal-width bins) and the multi-class Brier
    score (mean squared distance to the one-hot truth)."""
    probabilities = np.asarray(probabilities, dtype=np.float64)
    labels = np.asarray(labels)
    confidence = probabilities.max(axis=1)
    correct = probabilities.argmax(axis=1) == labels
    edges = np.linspace(0.0, 1.0, bins + 1)
    index = np.clip(np.digitize(confidence, edges[1:-1]), 0, bins - 1)
    ece = 0.0
    for b in range(bins):
        chosen = index == b
        if chosen.any():
            ece += chosen.mean() * abs(confidence[chosen].mean() - correct[chosen].mean())
    onehot = np.eye(probabilities.shape[1])[labels]
    brier = float(((probabilities - onehot) ** 2).sum(axis=1).mean())
    return Calibration(float(ece), brier, int(len(labels)))


def reliability_diagram(curves: dict[str, tuple[np.ndarray, np.ndarray]], path: Path,
                        title: str, bins: int = ECE_BINS) -> None:
    """Accuracy against confidence per bin, one line per named (probabilities, labels), with
    the diagonal a calibrated model would follow; written as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(5, 5))
    axis.plot([0, 1], [0, 1], color="grey", linestyle="--", label="calibrated")
    edges = np.linspace(0.0, 1.0, bins + 1)
    for name, (probabilities, labels) in curves.items():
        confidence = probabilities.max(axis=1)
        correct = probabilities.argmax(axis=1) == labels
        index = np.clip(np.digitize(confidence, edges[1:-1]), 0, bins - 1)
        xs, ys = [], []
        for b in range(bins):
            chosen = index == b
            if chosen.any():
                xs.append(confidence[chosen].mean())
                ys.append(correct[chosen].mean())
        ece = measure(probabilities, labels, bins).ece
        axis.plot(xs, ys, marker="o", label=f"{name} (ECE {ece:.3f})")
    axis.set_xlabel("confidence (predicted class's probability)")
    axis.set_ylabel("accuracy")
    axis.set_xlim(0, 1)
    axis.set_ylim(0, 1)
    axis.set_title(title)
    axis.legend(loc="upper left", fontsize=8)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)


def as_trained_and_stated(probabilities: np.ndarray, labels: np.ndarray, temperature: float,
                          diagram: Path, title: str) -> tuple[Calibration, Calibration | None]:
    """The calibration of ``probabilities`` as the network gives them and, when the card holds
    a temperature other than 1, as the agent states them, with both curves drawn into
    ``diagram``: what every task's evaluation reports, under its own report's names."""
    trained = measure(probabilities, labels)
    curves = {"as trained": (probabilities, labels)}
    stated = None
    if temperature != 1.0:
        calibrated = apply_temperature(probabilities, temperature)
        stated = measure(calibrated, labels)
        curves[f"temperature {temperature:.2f} (what the agent states)"] = (calibrated, labels)
    reliability_diagram(curves, diagram, title)
    return trained, stated
