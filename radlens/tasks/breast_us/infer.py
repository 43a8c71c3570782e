"""Inference with a weights folder: ``model.pt`` (a state dict) beside ``card.json``.

Images of any size go in (greyscale or RGB, any value range); each becomes the network's input
through the card's preprocessing (``preprocess.prepare``: intensity scaling, resizing, padding to
keep the aspect ratio), and its probability maps are mapped back onto the source image through
the same geometry (``preprocess.to_source``). Batched, under ``torch.inference_mode``, on CUDA
when present (device "auto").
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from radlens.models.calibration import apply_temperature, card_temperature
from radlens.models.cards import ModelError, model_folder
from radlens.models.device import resolve_device
from radlens.models.metrics import image_probabilities
from radlens.models.networks import (
    SegmentationNetwork,
    build,
    lesion_pooled_latents,
    pooled_latents,
)
from radlens.models.ood import OodDetector
from radlens.tasks.breast_us.preprocess import policy_of, prepare, to_source

DEFAULT_MODEL = "default"  # the shipped lesion model's weights


@dataclass(frozen=True)
class Prediction:
    """One image's result at its source size."""

    probabilities: np.ndarray  # (3, H, W) float32: background, benign, malignant
    image_probabilities: np.ndarray  # (3,) normal, benign, malignant
    latent: np.ndarray  # (C,) deepest encoder map, global-average pooled
    deepest: np.ndarray  # (C, h, w) the deepest encoder map itself, for lesion-pooled latents

    def region_latent(self, region: np.ndarray) -> np.ndarray:
        """(C,) the deepest map averaged inside one lesion (a boolean mask at source size)."""
        features = torch.from_numpy(self.deepest)[None]
        return lesion_pooled_latents([features], torch.from_numpy(region)[None])[0].numpy()

    @property
    def classes(self) -> np.ndarray:
        return self.probabilities.argmax(axis=0).astype(np.uint8)


@dataclass(frozen=True)
class BatchPrediction:
    """One batched forward pass: each image's result at its source size, and the pass itself
    at the network's size, so saliency can explain these images without running it again."""

    predictions: list[Prediction]
    inputs: torch.Tensor  # (B, 1, h, w) the network's input
    logits: torch.Tensor  # (B, 3, h, w)
    features: list[torch.Tensor]  # the encoder maps, shallow to deep, (B, C_d, h_d, w_d)
    # The CAM layer's output, in the pass's autograd graph up to ``logits``, when the pass
    # was run for Grad-CAM (``predict_batch(..., cam_layer=...)``); else None.
    cam_activation: torch.Tensor | None = None


class Segmenter:
    def __init__(self, folder: str | Path = DEFAULT_MODEL, *, version: str | None = None,
                 device: str = "auto", batch_size: int = 8) -> None:
        """``version``, when given, must equal the card's: a pinned deployment never silently
        runs other weights."""
        self.folder = model_folder(folder)
        try:
            self.card: dict[str, Any] = json.loads((self.folder / "card.json").read_text())
        except (OSError, ValueError) as exc:
            raise ModelError(f"cannot read {self.folder / 'card.json'}: {exc}") from exc
        if version is not None and str(self.card.get("version")) != version:
            raise ModelError(f"{self.folder} holds version {self.card.get('version')!r}, "
                             f"not the pinned {version!r}")
        try:
            state = torch.load(self.folder / "model.pt", map_location="cpu", weights_only=True)
        except (OSError, ValueError, RuntimeError) as exc:
            raise ModelError(f"cannot load model from {self.folder}: {exc}") from exc
        self.device = resolve_device(device)
        self.model: SegmentationNetwork = build(self.card["architecture"],
                                                in_channels=self.card.get("in_channels", 1))
        try:
            self.model.load_state_dict(state)
        except RuntimeError as exc:
            raise ModelError(f"{self.folder}: weights do not fit {self.card['architecture']}: "
                             f"{exc}") from exc
        self.model.to(self.device).eval()
        self.ood = OodDetector.load(self.folder)
        self.input_size = tuple(self.card["input_size"])
        self.batch_size = batch_size
        # Temperature scaling fitted at training (1: the card states none).
        self.temperature = card_temperature(self.card)
        self.preprocessing = policy_of(self.card)  # the one training used

    @property
    def name(self) -> str:
        return str(self.card["name"])

    @property
    def version(self) -> str:
        return str(self.card["version"])

    def _prepare(self, image: np.ndarray) -> torch.Tensor:
        return prepare(image, self.input_size, self.preprocessing)

    @torch.inference_mode()
    def latents(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """(N, C) pooled deepest latents only: what the OOD score reads, without the maps."""
        chunks = []
        for start in range(0, len(images), self.batch_size):
            chunk = images[start:start + self.batch_size]
            batch = torch.cat([self._prepare(image) for image in chunk])
            _, features = self.model.forward_with_features(batch.to(self.device))
            chunks.append(pooled_latents(features).float().cpu().numpy())
        return np.concatenate(chunks) if chunks else np.zeros((0, 0), np.float32)

    def predict(self, images: Sequence[np.ndarray]) -> list[Prediction]:
        """Probability maps at each image's own size, image-level probabilities, latents."""
        results: list[Prediction] = []
        for start in range(0, len(images), self.batch_size):
            results += self.predict_batch(images[start:start + self.batch_size]).predictions
        return results

    def predict_batch(self, images: Sequence[np.ndarray], *,
                      cam_layer: nn.Module | None = None) -> BatchPrediction:
        """One forward pass over ``images`` (at most ``batch_size`` of them, the caller's
        choice): their predictions, and the pass for the saliency of the same images. With
        ``cam_layer`` the pass also keeps that layer's output in an autograd graph up to the
        logits, so Grad-CAM of these images needs no pass of its own (costs the graph's
        memory while the pass is held)."""
        batch = torch.cat([self._prepare(image) for image in images]).to(self.device)
        activation = None
        if cam_layer is None:
            with torch.inference_mode():
                logits, features = self.model.forward_with_features(batch)
        else:
            logits, features, activation = self.model.forward_for_cam(batch, cam_layer)
        with torch.no_grad():
            probs = logits.softmax(dim=1)
            per_image = image_probabilities(probs).cpu().numpy()
            if self.temperature != 1.0:  # the calibrated probabilities the card measured
                per_image = apply_temperature(per_image, self.temperature).astype(np.float32)
            latents = pooled_latents(features).float().cpu().numpy()
            deepest = features[-1].float().cpu().numpy()
            results = []
            for index, image in enumerate(images):
                size = np.asarray(image).shape[:2]
                full = to_source(probs[index], size, self.input_size, self.preprocessing)
                results.append(Prediction(full.float().cpu().numpy(), per_image[index],
                                          latents[index], deepest[index]))
        return BatchPrediction(results, batch, logits, features, activation)
