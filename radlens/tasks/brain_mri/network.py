"""The dual-output network: one encoder, a classification head (glioma, meningioma,
pituitary, no tumour) and a segmentation head (background, tumour core, oedema), trained
jointly as the published method does (the classification's cross-entropy plus the masks'
Dice and cross-entropy).

The encoder and the segmentation decoder are MONAI's ``FlexibleUNet`` with a registered
backbone (ResNets and EfficientNets, no pretrained weights: nothing is downloaded); the
classification head pools the encoder's deepest features. ``BACKBONES`` are the ones
compared under identical settings, as the published work compared nine.

It reads **2.5-D** input: a slice with the slice above and below as three channels. A slice
alone cannot tell a vessel from a small enhancing nodule or follow a mass across slices,
and a 3-D network needs volumes of one size, memory, and far more training volumes than a
phantom set or a site has; three neighbouring slices give the through-plane context at a
2-D network's cost, and keep the published slice-level training.
"""

from __future__ import annotations

import torch
from monai.networks.nets import FlexibleUNet
from monai.networks.nets.flexible_unet import FLEXUNET_BACKBONE
from torch import nn

CLASSES = ("glioma", "meningioma", "pituitary", "no tumour")
SEGMENTS = ("background", "tumour core", "oedema")
BACKBONES = ("resnet10", "resnet18", "efficientnet-b0")
CONTEXT_SLICES = 3  # the slice and its two neighbours
DECODER_CHANNELS = (128, 64, 32, 16, 8)


class DualOutputNet(nn.Module):
    """(classification logits (B, 4), segmentation logits (B, 3, H, W)) from (B, 3, H, W)."""

    def __init__(self, backbone: str = "resnet18", *, in_channels: int = CONTEXT_SLICES,
                 dropout: float = 0.2) -> None:
        super().__init__()
        if backbone not in FLEXUNET_BACKBONE.register_dict:
            raise ValueError(f"unknown backbone {backbone!r}: one of "
                             f"{', '.join(sorted(FLEXUNET_BACKBONE.register_dict))}")
        self.backbone = backbone
        self.unet = FlexibleUNet(in_channels, len(SEGMENTS), backbone, pretrained=False,
                                 decoder_channels=DECODER_CHANNELS, spatial_dims=2)
        deepest = FLEXUNET_BACKBONE.register_dict[backbone]["feature_channel"][-1]
        self.classifier = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                        nn.Dropout(dropout), nn.Linear(deepest, len(CLASSES)))

    def encode(self, images: torch.Tensor) -> list[torch.Tensor]:
        return self.unet.encoder(images)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.encode(images)
        masks = self.unet.segmentation_head(self.unet.decoder(features, self.unet.skip_connect))
        return self.classifier(features[-1]), masks


class ClassificationOnly(nn.Module):
    """The classification output alone, for saliency methods that expect one output."""

    def __init__(self, network: DualOutputNet) -> None:
        super().__init__()
        self.network = network

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.network(images)[0]


def joint_loss(class_logits: torch.Tensor, mask_logits: torch.Tensor, classes: torch.Tensor,
               masks: torch.Tensor, *, class_weights: torch.Tensor | None = None,
               segmentation_weight: float = 1.0) -> torch.Tensor:
    """The classification's cross-entropy (``class_weights`` per class) plus
    ``segmentation_weight`` times the masks' Dice and cross-entropy (MONAI's ``DiceCELoss``
    on the three segments, one-hot from ``masks`` (B, 1, H, W) of 0/1/2)."""
    from monai.losses import DiceCELoss

    segmentation = DiceCELoss(to_onehot_y=True, softmax=True)(mask_logits, masks)
    return nn.functional.cross_entropy(class_logits, classes, weight=class_weights) + \
        segmentation_weight * segmentation
