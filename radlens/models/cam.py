"""Class activation maps for every task: Grad-CAM and Grad-CAM++ from a forward pass a task has
already run, MONAI's Grad-CAM at a named convolutional layer, and Grad-CAM of a vision
transformer's patch tokens.

MONAI (``monai.visualize.GradCAM``, ``GradCAMpp``) runs a forward pass of its own and scores one
class for a whole batch. A task that has run its forward pass already (the lesion model scores
each image's own class over its own region) needs the same formulas on the activations and
gradients it holds; ``cam_from_activations`` is MONAI's ``compute_map`` on those tensors (a test
checks it equals MONAI's maps). MONAI's CAMs need an (N, C, H, W) feature map, which a vision
transformer does not have: ``token_gradcam`` lays its patch tokens out on their grid first.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from monai.visualize import GradCAM
from torch import nn

CamMethod = Literal["gradcam", "gradcam++"]
CAM_METHODS: tuple[CamMethod, ...] = ("gradcam", "gradcam++")


def cam_from_activations(method: CamMethod, activation: torch.Tensor, gradient: torch.Tensor,
                         score: torch.Tensor) -> torch.Tensor:
    """(B, 1, h, w) Grad-CAM or Grad-CAM++ at the layer's size, as MONAI computes them
    (``GradCAM.compute_map``, ``GradCAMpp.compute_map``): the activations weighted by the
    pooled gradient, or by Grad-CAM++'s alpha-weighted positive gradient. ``activation`` and
    ``gradient`` are (B, C, h, w); ``score`` is each image's scored logit, (B, 1, 1, 1)."""
    if method not in CAM_METHODS:
        raise ValueError(f"unknown CAM method {method!r} (known: {CAM_METHODS})")
    if activation.shape != gradient.shape or activation.dim() != 4:
        raise ValueError(f"activation {tuple(activation.shape)} and gradient "
                         f"{tuple(gradient.shape)} must be the same (B, C, h, w)")
    b, c = gradient.shape[:2]
    if method == "gradcam":
        weights = gradient.reshape(b, c, -1).mean(2).reshape(b, c, 1, 1)
    else:
        alpha_nr = gradient.pow(2)
        alpha_dr = alpha_nr.mul(2) + activation.mul(gradient.pow(3)).reshape(b, c, -1).sum(-1) \
            .reshape(b, c, 1, 1)
        alpha_dr = torch.where(alpha_dr != 0.0, alpha_dr, torch.ones_like(alpha_dr))
        alpha = alpha_nr.div(alpha_dr + 1e-7)
        relu_grad = F.relu(score.exp() * gradient)
        weights = (alpha * relu_grad).reshape(b, c, -1).sum(-1).reshape(b, c, 1, 1)
    return F.relu((weights * activation).sum(1, keepdim=True))


def monai_gradcam(model: nn.Module, batch: torch.Tensor, class_index: int,
                  target_layer: str) -> np.ndarray:
    """MONAI's Grad-CAM of the first image of ``batch`` at ``target_layer`` (a convolutional
    block's name), upsampled to the input and scaled to [0, 1], 1 where the model looked most.

    MONAI's default post-processing (``default_normalizer``) maps (min, max) to (1, 0), so its
    maps read inverted; this scales by the maximum instead, as ``token_gradcam`` does."""
    layer = model.get_submodule(target_layer)
    # MONAI registers its hooks without keeping the handles: remove the ones it adds, or
    # every explanation would leave two more on the model.
    before = (set(layer._forward_hooks), set(layer._backward_hooks))
    cam = GradCAM(nn_module=model, target_layers=target_layer, postprocessing=_scale_to_max)
    try:
        return cam(batch, class_idx=class_index)[0, 0].detach().cpu().numpy()
    finally:
        for hooks, kept in ((layer._forward_hooks, before[0]),
                            (layer._backward_hooks, before[1])):
            for key in set(hooks) - kept:
                del hooks[key]


def _scale_to_max(values: torch.Tensor) -> torch.Tensor:
    """(B, 1, H, W) non-negative maps, each divided by its maximum (an all-zero map stays 0)."""
    top = values.flatten(1).amax(1).reshape(-1, 1, 1, 1)
    return values / torch.where(top > 0, top, torch.ones_like(top))


def token_gradcam(model: nn.Module, block: nn.Module, grid: tuple[int, int],
                  batch: torch.Tensor, class_index: int) -> np.ndarray:
    """Grad-CAM of a vision transformer for the first image of ``batch``: ``block``'s patch
    tokens (the last ``grid[0] * grid[1]``, after any class token) laid out on their grid as
    the feature map, each weighted by its channels' mean gradient, upsampled to the input and
    scaled to [0, 1]. Batch-first (N, L, C) and sequence-first (L, N, C) blocks both work."""
    kept: dict[str, torch.Tensor] = {}

    def keep(_module: nn.Module, _inputs: object, output: torch.Tensor) -> None:
        output.retain_grad()
        kept["tokens"] = output

    handle = block.register_forward_hook(keep)
    try:
        model.zero_grad(set_to_none=True)
        logits = model(batch)
        logits[0, class_index].backward()
    finally:
        handle.remove()
    tokens = kept["tokens"]
    if tokens.shape[0] != batch.shape[0]:  # (L, N, C): a sequence-first transformer
        tokens = tokens.transpose(0, 1)
    patches = grid[0] * grid[1]
    if tokens.shape[1] < patches:
        raise ValueError(f"{tokens.shape[1]} tokens cannot fill a {grid[0]}x{grid[1]} grid")

    def on_grid(values: torch.Tensor) -> torch.Tensor:  # (L, C) -> (1, C, h, w)
        return values[-patches:].transpose(0, 1).reshape(1, -1, *grid)

    activation, gradient = on_grid(tokens[0].detach()), on_grid(tokens.grad[0])
    cam = cam_from_activations("gradcam", activation, gradient,
                               logits[0, class_index].detach().reshape(1, 1, 1, 1))
    cam = F.interpolate(cam, size=tuple(batch.shape[-2:]), mode="bilinear",
                        align_corners=False)[0, 0]
    top = float(cam.max())
    return (cam / top if top > 0 else cam).cpu().numpy()
