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
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from monai.visualize import OcclusionSensitivity
from monai.visualize.visualizer import default_upsampler
from scipy import ndimage
from torch import nn

from radlens.models.cam import cam_from_activations
from radlens.models.networks import SegmentationNetwork
from radlens.tasks.breast_us.infer import BatchPrediction, Segmenter
from radlens.tasks.breast_us.preprocess import to_source

Method = Literal["gradcam", "gradcam++", "occlusion", "prototype"]
METHODS: tuple[Method, ...] = ("gradcam", "gradcam++", "occlusion", "prototype")
CAM_METHODS: tuple[Method, ...] = ("gradcam", "gradcam++")
CPU_GRAPH_BATCH = 2


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


def _normalise(values: torch.Tensor | np.ndarray) -> np.ndarray:
    array = values.detach().float().cpu().numpy() if isinstance(values, torch.Tensor) \
        else np.asarray(values, dtype=np.float32)
    low, high = float(array.min()), float(array.max())
    if high - low < 1e-12:
        return np.zeros_like(array, dtype=np.float32)
    return ((array - low) / (high - low)).astype(np.float32)


def _normalise_maps(maps: torch.Tensor) -> torch.Tensor:
    """Min-max normalisation of each (H, W) map of a (..., H, W) tensor, as ``_normalise``."""
    low = maps.amin(dim=(-2, -1), keepdim=True)
    span = maps.amax(dim=(-2, -1), keepdim=True) - low
    return torch.where(span < 1e-12, torch.zeros_like(maps), (maps - low) / span)


def _channel_norm(values: torch.Tensor) -> torch.Tensor:
    """(B, 1, h, w) Euclidean norm over the channels of (B, C, h, w). torch's own norm over a
    dimension that is not the innermost runs about 10x slower on the CPU."""
    return values.pow(2).sum(dim=1, keepdim=True).sqrt()


class SaliencyExplainer:
    """Saliency for one loaded model; ``explain`` runs the chosen methods on one image."""

    def __init__(self, segmenter: Segmenter, *, cam_layer: Literal["auto", "encoder"] = "auto",
                 occlusion_mask: int = 32, occlusion_batch: int = 16,
                 graph_batch: int | None = None) -> None:
        """``cam_layer``: "auto" is the network's own CAM layer (see SegmentationNetwork),
        "encoder" its last encoder stage. ``graph_batch``: images per forward pass that keeps
        Grad-CAM's graph; by default the inference batch on CUDA, and at most 2 on the CPU,
        where a batch of 2 runs as fast as 8 and a 120-frame clip peaks about 140 MB lower
        (the graph holds each image's full-resolution activations after the CAM layer)."""
        self.segmenter = segmenter
        self.graph_batch = graph_batch or (
            segmenter.batch_size if segmenter.device.type == "cuda"
            else min(segmenter.batch_size, CPU_GRAPH_BATCH))
        self.cam_layer = cam_layer
        self.occlusion_mask = occlusion_mask
        self.occlusion_batch = occlusion_batch

    def _to_source(self, values: torch.Tensor, size: tuple[int, int],
                   mode: str = "bilinear") -> torch.Tensor:
        """Maps from the network's input, or from a feature map's grid, (..., h, w), onto the
        source image, (..., H, W), through the model's preprocessing (its padding cut away)."""
        return to_source(values, size, self.segmenter.input_size,
                         self.segmenter.preprocessing, mode=mode)

    @property
    def target_layer(self) -> nn.Module:
        """The layer Grad-CAM explains."""
        network = self.segmenter.model
        return network.last_encoder_stage if self.cam_layer == "encoder" else network.cam_layer

    def pass_layer(self, methods: Sequence[Method]) -> nn.Module | None:
        """The ``cam_layer`` to run inference's pass with so that ``explain_pass`` can give
        ``methods`` from it: the target layer when a Grad-CAM method is among them."""
        return self.target_layer if set(methods) & set(CAM_METHODS) else None

    @staticmethod
    def _targets(logits: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
        """Each image's predicted lesion region (network size, (B, 1, h, w)) and the class to
        explain: the lesion class covering most of it."""
        probs = logits.detach().softmax(1)
        classes = probs.max(1).indices  # argmax over a leading dimension: max is 10x faster
        regions, targets = [], []
        for image_probs, image_classes in zip(probs, classes, strict=True):
            lesion = image_classes > 0
            if lesion.any():
                target = int(torch.bincount(image_classes[lesion], minlength=3)[1:].argmax()) + 1
            else:  # nothing predicted: explain the most confident lesion pixels instead
                target = int(image_probs[1:].flatten(1).max(1).values.argmax()) + 1
                lesion = image_probs[target] >= image_probs[target].flatten().quantile(0.99)
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
        """The chosen methods' maps of several images, from forward passes run for them (see
        ``explain_pass``)."""
        _check_methods(methods)
        maps: list[list[SaliencyMap]] = []
        layer = self.pass_layer(methods)
        batch = self.graph_batch if layer is not None else self.segmenter.batch_size
        for start in range(0, len(images), batch):
            chunk = images[start:start + batch]
            forward = self.segmenter.predict_batch(chunk, cam_layer=layer)
            maps += self.explain_pass(forward, range(len(chunk)),
                                      [tuple(np.asarray(image).shape[:2]) for image in chunk],
                                      methods)
            del forward
        return maps

    def explain_pass(self, forward: BatchPrediction, rows: Sequence[int],
                     sizes: Sequence[tuple[int, int]],
                     methods: Sequence[Method] = ("prototype", "gradcam++")
                     ) -> list[list[SaliencyMap]]:
        """The maps of some images of a forward pass already run (``rows`` of the batch, with
        their source ``sizes``). The targets and the prototype maps come from that pass, and
        so do Grad-CAM's: one backward pass from the images' class scores to the CAM layer, if
        the pass was run with ``cam_layer=self.pass_layer(methods)``. Occlusion runs its own
        passes."""
        _check_methods(methods)
        if not rows:
            return []
        index = torch.as_tensor(list(rows), device=forward.logits.device)
        # Outside inference mode, what index_select makes of the pass's tensors are ordinary
        # tensors that a backward pass may use.
        regions, targets = self._targets(forward.logits.detach().index_select(0, index))
        cam_methods = [method for method in methods if method in CAM_METHODS]
        cams = self._cams(forward, index, regions, targets, list(sizes), cam_methods) \
            if cam_methods else {}
        prototypes = self._prototypes([f.index_select(0, index) for f in forward.features],
                                      regions, targets, list(sizes), self._to_source) \
            if "prototype" in methods else []
        x = forward.inputs.index_select(0, index)
        maps = []
        for i, size in enumerate(sizes):
            per_image = []
            for method in methods:
                if method == "prototype":
                    per_image.append(prototypes[i])
                elif method == "occlusion":
                    per_image.append(self._occlusion(x[i:i + 1], regions[i:i + 1],
                                                     targets[i], size))
                else:
                    per_image.append(cams[method][i])
            maps.append(per_image)
        return maps

    def _cams(self, forward: BatchPrediction, index: torch.Tensor, regions: torch.Tensor,
              targets: list[int], sizes: list[tuple[int, int]], methods: list[Method]
              ) -> dict[Method, list[SaliencyMap]]:
        """Grad-CAM and Grad-CAM++ of the pass's ``index`` rows, each for its own target class.

        MONAI's CAMs run a forward pass of their own and score one class for a whole batch;
        this takes the activations and one backward pass from the pass at hand, with each
        image's score its target class's logits averaged over its region (``RegionScores``).
        The formulas are MONAI's (a test checks the maps equal its GradCAM and GradCAMpp).
        """
        if forward.cam_activation is None:
            raise ValueError("Grad-CAM needs a forward pass run with "
                             "cam_layer=SaliencyExplainer.pass_layer(methods)")
        with torch.enable_grad():
            logits = forward.logits.index_select(0, index)
            weight = regions.float() / regions.sum(dim=(2, 3), keepdim=True).clamp_min(1.0)
            chosen = logits[torch.arange(len(targets), device=logits.device),
                            torch.as_tensor(targets, device=logits.device)]
            scores = (chosen * weight[:, 0]).sum(dim=(1, 2))  # (n,)
            # Images are independent in eval mode: the gradient of the sum at each image's
            # activations is the gradient of that image's own score.
            (gradient,) = torch.autograd.grad(scores.sum(), forward.cam_activation,
                                              retain_graph=True)
        gradient = gradient.index_select(0, index)
        activation = forward.cam_activation.detach().index_select(0, index)
        upsample = default_upsampler(forward.inputs.shape[2:])
        out: dict[Method, list[SaliencyMap]] = {}
        for method in methods:
            raw = upsample(cam_from_activations(method, activation, gradient,
                                                scores.detach().reshape(-1, 1, 1, 1)))
            out[method] = [
                SaliencyMap(method, target, _normalise(_remove_floor(
                    self._to_source(raw[i, 0], sizes[i]).cpu().numpy(),
                    self._region_at_source(regions[i], sizes[i]))))
                for i, target in enumerate(targets)]
        return out

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
        raw = self._to_source(drop, size).detach().cpu().numpy()
        return SaliencyMap("occlusion", target, _normalise(_remove_floor(
            raw, self._region_at_source(region[0], size))))

    def _region_at_source(self, region: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
        """A (1, h, w) region of the network's input as a boolean mask of the source image."""
        return self._to_source(region.float().cpu(), size, mode="nearest")[0].numpy() > 0

    @staticmethod
    def _prototypes(features: list[torch.Tensor], regions: torch.Tensor, targets: list[int],
                    sizes: list[tuple[int, int]],
                    onto_source: Callable[[torch.Tensor, tuple[int, int]], torch.Tensor]
                    ) -> list[SaliencyMap]:
        """The prototype maps of a batch: at every depth the three stages of all its images at
        once, then each image's stages at its source size, averaged over the depths."""
        mask = regions.float()
        upsampled: list[list[torch.Tensor]] = [[] for _ in targets]  # per image, per depth
        for feature in features:
            feature = feature.float()
            energy = _channel_norm(feature)[:, 0]  # (n, h, w)
            fmap = feature / energy[:, None].clamp_min(1e-12)  # unit vectors, as F.normalize
            h, w = fmap.shape[-2:]
            inside = F.interpolate(mask, size=(h, w), mode="area")[:, 0]
            empty = inside.sum(dim=(1, 2)) < 1e-6
            if bool(empty.any()):
                spread = F.interpolate(mask, size=(h, w), mode="bilinear")[:, 0] + 1e-6
                inside = torch.where(empty[:, None, None], spread, inside)
            prototype = F.normalize((fmap * inside[:, None]).sum(dim=(2, 3))
                                    / inside.sum(dim=(1, 2))[:, None], dim=1)
            outside = (1 - F.max_pool2d(inside[:, None], 3, 1, 1)[:, 0]).clamp_min(0)
            background = F.normalize(
                (fmap * outside[:, None]).sum(dim=(2, 3))
                / outside.sum(dim=(1, 2)).clamp_min(1e-6)[:, None], dim=1)
            similarity = torch.einsum("nchw,nc->nhw", fmap, prototype)
            baseline = torch.einsum("nchw,nc->nhw", fmap, background)
            prior = _spatial_prior(inside)
            energy = energy / energy.amax(dim=(1, 2), keepdim=True).clamp_min(1e-9)
            stage1 = (similarity + 1) / 2  # broad: everything that looks like the lesion
            stage2 = stage1 * prior  # narrower: near the lesion
            stage3 = (similarity - baseline).clamp_min(0) * prior * energy  # sharp
            stages = torch.stack([stage1, stage2, stage3], dim=1)  # (n, 3, h, w)
            for i, size in enumerate(sizes):
                upsampled[i].append(_normalise_maps(onto_source(stages[i], size)))
        maps = []
        for per_depth, target in zip(upsampled, targets, strict=True):
            depths = torch.stack(per_depth)  # (depths, 3, H, W)
            stages = _normalise_maps(depths.mean(dim=0)).cpu().numpy()
            maps.append(SaliencyMap("prototype", target, stages[-1], stages=list(stages),
                                    per_depth=list(depths[:, 0].cpu().numpy())))
        return maps


def _check_methods(methods: Sequence[str]) -> None:
    unknown = set(methods) - set(METHODS)
    if unknown:
        raise ValueError(f"unknown saliency methods {sorted(unknown)} (known: {METHODS})")


def _remove_floor(values: np.ndarray, inside: np.ndarray) -> np.ndarray:
    """Subtract the map's typical level far from the explained region, clipping at zero.

    A CAM carries a spatially constant floor: channels that fire all over the image, weighted
    by the pooled gradient (Grad-CAM++ more than Grad-CAM, as its weights count every positive
    gradient alike). A constant says nothing about where the model looked, yet under min-max
    normalisation it spreads most of the map's mass over the whole frame. The floor is the
    median of the map outside the region (``inside``, at the map's size) grown by its own
    radius; with no such pixels (a region covering the frame) the map is left as it is.
    """
    if not inside.any():
        return values
    radius = max(math.sqrt(inside.sum() / math.pi), 1.0)
    away = ndimage.distance_transform_edt(~inside) > radius
    if not away.any():
        return values
    floor = float(np.median(values[away]))
    return np.clip(values - floor, 0.0, None)


def _spatial_prior(inside: torch.Tensor) -> torch.Tensor:
    """(n, h, w) Gaussians, each centred on its lesion and as wide as it (the prototype
    method's stage 2, docs/method.md), from the lesions' (n, h, w) coverage."""
    h, w = inside.shape[-2:]
    rows = torch.arange(h, device=inside.device, dtype=torch.float32)[:, None]
    columns = torch.arange(w, device=inside.device, dtype=torch.float32)[None, :]
    total = inside.sum(dim=(1, 2)).clamp_min(1e-6)
    cy = (inside * rows).sum(dim=(1, 2)) / total
    cx = (inside * columns).sum(dim=(1, 2)) / total
    sigma = (torch.sqrt(total / math.pi) * 1.5).clamp_min(1.0)
    distance = (rows - cy[:, None, None]) ** 2 + (columns - cx[:, None, None]) ** 2
    return torch.exp(-distance / (2 * sigma[:, None, None] ** 2))


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
