"""Out-of-distribution score: how unlike the training images a frame is, to abstain on it.

The score is the Mahalanobis distance of a frame's pooled encoder latent (the deepest encoder
map, global-average pooled: the latent inference computes anyway, so scoring costs nothing) to
the latents of the training images, with a Ledoit-Wolf shrunk covariance (the latent has more
dimensions than a small training set can estimate a covariance for). Why Mahalanobis and not an
energy score: the segmentation network's logits are per pixel, and an image-level energy would
need an aggregation the network was never trained for; the latent distance needs no such choice,
and on the shipped model it separates real non-breast ultrasound from breast phantoms by a wide
margin (see the model card). The threshold is a quantile of the scores of held-out images of the
training distribution, so that at most ``1 - quantile`` of such images abstain.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

OOD_FILE = "ood.npz"
METHOD = "mahalanobis distance of the global-average pooled deepest encoder latent"


@dataclass(frozen=True)
class OodDetector:
    mean: np.ndarray  # (C,)
    precision: np.ndarray  # (C, C) inverse of the shrunk covariance
    threshold: float

    def score(self, latents: np.ndarray) -> np.ndarray:
        """(N,) distances of (N, C) latents; larger = less like the training images."""
        centred = np.atleast_2d(np.asarray(latents, dtype=np.float64)) - self.mean
        squared = np.einsum("nc,cd,nd->n", centred, self.precision, centred)
        return np.sqrt(np.clip(squared, 0.0, None))

    @classmethod
    def fit(cls, fit_latents: np.ndarray, calibration_latents: np.ndarray, *,
            quantile: float = 0.99) -> OodDetector:
        """Mean and shrunk covariance from training latents; the threshold from held-out ones."""
        from sklearn.covariance import LedoitWolf

        if not 0.5 <= quantile < 1.0:
            raise ValueError(f"quantile must lie in [0.5, 1), not {quantile}")
        estimator = LedoitWolf().fit(np.asarray(fit_latents, dtype=np.float64))
        unscaled = cls(estimator.location_, estimator.precision_, float("inf"))
        threshold = float(np.quantile(unscaled.score(calibration_latents), quantile))
        return cls(estimator.location_, estimator.precision_, threshold)

    def save(self, folder: Path) -> Path:
        buffer = io.BytesIO()
        np.savez_compressed(buffer, mean=self.mean.astype(np.float64),
                            precision=self.precision.astype(np.float64),
                            threshold=np.float64(self.threshold))
        path = folder / OOD_FILE
        path.write_bytes(buffer.getvalue())
        return path

    @classmethod
    def load(cls, folder: Path) -> OodDetector | None:
        """The detector kept beside the weights, or None for a model built without one."""
        path = folder / OOD_FILE
        if not path.is_file():
            return None
        with np.load(path) as stored:
            return cls(stored["mean"], stored["precision"], float(stored["threshold"]))


def summary(scores: np.ndarray, threshold: float) -> dict[str, float]:
    """Distribution of scores and the share above the threshold, for cards and evaluate."""
    scores = np.asarray(scores, dtype=np.float64)
    return {"n": int(scores.size),
            "abstain_rate": float(np.mean(scores > threshold)) if scores.size else 0.0,
            "min": float(scores.min()), "p5": float(np.percentile(scores, 5)),
            "median": float(np.median(scores)), "p95": float(np.percentile(scores, 95)),
            "max": float(scores.max())}


def case_images(cases: list) -> list[np.ndarray]:  # list[datasets.Case]
    """A dataset's images as the agent sees them: the stored pixels, greyscale, source size."""
    from radlens.datasets.segmentation import read_grey

    return [read_grey(case.image_path) for case in cases]


class LatentSource(Protocol):
    """What calibration needs of a model: its pooled latents and the folder its weights are in
    (radlens.tasks.breast_us.infer.Segmenter is one; this module does not import it, since inference
    imports the detector)."""

    folder: Path

    def latents(self, images: list[np.ndarray]) -> np.ndarray: ...


def calibrate(segmenter: LatentSource, fit_images: list[np.ndarray],
              calibration_images: list[np.ndarray], *, quantile: float = 0.99,
              described: dict[str, str] | None = None) -> tuple[OodDetector, dict]:
    """Fit on training images, set the threshold on held-out ones, keep it beside the weights
    (``ood.npz``) and return the card's ``ood`` section."""
    detector = OodDetector.fit(segmenter.latents(fit_images),
                               segmenter.latents(calibration_images), quantile=quantile)
    calibration = summary(detector.score(segmenter.latents(calibration_images)),
                          detector.threshold)
    detector.save(segmenter.folder)
    section = {"method": METHOD, "covariance": "Ledoit-Wolf shrinkage",
               "threshold": detector.threshold, "quantile": quantile,
               "fit_images": len(fit_images), "calibration_images": len(calibration_images),
               "calibration": calibration, **(described or {})}
    return detector, section

