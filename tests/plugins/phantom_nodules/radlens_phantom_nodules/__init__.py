"""Nodules on (phantom) thyroid ultrasound: a site's own segmentation model as a radlens task.

The smallest complete task: a card (``weights/card.json``: name, version, scope), weights
(``weights/model.pt``, a state dict loaded with ``weights_only=True``), a network, and a
``LoadedTask`` that turns each frame into a label map. Everything else (SEG, SR measurements,
PDF table, narrative, grounding) comes from ``radlens.tasks.labelmap.LabelMapTask``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from radlens.findings import ModelRef
from radlens.models.cards import read_card
from radlens.tasks.base import ImageInput, LoadedTask, TaskError, TaskResult
from radlens.tasks.labelmap import (
    LabelMapReading,
    LabelMapTask,
    label_stats,
    write_label_map,
)
from radlens.tasks.labels import LabelCode, LabelDefinition
from radlens.timing import StageTimes

WEIGHTS = Path(__file__).with_name("weights")
INPUT_SIZE = 64


def network() -> Any:
    """The architecture the weights were trained with (MONAI's UNet)."""
    from monai.networks.nets import UNet

    return UNet(spatial_dims=2, in_channels=1, out_channels=2, channels=(8, 16, 32),
                strides=(2, 2), num_res_units=0)


class PhantomNodulesTask(LabelMapTask):
    name = "phantom_nodules"
    title = "Nodules on thyroid ultrasound"
    unit = "image"
    labels = (LabelDefinition(value=1, name="nodule",
                              code=LabelCode(value="52988006", scheme="SCT", meaning="Lesion")),)

    def weights(self, settings: Any) -> str:
        return str(WEIGHTS)

    def card(self, settings: Any = None) -> dict[str, Any]:
        return read_card(WEIGHTS)

    def load(self, settings: Any, *, device: str) -> LoadedNodules:
        import torch

        try:
            net = network()
            net.load_state_dict(torch.load(WEIGHTS / "model.pt", map_location=device,
                                           weights_only=True))
        except (OSError, RuntimeError) as exc:
            raise TaskError(f"{self.name}: cannot load {WEIGHTS / 'model.pt'}: {exc}") from exc
        return LoadedNodules(self, net.to(device).eval(), self.card(), device)


class LoadedNodules(LoadedTask):
    def __init__(self, task: PhantomNodulesTask, net: Any, card: dict[str, Any],
                 device: str) -> None:
        self.task, self.net, self.card, self.device = task, net, card, device

    @property
    def model_ref(self) -> ModelRef:
        return ModelRef(name=self.card["name"], version=self.card["version"],
                        architecture=self.card["architecture"])

    def _frame_labels(self, frame: np.ndarray) -> np.ndarray:
        import torch
        import torch.nn.functional as F

        low, high = float(frame.min()), float(frame.max())
        scaled = (frame - low) / (high - low) if high > low else np.zeros_like(frame)
        tensor = torch.from_numpy(scaled.astype(np.float32))[None, None].to(self.device)
        with torch.inference_mode():
            logits = self.net(F.interpolate(tensor, size=(INPUT_SIZE, INPUT_SIZE),
                                            mode="bilinear", align_corners=False))
            labels = F.interpolate(logits.argmax(1, keepdim=True).float(), size=frame.shape,
                                   mode="nearest")
        return labels[0, 0].cpu().numpy().astype(np.uint8)

    def analyse_image(self, image: ImageInput, maps_dir: Path | None,
                      times: StageTimes) -> TaskResult:
        info = image.info
        pixels = image.decoded.pixels
        grey = pixels.mean(axis=-1) if pixels.shape[-1] == 3 else pixels[..., 0]
        with times.stage(self.task.name):
            labels = np.stack([self._frame_labels(frame) for frame in grey])
        spacing = (info.spacing.row_mm, info.spacing.column_mm) if info.spacing else None
        stats = label_stats(labels, self.task.labels, pixel_mm=spacing)
        maps_file = (write_label_map(maps_dir, f"{info.ref.sop_instance_uid}_{self.task.name}",
                                     labels) if maps_dir is not None and stats else None)
        reading = LabelMapReading(task=self.task.name, model=self.model_ref, labels=stats,
                                  maps_file=maps_file)
        return TaskResult([info.model_copy(update={"analyses": [*info.analyses, reading]})])


TASK = PhantomNodulesTask()
