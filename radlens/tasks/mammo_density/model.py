"""Breast density (BI-RADS A-D) as image-text similarity, CLIP style.

An image encoder (a small MONAI ResNet) and a text encoder (a one-layer transformer over a word
vocabulary) map a mammogram and a sentence into one embedding space. The four sentences are the
BI-RADS atlas's standard descriptions of the categories; an image is classified by the most
similar one, so the model also scores descriptions it was not trained on (zero-shot style).
Training uses a weighted contrastive loss: image-to-text and text-to-image, each class weighted
by its inverse frequency, so that the rare category D counts as much as the common B and C.

Inputs follow the published preparation: burned-in annotations that stand apart from the breast
are removed (only the breast's connected region is kept), the image is cropped to the breast,
turned so that the chest wall is on the left, and resized to 224 x 224.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from monai.networks.nets import ResNet
from scipy import ndimage
from torch import nn
from torch.nn import functional as F

from radlens.models.text import MAX_TOKENS, TextEncoder, Vocabulary, words  # noqa: F401

DENSITY_CLASSES = ("A", "B", "C", "D")
# The BI-RADS atlas (5th edition) wording of the four breast composition categories.
DESCRIPTIONS = {
    "A": "The breasts are almost entirely fatty.",
    "B": "There are scattered areas of fibroglandular density.",
    "C": "The breasts are heterogeneously dense, which may obscure small masses.",
    "D": "The breasts are extremely dense, which lowers the sensitivity of mammography.",
}
INPUT_SIZE = 224
EMBED_DIM = 64
CAM_LAYER = "image_encoder.layer4"


# -- preparing a mammogram -----------------------------------------------------------------
@dataclass(frozen=True)
class PreparedImage:
    """A mammogram as the network sees it, and how it was cut from the original."""

    pixels: np.ndarray  # float32 (INPUT_SIZE, INPUT_SIZE), 0..1, chest wall on the left
    box: tuple[int, int, int, int]  # row0, row1, col0, col1 of the crop in the original
    flipped: bool  # the original had its chest wall on the right
    scale: float  # original pixels per network pixel
    content: tuple[int, int, int] = (0, 0, 0)  # top row, height, width of the breast on canvas


def breast_region(image: np.ndarray) -> np.ndarray:
    """The breast: the largest connected region brighter than the background, holes filled.
    Markers and text that stand apart from it are left out."""
    values = image.astype(np.float32)
    top = float(values.max()) or 1.0
    foreground = values > 0.06 * top
    foreground = ndimage.binary_opening(foreground, iterations=1)
    labels, count = ndimage.label(foreground)
    if count == 0:
        return np.zeros(image.shape, dtype=bool)
    sizes = ndimage.sum_labels(np.ones_like(labels), labels, index=range(1, count + 1))
    return ndimage.binary_fill_holes(labels == 1 + int(np.argmax(sizes)))


def chest_wall_on_right(region: np.ndarray) -> bool:
    """The chest wall is the image edge the breast touches the most."""
    return bool(region[:, -1].sum() > region[:, 0].sum())


# What any mammogram shows, whatever the model: the breast against the chest wall along one
# side edge of the image, with background beside it. Phantoms touch their edge along at least
# 0.65 of the height and fill at most 0.7 of the image.
MIN_CHEST_WALL_SPAN = 0.25
MAX_BREAST_FRACTION = 0.95


def not_a_mammogram(image: np.ndarray, region: np.ndarray | None = None) -> str | None:
    """Why ``image`` cannot be a mammogram, or None. Checked before the model's own
    out-of-distribution score, which a slice of another modality can pass by chance.
    ``region``: the image's ``breast_region``, when the caller has it already."""
    region = breast_region(image) if region is None else region
    span = float(max(region[:, 0].mean(), region[:, -1].mean())) if region.size else 0.0
    if span < MIN_CHEST_WALL_SPAN:
        return (f"no breast against a side edge of the image (the largest bright region "
                f"touches one along {span:.0%} of its height, a mammogram's along "
                f"{MIN_CHEST_WALL_SPAN:.0%} or more)")
    fraction = float(region.mean())
    if fraction > MAX_BREAST_FRACTION:
        return (f"no background beside the breast (the bright region fills {fraction:.0%} "
                f"of the image)")
    return None


def prepare(image: np.ndarray, size: int = INPUT_SIZE,
            region: np.ndarray | None = None) -> PreparedImage:
    """Crop to the breast, blank what lies outside it, chest wall left, resize to ``size``
    (aspect kept, padded with background). ``region``: the image's ``breast_region``, when
    the caller has it already."""
    values = image.astype(np.float32)
    top = float(values.max()) or 1.0
    values /= top
    region = breast_region(image) if region is None else region
    if not region.any():
        region = np.ones(image.shape, dtype=bool)
    rows, cols = np.nonzero(region)
    r0, r1, c0, c1 = int(rows.min()), int(rows.max()) + 1, int(cols.min()), int(cols.max()) + 1
    crop = np.where(region, values, 0.0)[r0:r1, c0:c1]
    flipped = chest_wall_on_right(region)
    if flipped:
        crop = crop[:, ::-1]
    scale = max(crop.shape) / size
    resized = ndimage.zoom(crop, (size / max(crop.shape),) * 2, order=1)
    canvas = np.zeros((size, size), dtype=np.float32)
    h, w = min(size, resized.shape[0]), min(size, resized.shape[1])
    top_row = (size - h) // 2
    canvas[top_row:top_row + h, :w] = resized[:h, :w]  # chest wall against the left edge
    return PreparedImage(np.clip(canvas, 0.0, 1.0), (r0, r1, c0, c1), flipped, scale,
                         (top_row, h, w))


def to_original(values: np.ndarray, prepared: PreparedImage,
                shape: tuple[int, int]) -> np.ndarray:
    """A map on the network's canvas (e.g. Grad-CAM) back on the original image's grid:
    zero outside the crop."""
    top_row, h, w = prepared.content
    r0, r1, c0, c1 = prepared.box
    patch = np.asarray(values, dtype=np.float32)[top_row:top_row + h, :w]
    if patch.size == 0:
        return np.zeros(shape, dtype=np.float32)
    patch = ndimage.zoom(patch, ((r1 - r0) / patch.shape[0], (c1 - c0) / patch.shape[1]),
                         order=1)[: r1 - r0, : c1 - c0]
    if prepared.flipped:
        patch = patch[:, ::-1]
    out = np.zeros(shape, dtype=np.float32)
    out[r0:r0 + patch.shape[0], c0:c0 + patch.shape[1]] = patch
    return out


# -- text: the shared word-level tokenizer and text tower (radlens.models.text) -------------
# -- the model -------------------------------------------------------------------------------
class DensityCLIP(nn.Module):
    """Image and text in one space; the logits of an image against each description."""

    cam_layer: str | None = CAM_LAYER  # the block Grad-CAM hooks
    token_block = None  # a transformer tower's last block (OpenClipDensity); none here
    token_grid = None

    def __init__(self, vocabulary: Vocabulary, embed_dim: int = EMBED_DIM,
                 widths: Sequence[int] = (32, 64, 128, 256)) -> None:
        super().__init__()
        self.vocabulary = vocabulary
        self.image_encoder = ResNet(block="basic", layers=[1, 1, 1, 1],
                                    block_inplanes=list(widths), spatial_dims=2,
                                    n_input_channels=1, conv1_t_stride=2,
                                    num_classes=embed_dim)
        self.text_encoder = TextEncoder(len(vocabulary.tokens), embed_dim=embed_dim)
        self.logit_scale = nn.Parameter(torch.tensor(float(np.log(1 / 0.07))))
        self.register_buffer("prompt_ids", vocabulary.encode(
            [DESCRIPTIONS[c] for c in DENSITY_CLASSES]), persistent=True)

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.image_encoder(images), dim=-1)

    def pooled_features(self, images: torch.Tensor) -> torch.Tensor:
        """The image encoder's last block, global-average pooled: what the out-of-distribution
        score measures."""
        net = self.image_encoder
        x = net.maxpool(net.act(net.bn1(net.conv1(images))))
        x = net.layer4(net.layer3(net.layer2(net.layer1(x))))
        return torch.flatten(net.avgpool(x), 1)

    def encode_texts(self, token_ids: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.text_encoder(token_ids), dim=-1)

    def forward(self, images: torch.Tensor, token_ids: torch.Tensor | None = None
                ) -> torch.Tensor:
        """Logits (images, texts); the four descriptions when no texts are given."""
        texts = self.encode_texts(self.prompt_ids if token_ids is None else token_ids)
        scale = self.logit_scale.clamp(max=float(np.log(100.0))).exp()
        return scale * self.encode_images(images) @ texts.t()


# What training, evaluation, the agent and Grad-CAM need of a density model: ``model(images)``
# gives the logits against the four descriptions, ``pooled_features(images)`` what the OOD
# score measures, and ``cam_layer`` (or ``token_block`` and ``token_grid``) where Grad-CAM
# looks. DensityCLIP and clip_backbone.OpenClipDensity both are one.
DensityModel = nn.Module


def class_weights(labels: Sequence[int], classes: int = len(DENSITY_CLASSES)) -> torch.Tensor:
    """Inverse class frequency, normalised to a mean of 1 over the classes present."""
    counts = np.bincount(np.asarray(labels, dtype=int), minlength=classes).astype(np.float64)
    weights = np.where(counts > 0, counts.sum() / np.maximum(counts, 1) / classes, 0.0)
    present = weights > 0
    weights[present] /= weights[present].mean()
    return torch.tensor(weights, dtype=torch.float32)


def weighted_contrastive_loss(logits: torch.Tensor, labels: torch.Tensor,
                              weights: torch.Tensor | None = None) -> torch.Tensor:
    """Image-to-text cross-entropy over the descriptions plus text-to-image InfoNCE over the
    batch (every image of a category is a positive of its description), both weighted per
    category. ``logits``: (images, categories)."""
    image_to_text = F.cross_entropy(logits, labels, weight=weights)
    log_probability = logits.t().log_softmax(dim=1)  # each description over the batch's images
    positives = F.one_hot(labels, logits.shape[1]).t().bool()
    present = positives.any(dim=1)
    per_text = -torch.logsumexp(log_probability.masked_fill(~positives, float("-inf")),
                                dim=1)[present]
    text_weights = (weights[present] if weights is not None
                    else torch.ones_like(per_text))
    text_to_image = (per_text * text_weights).sum() / text_weights.sum()
    return (image_to_text + text_to_image) / 2
