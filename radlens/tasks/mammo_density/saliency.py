"""Where the density model looked: Grad-CAM on a mammogram, and how much of it fell on breast
tissue.

Density models are known to look at the wrong things: compression-paddle edges, burned-in
text and markers, clips and implants. Grad-CAM (MONAI's, at the image encoder's last block, for
the predicted category) is mapped back onto the original image, and its mass is split over
the breast tissue, artifacts and the rest. Artifacts are found without a label: bright
structures apart from the breast (markers, text) and saturated pixels inside it (clips,
implants, the paddle's edge where it crosses). A low share on tissue is a warning that the
category may rest on an artifact.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy import ndimage

from radlens.models.cam import monai_gradcam, token_gradcam
from radlens.tasks.mammo_density.model import (
    CAM_LAYER,
    DENSITY_CLASSES,
    DensityModel,
    PreparedImage,
    breast_region,
    prepare,
    to_original,
)

# Below this share of attention on breast tissue the finding carries a warning.
LOW_TISSUE_SHARE = 0.6


@dataclass(frozen=True)
class DensityExplanation:
    category: str
    probabilities: dict[str, float]
    cam: np.ndarray  # float32 on the original grid, 0..1
    shares: dict[str, float]  # tissue, artifacts, outside: fractions of the map's mass

    @property
    def attention_on_artifact(self) -> bool:
        return self.shares["tissue"] < LOW_TISSUE_SHARE


def artifact_mask(image: np.ndarray, breast: np.ndarray | None = None) -> np.ndarray:
    """Bright structures apart from the breast, and saturated pixels within it."""
    values = image.astype(np.float32)
    top = float(values.max()) or 1.0
    breast = breast_region(image) if breast is None else breast
    bright = values > 0.35 * top
    apart = bright & ~ndimage.binary_dilation(breast, iterations=2)
    saturated = values >= 0.97 * top
    return ndimage.binary_dilation(apart | (saturated & breast), iterations=1)


def attention_shares(cam: np.ndarray, breast: np.ndarray, artifacts: np.ndarray
                     ) -> dict[str, float]:
    """The map's mass on tissue (breast minus artifacts), on artifacts, and elsewhere."""
    weights = np.clip(np.asarray(cam, dtype=np.float64), 0.0, None)
    total = float(weights.sum())
    if total <= 0:
        return {"tissue": 0.0, "artifacts": 0.0, "outside": 1.0}
    tissue = float(weights[breast & ~artifacts].sum()) / total
    on_artifacts = float(weights[artifacts].sum()) / total
    return {"tissue": tissue, "artifacts": on_artifacts,
            "outside": max(0.0, 1.0 - tissue - on_artifacts)}


def explain(model: DensityModel, image: np.ndarray, *, size: int = 224,
            prepared: PreparedImage | None = None,
            breast: np.ndarray | None = None) -> DensityExplanation:
    """The category, its probabilities and Grad-CAM of one mammogram, with attention shares.
    ``prepared`` and ``breast`` (the image's ``breast_region``): when the caller has them."""
    breast = breast_region(image) if breast is None else breast
    prepared = prepared or prepare(image, size, region=breast)
    model.eval()
    device = next(model.parameters()).device
    batch = torch.from_numpy(prepared.pixels)[None, None].to(device)
    with torch.no_grad():
        probabilities = model(batch).softmax(dim=1)[0].cpu().numpy()
    predicted = int(probabilities.argmax())
    target = getattr(model, "cam_layer", CAM_LAYER)
    if target is not None:
        canvas = monai_gradcam(model, batch, predicted, target)
    elif model.token_block is not None and model.token_grid is not None:
        canvas = token_gradcam(model, model.token_block, model.token_grid, batch, predicted)
    else:
        raise ValueError("the model has neither a convolutional block nor a token grid")
    original = to_original(canvas, prepared, image.shape)
    shares = attention_shares(original, breast, artifact_mask(image, breast))
    return DensityExplanation(DENSITY_CLASSES[predicted],
                              {c: float(p) for c, p in zip(DENSITY_CLASSES, probabilities,
                                                           strict=True)},
                              original, shares)
