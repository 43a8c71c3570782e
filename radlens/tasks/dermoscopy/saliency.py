"""Where the dermoscopy classifier looked: Grad-CAM of its ViT, on the photograph.

The ViT has no convolutional feature map; ``radlens.models.cam.token_gradcam`` lays its last
block's patch tokens out on their grid and weights them by their mean gradient, as the
density task's CLIP towers are explained. The class explained is the one the model states
(melanoma at a probability of one half or more, nevus below: the gradient of the negated
logit). The map comes back onto the photograph with the input's padding cut away, and its
mass is split between the lesion (the refined mask), the rest of the photograph and, where
the regions are known (phantoms), the confounders drawn on it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from radlens.models.cam import token_gradcam
from radlens.models.placement import to_source
from radlens.tasks.dermoscopy.classifier import CrossModalClassifier
from radlens.tasks.dermoscopy.segment import PAD, prepare_rgb


class _TwoLogits(nn.Module):
    """The classifier as (nevus, melanoma) logits: what ``token_gradcam`` scores."""

    def __init__(self, classifier: CrossModalClassifier) -> None:
        super().__init__()
        self.classifier = classifier

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        logit, _ = self.classifier(images)
        return torch.stack([-logit, logit], dim=1)


@dataclass(frozen=True)
class Explanation:
    cam: np.ndarray  # (H, W) float32 in [0, 1] over the photograph
    explained: str  # "melanoma" or "nevus"
    lesion_share: float  # of the map's mass, on the lesion mask


def explain(classifier: CrossModalClassifier, image: np.ndarray, lesion: np.ndarray, *,
            melanoma: bool, device: str = "cpu") -> Explanation:
    """Grad-CAM of the stated class for an (H, W, 3) uint8 photograph."""
    size = classifier.shape.image_size
    batch = prepare_rgb(image, size)[None].to(device)
    grid = (classifier.shape.grid, classifier.shape.grid)
    with torch.enable_grad():
        canvas = token_gradcam(_TwoLogits(classifier), classifier.encoder.blocks[-1], grid,
                               batch, 1 if melanoma else 0)
    cam = to_source(torch.from_numpy(canvas), image.shape[:2], (size, size), PAD).numpy()
    cam = np.clip(cam, 0.0, None).astype(np.float32)
    top = float(cam.max())
    cam = cam / top if top > 0 else cam
    return Explanation(cam, "melanoma" if melanoma else "nevus", mass_share(cam, lesion))


def mass_share(cam: np.ndarray, region: np.ndarray) -> float:
    """The share of the map's mass on ``region`` (0 for an empty map)."""
    total = float(cam.sum())
    return float(cam[region].sum() / total) if total > 0 else 0.0
