"""Where the model looked: Grad-CAM, Grad-CAM++, occlusion and gradient-free prototype similarity.

Every method returns a float map in [0, 1] at the source image's size. A segmentation network has
no single class logit, so the gradient and occlusion methods see it through ``RegionScores``: the
logits of each class summed over the predicted lesion region (docs/method.md). Prototype
similarity (docs/method.md) needs no gradient: at every encoder depth it compares each feature
vector with the lesion's mean feature (the prototype), in three stages that narrow from broad
similarity to a sharp map. These maps show what the model attends to, not whether it is right.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from monai.visualize import GradCAM, GradCAMpp, OcclusionSensitivity
from scipy import ndimage
from torch import nn

from radlens.models.infer import BatchPrediction, Segmenter
from radlens.models.networks import SegmentationNetwork

Method = Literal["gradcam", "gradcam++", "occlusion", "prototype"]
CPU_CAM_BATCH = 2
METHODS: tuple[Method, ...] = ("gradcam", "gradcam++", "occlusion", "prototype")


@dataclass(frozen=True)
class SaliencyMap:
    method: Method
    target_class: int  # 1 benign, 2 malignant
    map: np.ndarray  # (H, W) float32 in [0, 1], source size
    stages: list[np.ndarray] = field(default_factory=list)  # prototype: stage 1, 2, 3
    per_depth: list[np.ndarray] = field(default_factory=list)  # prototype stage 1, each depth


@dataclass(frozen=True)
class Agreement:
    """How well a saliency map and the predicted mask agree."""

    dice: float  # map thresholded at the adaptive percentile vs the mask
    mass_inside: float  # share of the map's total value inside the mask
    threshold: float


class RegionScores(nn.Module):
    """(B, 3) scores: each class's logits summed over a fixed region, so that Grad-CAM and
    occlusion have one number per class to explain."""

    def __init__(self, network: SegmentationNetwork, region: torch.Tensor) -> None:
        super().__init__()
        self.network = network
        self.register_buffer("region", region.float())  # (1, 1, h, w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.network(x)
        weight = self.region / self.region.sum(dim=(2, 3), keepdim=True).clamp_min(1.0)
        return (logits * weight).sum(dim=(2, 3))  # each image over its own region


def _identity(values: torch.Tensor) -> torch.Tensor:
    return values


def _normalise(values: torch.Tensor | np.ndarray) -> np.ndarray:
    array = values.detach().float().cpu().numpy() if isinstance(values, torch.Tensor) \
        else np.asarray(values, dtype=np.float32)
    low, high = float(array.min()), float(array.max())
    if high - low < 1e-12:
        return np.zeros_like(array, dtype=np.float32)
    return ((array - low) / (high - low)).astype(np.float32)


def _to_source(values: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(h, w) or (1, 1, h, w) tensor -> (H, W) at the source size, bilinear."""
    tensor = values.float().reshape(1, 1, *values.shape[-2:])
    return F.interpolate(tensor, size=size, mode="bilinear", align_corners=False)[0, 0]


def _module_name(root: nn.Module, target: nn.Module) -> str:
    for name, module in root.named_modules():
        if module is target:
            return name
    raise ValueError("target layer is not part of the model")


class SaliencyExplainer:
    """Saliency for one loaded model; ``explain`` runs the chosen methods on one image."""

    def __init__(self, segmenter: Segmenter, *, cam_layer: Literal["auto", "encoder"] = "auto",
                 occlusion_mask: int = 32, occlusion_batch: int = 16,
                 cam_batch: int | None = None) -> None:
        """``cam_layer``: "auto" is the network's own CAM layer (see SegmentationNetwork),
        "encoder" its last encoder stage. ``cam_batch``: images per Grad-CAM forward and
        backward pass; by default the inference batch on CUDA, and at most 2 on the CPU: with
        the backward pass reaching back only to the CAM layer, 2 is as fast as 4 on 2 cores and
        a batch of 8 frames' saliency peaks about 70 MB lower (a forward pass holds every
        image's activations at once)."""
        self.segmenter = segmenter
        self.cam_batch = cam_batch or (segmenter.batch_size if segmenter.device.type == "cuda"
                                       else min(segmenter.batch_size, CPU_CAM_BATCH))
        self.cam_layer = cam_layer
        self.occlusion_mask = occlusion_mask
        self.occlusion_batch = occlusion_batch
        self._cam_cache: dict[Method, tuple[GradCAM, RegionScores, nn.Module]] = {}

    @staticmethod
    def _targets(logits: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
        """Each image's predicted lesion region (network size, (B, 1, h, w)) and the class to
        explain: the lesion class covering most of it."""
        regions, targets = [], []
        for probs in logits.softmax(1):
            classes = probs.argmax(0)
            lesion = classes > 0
            if lesion.any():
                target = int(torch.bincount(classes[lesion], minlength=3)[1:].argmax()) + 1
            else:  # nothing predicted: explain the most confident lesion pixels instead
                target = int(probs[1:].flatten(1).max(1).values.argmax()) + 1
                lesion = probs[target] >= probs[target].flatten().quantile(0.99)
            regions.append(lesion)
            targets.append(target)
        return torch.stack(regions)[:, None], targets

    def explain(self, image: np.ndarray, methods: Sequence[Method] = ("prototype", "gradcam++")
                ) -> list[SaliencyMap]:
        """The chosen methods' maps of one image."""
        return self.explain_batch([image], methods)[0]

    def explain_batch(self, images: Sequence[np.ndarray],
                      methods: Sequence[Method] = ("prototype", "gradcam++")
                      ) -> list[list[SaliencyMap]]:
        """The chosen methods' maps of several images, computed in batches of the model's
        batch size (see ``explain_pass``)."""
        _check_methods(methods)
        maps: list[list[SaliencyMap]] = []
        batch = self.segmenter.batch_size
        for start in range(0, len(images), batch):
            chunk = images[start:start + batch]
            maps += self.explain_pass(self.segmenter.predict_batch(chunk), range(len(chunk)),
                                      [tuple(np.asarray(image).shape[:2]) for image in chunk],
                                      methods)
        return maps

    def explain_pass(self, forward: BatchPrediction, rows: Sequence[int],
                     sizes: Sequence[tuple[int, int]],
                     methods: Sequence[Method] = ("prototype", "gradcam++")
                     ) -> list[list[SaliencyMap]]:
        """The maps of some images of a forward pass already run (``rows`` of the batch, with
        their source ``sizes``): the targets and the prototype maps come from that pass; each
        Grad-CAM method adds one forward and backward pass per target class (MONAI scores one
        class for a whole batch). Same maps as image by image, at a fraction of the cost."""
        _check_methods(methods)
        if not rows:
            return []
        index = torch.as_tensor(list(rows), device=forward.logits.device)
        # Outside inference mode, what index_select makes of the pass's tensors are ordinary
        # tensors that a backward pass may use.
        x = forward.inputs.index_select(0, index)
        features = [f.index_select(0, index) for f in forward.features]
        regions, targets = self._targets(forward.logits.index_select(0, index))
        cams = {method: self._cams(method, x, regions, targets, list(sizes))
                for method in methods if method in ("gradcam", "gradcam++")}
        maps = []
        for i, size in enumerate(sizes):
            per_image = []
            for method in methods:
                if method == "prototype":
                    per_image.append(self._prototype([f[i:i + 1] for f in features],
                                                     regions[i:i + 1], targets[i], size))
                elif method == "occlusion":
                    per_image.append(self._occlusion(x[i:i + 1], regions[i:i + 1],
                                                     targets[i], size))
                else:
                    per_image.append(cams[method][i])
            maps.append(per_image)
        return maps

    def _cams(self, method: Method, x: torch.Tensor, regions: torch.Tensor,
              targets: list[int], sizes: list[tuple[int, int]]) -> list[SaliencyMap]:
        """One CAM per image, batched over the images that share a target class."""
        out: list[SaliencyMap | None] = [None] * len(targets)
        for target in sorted(set(targets)):
            same_class = [i for i, t in enumerate(targets) if t == target]
            for start in range(0, len(same_class), self.cam_batch):
                group = same_class[start:start + self.cam_batch]
                raw = self._cam_maps(method, x[group], regions[group], target)
                for row, i in enumerate(group):
                    source = _to_source(raw[row, 0], sizes[i]).detach().cpu().numpy()
                    out[i] = SaliencyMap(method, target, _normalise(
                        _remove_floor(source, regions[i:i + 1], sizes[i])))
        return [m for m in out if m is not None]

    def _cam_maps(self, method: Method, x: torch.Tensor, regions: torch.Tensor, target: int
                  ) -> torch.Tensor:
        """(B, 1, h, w) raw Grad-CAM or Grad-CAM++ of a batch explained for one class."""
        cam, wrapper, target_layer = self._cam(method)
        wrapper.region = regions.float().to(x.device)
        with torch.enable_grad(), _graph_from(target_layer, self.segmenter.model):
            return cam(x.detach(), class_idx=target)

    def _cam(self, method: Method) -> tuple[GradCAM, RegionScores, nn.Module]:
        """The MONAI CAM of ``method``, built once: MONAI registers its hooks on the network's
        layer at construction and never removes them, so a CAM per call would pile up hooks
        that every later forward pass runs (and keep each call's activations alive)."""
        if method not in self._cam_cache:
            network = self.segmenter.model
            target_layer = (network.last_encoder_stage if self.cam_layer == "encoder"
                            else network.cam_layer)
            device = self.segmenter.device
            wrapper = RegionScores(network, torch.zeros(1, 1, 1, 1)).to(device).eval()
            cam_class = GradCAMpp if method == "gradcam++" else GradCAM
            # MONAI's default post-processing maps (min, max) to (1, 0), flipping the map; keep
            # the raw map and normalise it here instead.
            cam = cam_class(nn_module=wrapper, target_layers=_module_name(wrapper, target_layer),
                            postprocessing=_identity)
            cam.nn_module.class_score = _per_sample_score
            self._cam_cache[method] = (cam, wrapper, target_layer)
        return self._cam_cache[method]

    def _occlusion(self, x: torch.Tensor, region: torch.Tensor, target: int,
                   size: tuple[int, int]) -> SaliencyMap:
        wrapper = RegionScores(self.segmenter.model, region).to(x.device).eval()
        occlusion = OcclusionSensitivity(nn_module=wrapper, mask_size=self.occlusion_mask,
                                         n_batch=self.occlusion_batch, verbose=False,
                                         mode="mean_img", overlap=0.5, activate=False)
        with torch.inference_mode():
            sensitivity, _ = occlusion(x)
            baseline = wrapper(x)[0, target]
        drop = (baseline - sensitivity[0, target]).clamp_min(0)  # score lost when hidden
        raw = _to_source(drop, size).detach().cpu().numpy()
        return SaliencyMap("occlusion", target, _normalise(_remove_floor(raw, region, size)))

    def _prototype(self, features: list[torch.Tensor], region: torch.Tensor, target: int,
                   size: tuple[int, int]) -> SaliencyMap:
        stage1_depths, stage2_depths, stage3_depths = [], [], []
        mask = region.float()
        for feature in features:
            fmap = F.normalize(feature[0].float(), dim=0)  # (C, h, w), unit vectors
            h, w = fmap.shape[-2:]
            inside = F.interpolate(mask, size=(h, w), mode="area")[0, 0]
            if inside.sum() < 1e-6:
                inside = F.interpolate(mask, size=(h, w), mode="bilinear")[0, 0] + 1e-6
            prototype = F.normalize((fmap * inside).sum((1, 2)) / inside.sum(), dim=0)
            outside = (1 - F.max_pool2d(inside[None, None], 3, 1, 1)[0, 0]).clamp_min(0)
            background = F.normalize((fmap * outside).sum((1, 2)) / outside.sum().clamp_min(1e-6),
                                     dim=0)
            similarity = torch.einsum("chw,c->hw", fmap, prototype)
            baseline = torch.einsum("chw,c->hw", fmap, background)
            prior = _spatial_prior(inside)
            energy = feature[0].float().norm(dim=0)
            energy = energy / energy.max().clamp_min(1e-9)
            stage1 = (similarity + 1) / 2  # broad: everything that looks like the lesion
            stage2 = stage1 * prior  # narrower: near the lesion
            stage3 = (similarity - baseline).clamp_min(0) * prior * energy  # sharp
            for depth_list, stage in ((stage1_depths, stage1), (stage2_depths, stage2),
                                      (stage3_depths, stage3)):
                depth_list.append(_normalise(_to_source(stage, size)))
        stages = [_normalise(np.mean(depths, axis=0))
                  for depths in (stage1_depths, stage2_depths, stage3_depths)]
        return SaliencyMap("prototype", target, stages[-1], stages=stages,
                           per_depth=stage1_depths)


@contextmanager
def _graph_from(layer: nn.Module, network: nn.Module) -> Iterator[None]:
    """Within the block, autograd records the network only from ``layer`` on.

    Grad-CAM needs the class score's gradient at the CAM layer's output, nothing before it. A
    graph from the input through every layer (and gradients for every weight) costs a full
    backward pass and a batch's activations at every depth; with the weights frozen and the
    layer's input made a leaf, the backward pass covers the layers after it alone. The maps
    are the same.
    """
    trainable = [p for p in network.parameters() if p.requires_grad]
    for parameter in trainable:
        parameter.requires_grad_(False)

    def leaf_input(module: nn.Module, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        return (args[0].detach().requires_grad_(True), *args[1:])

    handle = layer.register_forward_pre_hook(leaf_input)
    try:
        yield
    finally:
        handle.remove()
        for parameter in trainable:
            parameter.requires_grad_(True)


def _check_methods(methods: Sequence[str]) -> None:
    unknown = set(methods) - set(METHODS)
    if unknown:
        raise ValueError(f"unknown saliency methods {sorted(unknown)} (known: {METHODS})")


def _per_sample_score(logits: torch.Tensor, class_idx: int) -> torch.Tensor:
    """(B, 1, 1, 1) scores of one class. MONAI's own ``class_score`` squeezes them to (B,),
    which its Grad-CAM++ then multiplies into the (B, C, h, w) gradients: broadcast along the
    last spatial axis, wrong (or an error) for any batch of more than one image."""
    return logits[:, class_idx].reshape(-1, 1, 1, 1)


def _remove_floor(values: np.ndarray, region: torch.Tensor, size: tuple[int, int]
                  ) -> np.ndarray:
    """Subtract the map's typical level far from the explained region, clipping at zero.

    A CAM carries a spatially constant floor: channels that fire all over the image, weighted
    by the pooled gradient (Grad-CAM++ more than Grad-CAM, as its weights count every positive
    gradient alike). A constant says nothing about where the model looked, yet under min-max
    normalisation it spreads most of the map's mass over the whole frame. The floor is the
    median of the map outside the region grown by its own radius; with no such pixels (a
    region covering the frame) the map is left as it is.
    """
    inside = F.interpolate(region.float().cpu(), size=size, mode="nearest")[0, 0].numpy() > 0
    if not inside.any():
        return values
    radius = max(math.sqrt(inside.sum() / math.pi), 1.0)
    away = ndimage.distance_transform_edt(~inside) > radius
    if not away.any():
        return values
    floor = float(np.median(values[away]))
    return np.clip(values - floor, 0.0, None)


def _spatial_prior(inside: torch.Tensor) -> torch.Tensor:
    """A Gaussian centred on the lesion, as wide as the lesion (the prototype method's stage
    2, docs/method.md)."""
    h, w = inside.shape
    rows = torch.arange(h, device=inside.device, dtype=torch.float32)[:, None]
    columns = torch.arange(w, device=inside.device, dtype=torch.float32)[None, :]
    total = inside.sum().clamp_min(1e-6)
    cy, cx = (inside * rows).sum() / total, (inside * columns).sum() / total
    radius = math.sqrt(float(total) / math.pi)
    sigma = max(radius * 1.5, 1.0)
    return torch.exp(-((rows - cy) ** 2 + (columns - cx) ** 2) / (2 * sigma ** 2))


def agreement(saliency: np.ndarray, mask: np.ndarray) -> Agreement:
    """Dice between the mask and the map thresholded at an adaptive percentile (the one that
    keeps as many pixels as the mask has, at least 1 % of the image), and the share of the map's
    mass inside the mask."""
    mask = np.asarray(mask, dtype=bool)
    keep = max(mask.mean(), 0.01)
    threshold = float(np.quantile(saliency, 1 - keep))
    hot = saliency >= threshold
    denominator = hot.sum() + mask.sum()
    dice = float(2 * (hot & mask).sum() / denominator) if denominator else 0.0
    total = float(saliency.sum())
    inside = float(saliency[mask].sum()) / total if total > 0 else 0.0
    return Agreement(dice=dice, mass_inside=inside, threshold=threshold)
