"""The shared CAM code: a vision transformer's token Grad-CAM is MONAI's Grad-CAM once the
tokens are laid out on their grid, and MONAI's hooks do not pile up on a model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.visualize import GradCAM
from torch import nn

from radlens.models.cam import cam_from_activations, monai_gradcam, token_gradcam


class Tokens(nn.Module):
    """(N, C, h, w) -> (N, 1 + h*w, C): a class token then the patch tokens, row by row."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        patches = x.flatten(2).transpose(1, 2)
        return torch.cat([patches.mean(1, keepdim=True), patches], dim=1)


class TinyViTLike(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.ReLU(),
                                      nn.Conv2d(6, 8, 4, stride=4))
        self.tokens = Tokens()
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.tokens(self.features(x))[:, 1:].mean(1))


def _min_max(values: np.ndarray) -> np.ndarray:
    return (values - values.min()) / (values.max() - values.min())


def test_token_gradcam_is_monai_gradcam_on_the_token_grid() -> None:
    torch.manual_seed(0)
    model = TinyViTLike().eval()
    batch = torch.rand(1, 1, 32, 32)
    ours = token_gradcam(model, model.tokens, (8, 8), batch, class_index=2)
    reference = GradCAM(nn_module=model, target_layers="features.2",
                        postprocessing=lambda values: values)(batch, class_idx=2)
    assert ours.shape == (32, 32)
    assert ours.max() == pytest.approx(1.0)
    np.testing.assert_allclose(_min_max(ours), _min_max(reference[0, 0].detach().numpy()),
                               atol=1e-5)


def test_token_gradcam_refuses_a_grid_its_tokens_cannot_fill() -> None:
    model = TinyViTLike().eval()
    with pytest.raises(ValueError, match="cannot fill"):
        token_gradcam(model, model.tokens, (9, 9), torch.rand(1, 1, 32, 32), class_index=0)


def test_monai_gradcam_is_high_where_the_model_looked_and_leaves_no_hooks_behind() -> None:
    """MONAI's default post-processing flips its maps (min to 1, max to 0); ours must not."""
    torch.manual_seed(0)
    model = TinyViTLike().eval()
    layer = model.get_submodule("features.2")
    batch = torch.rand(1, 1, 32, 32)
    for _ in range(3):
        cam = monai_gradcam(model, batch, 1, "features.2")
    raw = GradCAM(nn_module=model, target_layers="features.2",
                  postprocessing=lambda values: values)(batch, class_idx=1)[0, 0].detach().numpy()
    layer._forward_hooks.clear()
    layer._backward_hooks.clear()
    assert cam.shape == (32, 32) and cam.min() >= 0.0 and cam.max() == pytest.approx(1.0)
    np.testing.assert_allclose(cam, raw / raw.max(), atol=1e-6)
    assert np.unravel_index(cam.argmax(), cam.shape) == np.unravel_index(raw.argmax(), raw.shape)
    model = TinyViTLike().eval()  # a fresh model: no hook was left on it by monai_gradcam
    monai_gradcam(model, batch, 1, "features.2")
    layer = model.get_submodule("features.2")
    assert not layer._forward_hooks and not layer._backward_hooks


def test_cam_from_activations_refuses_mismatched_tensors_and_unknown_methods() -> None:
    activation = torch.rand(2, 4, 5, 5)
    with pytest.raises(ValueError, match="same"):
        cam_from_activations("gradcam", activation, torch.rand(2, 4, 5, 6), torch.ones(2, 1, 1, 1))
    with pytest.raises(ValueError, match="unknown CAM method"):
        cam_from_activations("scorecam", activation, activation, torch.ones(2, 1, 1, 1))
