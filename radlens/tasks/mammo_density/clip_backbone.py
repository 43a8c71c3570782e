"""A user's own pretrained CLIP (BiomedCLIP, or any open_clip model) as the density model.

Users who have biomedical CLIP weights on disk start from them instead of radlens's small
encoders: ``radlens train --task density --clip DIR`` fine-tunes the model in ``DIR`` (an
open_clip folder: ``open_clip_config.json`` and ``open_clip_pytorch_model.bin`` or
``open_clip_model.safetensors``, the layout of BiomedCLIP's published folder) with the same
weighted contrastive loss, and the trained model is saved as an open_clip folder of its own
(``clip/`` beside ``card.json``). Nothing is downloaded: open_clip reads the local folder
(its ``local-dir:`` schema). A text tower that names a Hugging Face tokenizer needs that
tokenizer in the local Hugging Face cache.

open_clip needs torchvision, which must match the installed torch (on a CPU machine,
PyTorch's CPU index has the matching wheel): ``pip install 'radlens[clip]'``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from radlens.tasks.mammo_density.model import DENSITY_CLASSES, DESCRIPTIONS

CONFIG_FILE = "open_clip_config.json"
WEIGHT_FILES = ("open_clip_pytorch_model.bin", "open_clip_model.safetensors")
CLIP_DIR = "clip"
# CLIP's image normalisation, when the folder's preprocess_cfg states none
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


class ClipUnavailableError(RuntimeError):
    """open_clip (or the torchvision it needs) cannot be imported, or the folder is not one."""


def import_open_clip() -> Any:
    try:
        import open_clip
    except Exception as exc:  # ImportError, or torchvision failing beside this torch
        raise ClipUnavailableError(
            "loading CLIP weights needs open_clip and a torchvision built for the installed "
            f"torch ({type(exc).__name__}: {exc}); pip install 'radlens[clip]', with the "
            "torchvision wheel matching your torch (on a CPU machine, from PyTorch's CPU "
            "index)") from exc
    return open_clip


def is_clip_folder(folder: Path) -> bool:
    return (folder / CONFIG_FILE).is_file() and any((folder / n).is_file() for n in WEIGHT_FILES)


class OpenClipDensity(nn.Module):
    """open_clip's image and text towers, scoring a mammogram against the four BI-RADS
    descriptions: the same interface as radlens's own ``DensityCLIP``."""

    def __init__(self, clip: nn.Module, tokenizer: Any, config: dict[str, Any]) -> None:
        super().__init__()
        self.clip = clip
        self.config = config
        preprocess = config.get("preprocess_cfg", {})
        mean = preprocess.get("mean", OPENAI_MEAN)
        std = preprocess.get("std", OPENAI_STD)
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        size = getattr(clip.visual, "image_size", 224)
        self.image_size = int(size[0] if isinstance(size, (tuple, list)) else size)
        self.register_buffer("prompt_ids", tokenizer([DESCRIPTIONS[c] for c in DENSITY_CLASSES]),
                             persistent=False)

    @property
    def cam_layer(self) -> str | None:
        """A convolutional last block Grad-CAM can hook (a ResNet tower), else None: a
        transformer's token grid is explained by ``token_grid`` instead."""
        return "clip.visual.layer4" if hasattr(self.clip.visual, "layer4") else None

    @property
    def token_block(self) -> nn.Module | None:
        """The last block's first norm: its patch tokens still feed the class token the
        tower pools (the last block's own output reaches the embedding only through its class
        token, so its patch tokens have no gradient)."""
        transformer = getattr(self.clip.visual, "transformer", None)
        blocks = getattr(transformer, "resblocks", None)
        if blocks is None:
            return None
        return getattr(blocks[-1], "ln_1", blocks[-1])

    @property
    def token_grid(self) -> tuple[int, int] | None:
        grid = getattr(self.clip.visual, "grid_size", None)
        return (int(grid[0]), int(grid[1])) if grid is not None else None

    def _pixels(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 1, H, W) in 0..1 to the tower's RGB input, normalised as it was trained."""
        if images.shape[-1] != self.image_size or images.shape[-2] != self.image_size:
            images = F.interpolate(images, size=(self.image_size, self.image_size),
                                   mode="bilinear", align_corners=False)
        return (images.expand(-1, 3, -1, -1) - self.mean) / self.std

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.clip.encode_image(self._pixels(images)), dim=-1)

    def pooled_features(self, images: torch.Tensor) -> torch.Tensor:
        """The image tower's embedding before normalisation: what the OOD score measures."""
        return self.clip.encode_image(self._pixels(images))

    def forward(self, images: torch.Tensor, token_ids: torch.Tensor | None = None
                ) -> torch.Tensor:
        texts = F.normalize(self.clip.encode_text(
            self.prompt_ids if token_ids is None else token_ids), dim=-1)
        scale = self.clip.logit_scale.clamp(max=float(np.log(100.0))).exp()
        return scale * self.encode_images(images) @ texts.t()

    def save(self, folder: Path) -> Path:
        """The fine-tuned model as an open_clip folder (config and weights)."""
        folder.mkdir(parents=True, exist_ok=True)
        (folder / CONFIG_FILE).write_text(json.dumps(self.config, indent=2) + "\n")
        torch.save(self.clip.state_dict(), folder / WEIGHT_FILES[0])
        return folder


def load_open_clip(folder: Path, device: torch.device | str = "cpu") -> OpenClipDensity:
    """The open_clip model in ``folder``, wrapped for density. Raises ClipUnavailableError."""
    folder = Path(folder).resolve()
    if not is_clip_folder(folder):
        raise ClipUnavailableError(f"{folder} is not an open_clip folder (it needs {CONFIG_FILE} "
                                   f"and one of {', '.join(WEIGHT_FILES)})")
    open_clip = import_open_clip()
    config = json.loads((folder / CONFIG_FILE).read_text())
    name = f"{open_clip.factory.LOCAL_DIR_PREFIX}{folder}"
    try:
        clip, _ = open_clip.create_model_from_pretrained(name, device="cpu")
        tokenizer = open_clip.get_tokenizer(name)
    except Exception as exc:  # a broken config, weights of another shape, a missing tokenizer
        raise ClipUnavailableError(f"open_clip cannot load {folder}: {type(exc).__name__}: "
                                   f"{exc}") from exc
    return OpenClipDensity(clip, tokenizer, config).to(device)
