"""Segmentation networks by name, all with one interface.

Every network maps (B, C, H, W) images to (B, 3, H, W) logits (background, benign, malignant) and
exposes its encoder's feature maps at three or more depths, shallow to deep, through
``SegmentationNetwork.features``; latent probing and saliency use that and nothing else.
MONAI supplies UNet, AttentionUnet and SegResNet; DeepLabV3 is an ASPP head over MONAI's ResNet
with atrous (dilated) last stages, since torchvision does not install beside the pinned torch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from monai.networks.layers.simplelayers import SkipConnection
from monai.networks.nets import AttentionUnet, ResNet, SegResNet, UNet
from monai.networks.nets.attentionunet import AttentionLayer
from torch import nn

NUM_CLASSES = 3
CLASS_NAMES = ("background", "benign", "malignant")


class SegmentationNetwork(nn.Module):
    """A network plus the encoder stages whose outputs ``features`` returns, and the layer
    Grad-CAM explains (``cam_layer``).

    For skip-connected U-shaped networks the CAM layer is the decoder block at half resolution:
    their encoder's deepest stage barely localises under Grad-CAM (measured on the shipped
    UNet by benchmarks/cam_layer.py: Dice with the lesion, median over 24 held-out phantoms,
    0.13 at the last encoder stage, 0.97 at that decoder block), because the skips carry the
    spatial detail around it. DeepLabV3's head reads its last
    encoder stage directly, which is therefore its CAM layer, as docs/method.md describes.
    """

    def __init__(self, name: str, net: nn.Module, stages: list[nn.Module],
                 cam_layer: nn.Module | None = None) -> None:
        super().__init__()
        if len(stages) < 3:
            raise ValueError(f"{name}: expected at least 3 encoder stages, found {len(stages)}")
        self.name = name
        self.net = net
        self._stages = stages  # plain lists: these modules are already registered inside ``net``
        self._cam_layer = [cam_layer if cam_layer is not None else stages[-1]]
        self._captured: list[torch.Tensor] | None = None
        for index, stage in enumerate(stages):
            stage.register_forward_hook(self._capture_hook(index))

    def _capture_hook(self, index: int) -> Callable:
        def hook(module: nn.Module, args: object, output: torch.Tensor) -> None:
            if self._captured is not None:
                self._captured[index] = output

        return hook

    @property
    def depth(self) -> int:
        return len(self._stages)

    @property
    def last_encoder_stage(self) -> nn.Module:
        return self._stages[-1]

    @property
    def cam_layer(self) -> nn.Module:
        return self._cam_layer[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def forward_with_features(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Logits and the encoder maps (shallow to deep) of one forward pass."""
        self._captured = [None] * len(self._stages)  # type: ignore[list-item]
        try:
            logits = self.net(x)
            features = list(self._captured)
        finally:
            self._captured = None
        return logits, features  # type: ignore[return-value]

    def forward_for_cam(self, x: torch.Tensor, layer: nn.Module
                        ) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
        """Logits, encoder maps and ``layer``'s output of one forward pass whose autograd graph
        starts at ``layer``'s input.

        Grad-CAM needs a class score's gradient at the CAM layer's output and nothing before
        it. Recording the graph from there on lets inference's own pass serve Grad-CAM (no
        second forward pass), and the backward pass then covers only the layers after the CAM
        layer. The weights get no gradient; their ``requires_grad`` is left as it is.
        """
        captured: list[torch.Tensor] = []

        def leaf_input(module: nn.Module, args: tuple[torch.Tensor, ...]
                       ) -> tuple[torch.Tensor, ...]:
            return (args[0].detach().requires_grad_(True), *args[1:])

        def keep_output(module: nn.Module, args: object, output: torch.Tensor) -> None:
            captured.append(output)

        trainable = [p for p in self.parameters() if p.requires_grad]
        for parameter in trainable:
            parameter.requires_grad_(False)
        handles = [layer.register_forward_pre_hook(leaf_input),
                   layer.register_forward_hook(keep_output)]
        try:
            with torch.enable_grad():
                logits, features = self.forward_with_features(x)
        finally:
            for handle in handles:
                handle.remove()
            for parameter in trainable:
                parameter.requires_grad_(True)
        if len(captured) != 1:
            raise RuntimeError(f"{self.name}: the CAM layer ran {len(captured)} times in one "
                               "forward pass; expected once")
        return logits, features, captured[0]

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.forward_with_features(x)[1]


def pooled_latents(features: list[torch.Tensor]) -> torch.Tensor:
    """One vector per image: the deepest encoder map, global-average pooled (latent probing)."""
    return features[-1].mean(dim=(2, 3))


def lesion_pooled_latents(features: list[torch.Tensor], lesion: torch.Tensor
                          ) -> torch.Tensor:
    """One vector per image: the deepest encoder map averaged inside the predicted lesion
    ((B, H, W) boolean, resized to the map); all zeros where no lesion was predicted."""
    deepest = features[-1]
    weight = F.interpolate(lesion[:, None].float(), size=deepest.shape[-2:], mode="area")
    total = weight.sum(dim=(2, 3))
    return (deepest * weight).sum(dim=(2, 3)) / total.clamp_min(1e-6)


def _unet_stages(net: UNet) -> list[nn.Module]:
    stages, level = [], net.model
    while True:
        stages.append(level[0])
        skip = level[1]
        if not isinstance(skip, SkipConnection):
            break
        inner = skip.submodule
        if isinstance(inner, nn.Sequential) and len(inner) == 3:
            level = inner
            continue
        stages.append(inner)  # the bottom of the U
        break
    return stages


def _attention_unet_stages(net: AttentionUnet) -> list[nn.Module]:
    stages = [net.model[0]]
    layer = net.model[1]
    while isinstance(layer, AttentionLayer):
        inner = layer.submodule
        stages.append(inner[0] if isinstance(inner, nn.Sequential) else inner)
        layer = inner[1] if isinstance(inner, nn.Sequential) and len(inner) > 1 else None
    return stages


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling (DeepLabV3): parallel dilated convolutions plus image
    pooling, concatenated and projected."""

    def __init__(self, in_channels: int, out_channels: int = 128,
                 dilations: tuple[int, ...] = (6, 12, 18)) -> None:
        super().__init__()

        def branch(kernel: int, dilation: int) -> nn.Sequential:
            padding = 0 if kernel == 1 else dilation
            return nn.Sequential(
                nn.Conv2d(in_channels, out_channels, kernel, padding=padding, dilation=dilation,
                          bias=False),
                nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True))

        self.branches = nn.ModuleList([branch(1, 1)] + [branch(3, d) for d in dilations])
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1),
                                  nn.Conv2d(in_channels, out_channels, 1, bias=False),
                                  nn.ReLU(inplace=True))
        self.project = nn.Sequential(
            nn.Conv2d(out_channels * (len(self.branches) + 1), out_channels, 1, bias=False),
            nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True), nn.Dropout(0.1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = F.interpolate(self.pool(x), size=x.shape[-2:], mode="bilinear",
                               align_corners=False)
        return self.project(torch.cat([b(x) for b in self.branches] + [pooled], dim=1))


class DeepLabV3(nn.Module):
    """ResNet encoder at output stride 8 (layer3, layer4 dilated) + ASPP + bilinear upsampling."""

    def __init__(self, in_channels: int = 1, num_classes: int = NUM_CLASSES,
                 layers: tuple[int, ...] = (2, 2, 2, 2), width: int = 64) -> None:
        super().__init__()
        planes = [width, width * 2, width * 4, width * 8]
        self.encoder = ResNet("basic", list(layers), planes, spatial_dims=2,
                              n_input_channels=in_channels, conv1_t_size=7, conv1_t_stride=2,
                              num_classes=1, feed_forward=False)
        _dilate(self.encoder.layer3, 2)
        _dilate(self.encoder.layer4, 4)
        self.head = nn.Sequential(ASPP(planes[3]),
                                  nn.Conv2d(128, 128, 3, padding=1, bias=False),
                                  nn.BatchNorm2d(128), nn.ReLU(inplace=True),
                                  nn.Conv2d(128, num_classes, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e = self.encoder
        y = e.maxpool(e.act(e.bn1(e.conv1(x))))
        y = e.layer4(e.layer3(e.layer2(e.layer1(y))))
        return F.interpolate(self.head(y), size=x.shape[-2:], mode="bilinear",
                             align_corners=False)


def _dilate(layer: nn.Module, dilation: int) -> None:
    """Replace the stage's stride by dilation (torchvision's replace_stride_with_dilation)."""
    for module in layer.modules():
        if isinstance(module, nn.Conv2d):
            if module.stride == (2, 2):
                module.stride = (1, 1)
            if module.kernel_size == (3, 3):
                module.dilation = (dilation, dilation)
                module.padding = (dilation, dilation)


@dataclass(frozen=True)
class Architecture:
    name: str
    description: str
    build: Callable[[int], SegmentationNetwork]


def _unet(in_channels: int) -> SegmentationNetwork:
    net = UNet(spatial_dims=2, in_channels=in_channels, out_channels=NUM_CLASSES,
               channels=(16, 32, 64, 128, 256), strides=(2, 2, 2, 2), num_res_units=2,
               norm="batch")
    return SegmentationNetwork("unet", net, _unet_stages(net),
                               cam_layer=net.model[1].submodule[2])


def _attention_unet(in_channels: int) -> SegmentationNetwork:
    net = AttentionUnet(spatial_dims=2, in_channels=in_channels, out_channels=NUM_CLASSES,
                        channels=(16, 32, 64, 128, 256), strides=(2, 2, 2, 2))
    return SegmentationNetwork("attention_unet", net, _attention_unet_stages(net),
                               cam_layer=net.model[1].submodule[1])


def _segresnet(in_channels: int) -> SegmentationNetwork:
    net = SegResNet(spatial_dims=2, init_filters=16, in_channels=in_channels,
                    out_channels=NUM_CLASSES, blocks_down=(1, 2, 2, 4), blocks_up=(1, 1, 1))
    return SegmentationNetwork("segresnet", net, list(net.down_layers),
                               cam_layer=net.up_layers[-2])


def _deeplabv3(in_channels: int) -> SegmentationNetwork:
    net = DeepLabV3(in_channels=in_channels)
    e = net.encoder
    return SegmentationNetwork("deeplabv3", net, [e.layer1, e.layer2, e.layer3, e.layer4])


REGISTRY: dict[str, Architecture] = {
    a.name: a for a in (
        Architecture("unet", "MONAI UNet, residual units, 5 levels (16-256 channels)", _unet),
        Architecture("attention_unet", "MONAI AttentionUnet, attention-gated skips, 5 levels",
                     _attention_unet),
        Architecture("segresnet", "MONAI SegResNet, 4 down stages from 16 filters", _segresnet),
        Architecture("deeplabv3", "DeepLabV3: ResNet-18 encoder (atrous layer3/4) + ASPP",
                     _deeplabv3),
    )
}


def build(name: str, *, in_channels: int = 1) -> SegmentationNetwork:
    try:
        architecture = REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown architecture {name!r} (known: {', '.join(REGISTRY)})") from None
    return architecture.build(in_channels)


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
