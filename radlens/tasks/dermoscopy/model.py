"""The dermoscopy model as one object: both segmentation stages, the ABC(D) features and the
classifier, saved as one ``model.pt`` beside its card, and the one ``analyse`` that training's
test set, ``radlens evaluate`` and the agent all run.

``model.pt`` holds the coarse UNet's and the classifier's weights, the classifier's shape,
the segmenter's input size and the standardisation of the ABC vector; the card holds the
rest (cut points, calibration, scope, refiner). ``analyse`` reads an (H, W, 3) uint8
photograph and its pixel spacing (None: unknown) and returns a ``DermoscopyAnalysis``: the
coarse and refined masks, the features and their levels, the melanoma probability as
trained and as stated (temperature-scaled), the image and feature embeddings and their
cosine similarity, and the pooled image feature the OOD detector scores.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from radlens.models.text import Vocabulary
from radlens.tasks.dermoscopy.classifier import ClassifierShape, CrossModalClassifier
from radlens.tasks.dermoscopy.descriptors import DESCRIPTORS, ranked
from radlens.tasks.dermoscopy.features import AbcFeatures, FeatureError, measure_abc
from radlens.tasks.dermoscopy.refine import RandomWalkerRefiner, Refined, Refiner, refine
from radlens.tasks.dermoscopy.segment import (
    SEGMENTER_SIZE,
    CoarseSegmenter,
    build_coarse_unet,
    prepare_rgb,
)

MODEL_FILE = "model.pt"


@dataclass(frozen=True)
class DermoscopyAnalysis:
    coarse: np.ndarray  # bool (H, W)
    refined: Refined
    features: AbcFeatures | None  # None: the mask could not be measured
    feature_error: str | None
    levels: dict[str, int | None]
    probability_as_trained: float
    probability: float  # as stated: temperature-scaled
    image_embedding: np.ndarray  # z_v
    abc_embedding: np.ndarray | None  # z_c (None without features)
    alignment: float | None  # cosine of z_v and z_c
    descriptor_similarity: dict[str, float]  # cosine of the image to each descriptor
    descriptor_probability: dict[str, float]  # each descriptor's sigmoid
    descriptors: list[str]  # the top three, consistent (see descriptors.ranked)
    pooled: np.ndarray  # the image feature the OOD detector scores


class DermoscopyModel:
    """The coarse UNet, the classifier and what the card says about them, on one device."""

    def __init__(self, segmenter: torch.nn.Module, classifier: CrossModalClassifier, *,
                 segmenter_size: int, abc_mean: np.ndarray, abc_scale: np.ndarray,
                 card: Mapping[str, Any] | None = None, device: str = "cpu",
                 refiner: Refiner | None = None) -> None:
        self.coarse = CoarseSegmenter(segmenter, size=segmenter_size, device=device)
        self.classifier = classifier.to(device).eval()
        self.abc_mean = np.asarray(abc_mean, dtype=np.float32)
        self.abc_scale = np.asarray(abc_scale, dtype=np.float32)
        self.card = dict(card or {})
        self.device = device
        self.refiner: Refiner = refiner or RandomWalkerRefiner()

    @property
    def shape(self) -> ClassifierShape:
        return self.classifier.shape

    @property
    def temperature(self) -> float:
        return float((self.card.get("calibration") or {}).get("temperature") or 1.0)

    @property
    def cut_points(self) -> dict[str, list[float]]:
        return dict((self.card.get("features") or {}).get("cut_points") or {})

    def standardised(self, vectors: np.ndarray) -> torch.Tensor:
        return torch.as_tensor((np.atleast_2d(vectors) - self.abc_mean) / self.abc_scale,
                               dtype=torch.float32)

    def save(self, folder: Path) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / MODEL_FILE
        torch.save({"segmenter": self.coarse.network.state_dict(),
                    "segmenter_size": self.coarse.size,
                    "classifier": self.classifier.state_dict(),
                    "shape": vars(self.shape).copy(),
                    "vocabulary": list(self.classifier.vocabulary.tokens),
                    "abc_mean": self.abc_mean.tolist(), "abc_scale": self.abc_scale.tolist()},
                   path)
        return path

    @classmethod
    def load(cls, folder: Path, *, card: Mapping[str, Any] | None = None,
             device: str = "cpu", refiner: Refiner | None = None) -> DermoscopyModel:
        saved = torch.load(folder / MODEL_FILE, map_location="cpu", weights_only=True)
        segmenter = build_coarse_unet()
        segmenter.load_state_dict(saved["segmenter"])
        classifier = CrossModalClassifier(ClassifierShape(**saved["shape"]),
                                          Vocabulary.of_tokens(saved["vocabulary"]))
        classifier.load_state_dict(saved["classifier"])
        return cls(segmenter, classifier, segmenter_size=int(saved.get("segmenter_size",
                                                                         SEGMENTER_SIZE)),
                   abc_mean=np.asarray(saved["abc_mean"]), abc_scale=np.asarray(
                       saved["abc_scale"]), card=card, device=device, refiner=refiner)

    @torch.no_grad()
    def classify(self, images: np.ndarray | torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """(melanoma probabilities as trained (N,), pooled features (N, hidden)) of images
        prepared for the classifier, (N, 3, s, s) uint8 or float 0..1."""
        batch = torch.as_tensor(images)
        if batch.dtype == torch.uint8:
            batch = batch.float().div(255)
        logits, feature = self.classifier(batch.to(self.device))
        return torch.sigmoid(logits).cpu().numpy(), feature.cpu().numpy()

    def stated(self, probability: float) -> float:
        """The probability temperature-scaled as the card's calibration says."""
        from radlens.models.calibration import apply_temperature

        pair = np.array([[1.0 - probability, probability]])
        return float(apply_temperature(pair, self.temperature)[0, 1])

    @torch.no_grad()
    def analyse(self, image: np.ndarray, spacing_mm: float | None) -> DermoscopyAnalysis:
        coarse = self.coarse.mask(image)
        refined = (refine(image, coarse, self.refiner) if coarse.any() else
                   Refined(coarse, None, self.refiner.name, 0.0, False,
                           "the coarse stage found no lesion"))
        features, error = None, None
        try:
            features = measure_abc(image, refined.mask, spacing_mm=spacing_mm)
        except FeatureError as exc:
            error = str(exc)
        prepared = prepare_rgb(image, self.shape.image_size)[None].to(self.device)
        logits, pooled = self.classifier(prepared)
        probability = float(torch.sigmoid(logits)[0])
        z_v = self.classifier.image_embedding(pooled)[0]
        similarity = self.classifier.descriptor_similarity(pooled)[0].cpu().numpy()
        chance = torch.sigmoid(self.classifier.descriptor_logits(pooled))[0].cpu().numpy()
        probabilities = {name: float(p) for name, p in zip(DESCRIPTORS, chance, strict=True)}
        z_c, alignment = None, None
        if features is not None:
            z_c = self.classifier.abc_embedding(
                self.standardised(features.vector()).to(self.device))[0]
            alignment = float(z_v @ z_c)
        return DermoscopyAnalysis(
            coarse=coarse, refined=refined, features=features, feature_error=error,
            levels=features.levels(self.cut_points) if features is not None else {},
            probability_as_trained=probability, probability=self.stated(probability),
            image_embedding=z_v.cpu().numpy(),
            abc_embedding=None if z_c is None else z_c.cpu().numpy(),
            alignment=alignment,
            descriptor_similarity={name: float(v) for name, v in zip(DESCRIPTORS, similarity,
                                                                      strict=True)},
            descriptor_probability=probabilities, descriptors=ranked(probabilities),
            pooled=pooled[0].cpu().numpy())
