"""Where the classifier looked, and the tumour masks made from it: Grad-CAM, Grad-CAM++ and
Score-CAM on the encoder's deepest features, each turned into a mask by an adaptive
percentile threshold inside the brain.

- Grad-CAM and Grad-CAM++ are MONAI's (``monai.visualize``), on the classification output
  alone (``ClassificationOnly``), at the last stage of the encoder (``target_layer``).
- Score-CAM is written here (MONAI has none; pytorch-grad-cam has one but pins its own
  torchvision): each channel of the target layer's activation, upsampled and scaled to
  0..1, masks the input, and the class's softmax probability on the masked input weighs the
  channel. A ResNet's last stage has 512 channels, a forward pass each; only the
  ``SCORE_CAM_CHANNELS`` most active are scored, which bounds the cost (and keeps the
  channels that carry the map).
- **The adaptive threshold.** The published method keeps the pixels above the p-th percentile
  of the map inside the brain, p chosen per image from the map's own distribution. Here p is
  where Otsu's threshold (scikit-image) falls among the map's values inside the brain,
  clamped to ``PERCENTILE_RANGE``: a map with one clear peak gets a small mask, a diffuse
  map no more than a fifth of the brain, and never less than half a percent of it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from radlens.tasks.brain_mri.network import ClassificationOnly, DualOutputNet

METHODS = ("Grad-CAM", "Grad-CAM++", "Score-CAM")
SCORE_CAM_CHANNELS = 32
PERCENTILE_RANGE = (80.0, 99.5)


@dataclass(frozen=True)
class SaliencyMask:
    """A method's map (H, W) in 0..1, the percentile chosen and the mask it gave."""

    method: str
    saliency: np.ndarray
    percentile: float
    mask: np.ndarray


def target_layer(network: DualOutputNet) -> str:
    """The name (within ``ClassificationOnly``) of the encoder's last stage."""
    encoder = network.unet.encoder
    if hasattr(encoder, "layer4"):
        return "network.unet.encoder.layer4"
    if hasattr(encoder, "_blocks"):
        return f"network.unet.encoder._blocks.{len(encoder._blocks) - 1}"
    raise ValueError(f"no known last stage in the {network.backbone} encoder")


def _scaled(values: np.ndarray) -> np.ndarray:
    low, high = float(values.min()), float(values.max())
    return (values - low) / (high - low) if high > low else np.zeros_like(values)


def score_cam(network: DualOutputNet, image: torch.Tensor, class_index: int, *,
              channels: int = SCORE_CAM_CHANNELS) -> np.ndarray:
    """Score-CAM of ``image`` (1, C, H, W) for ``class_index``: (H, W) in 0..1."""
    captured: dict[str, torch.Tensor] = {}
    layer = dict(ClassificationOnly(network).named_modules())[target_layer(network)]
    handle = layer.register_forward_hook(
        lambda _module, _inputs, output: captured.__setitem__("activation", output))
    try:
        with torch.no_grad():
            network(image)
    finally:
        handle.remove()
    activation = captured["activation"][0]  # (K, h, w)
    strongest = activation.mean(dim=(1, 2)).topk(min(channels, activation.shape[0])).indices
    maps = torch.nn.functional.interpolate(activation[strongest][None], size=image.shape[2:],
                                           mode="bilinear", align_corners=False)[0]
    low = maps.flatten(1).min(dim=1).values[:, None, None]
    high = maps.flatten(1).max(dim=1).values[:, None, None]
    masks = (maps - low) / (high - low).clamp_min(1e-8)
    with torch.no_grad():
        scores = torch.cat([torch.softmax(network(image * m[None, None])[0], dim=1)[:, class_index]
                            for m in masks])
    cam = torch.relu((scores[:, None, None] * maps).sum(dim=0))
    return _scaled(cam.numpy().astype(np.float32))


def saliency_map(network: DualOutputNet, image: torch.Tensor, class_index: int,
                 method: str) -> np.ndarray:
    """``method``'s map of ``image`` (1, C, H, W) for ``class_index``: (H, W) in 0..1."""
    from monai.visualize import GradCAM, GradCAMpp

    network.eval()
    if method == "Score-CAM":
        return score_cam(network, image, class_index)
    if method not in METHODS:
        raise ValueError(f"unknown saliency method {method!r}: one of {', '.join(METHODS)}")
    cam_class = GradCAM if method == "Grad-CAM" else GradCAMpp
    cam = cam_class(nn_module=ClassificationOnly(network), target_layers=target_layer(network))
    values = cam(image, class_idx=class_index)[0, 0]
    return _scaled(np.asarray(values.detach().cpu(), dtype=np.float32))


def adaptive_mask(saliency: np.ndarray, brain: np.ndarray) -> tuple[float, np.ndarray]:
    """(the percentile chosen, the mask of the brain's pixels above it); an empty brain or a
    flat map gives an empty mask."""
    from skimage.filters import threshold_otsu

    inside = saliency[brain]
    if inside.size == 0 or float(inside.max()) <= float(inside.min()):
        return PERCENTILE_RANGE[1], np.zeros(saliency.shape, dtype=bool)
    otsu = float(threshold_otsu(inside))
    percentile = float(np.clip(100.0 * (inside < otsu).mean(), *PERCENTILE_RANGE))
    cut = float(np.percentile(inside, percentile))
    return percentile, brain & (saliency > cut)


def saliency_masks(network: DualOutputNet, image: torch.Tensor, class_index: int,
                   brain: np.ndarray, methods: tuple[str, ...] = METHODS
                   ) -> list[SaliencyMask]:
    """Each method's map of ``image`` and the mask its adaptive threshold keeps."""
    results = []
    for method in methods:
        values = saliency_map(network, image, class_index, method)
        percentile, mask = adaptive_mask(values, brain)
        results.append(SaliencyMask(method, values, percentile, mask))
    return results
