"""Melanoma on dermoscopy: a lesion mask refined in two stages, its ABC(D) features measured
on the mask, a ViT image encoder aligned with those features, a melanoma probability and a
report whose every number and descriptor comes from the findings.

Built so far: the phantoms (``phantoms``, ``dicom``), the fixed descriptor list
(``descriptors``) and the ABC(D) features with their severity levels (``features``). The
network, training, evaluation and the agent's stage follow; until a model exists the task is
disabled in the configuration and refuses to load with the reason. The method and figures
are in docs/dermoscopy.md.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from radlens.tasks.base import SILENT, ResearchProgress, Task, TaskError, TrainRequest

if TYPE_CHECKING:
    from radlens.config import Settings
    from radlens.tasks.base import LoadedTask

TASK_NAME = "dermoscopy"


class DermoscopyTask(Task):
    """The melanoma model, configured by the ``dermoscopy`` section."""

    name: ClassVar[str] = TASK_NAME
    title: ClassVar[str] = "melanoma on dermoscopic photographs"
    unit = "image"

    def enabled(self, settings: Settings) -> bool:
        return settings.dermoscopy.enabled

    def weights(self, settings: Settings) -> str:
        return settings.dermoscopy.weights

    def load(self, settings: Settings, *, device: str) -> LoadedTask:
        raise TaskError("the dermoscopy task has no model in this version of radlens (its "
                        "phantoms and ABC features are built; the classifier is not): set "
                        "dermoscopy.enabled to false")

    def write_phantoms(self, out: Path, *, n: int, seed: int, size: int | None, dicom: bool,
                       options: Mapping[str, Any], progress: ResearchProgress = SILENT) -> str:
        from radlens.tasks.dermoscopy import research

        return research.write_phantoms(out, n=n, seed=seed, size=size, dicom=dicom,
                                       visits=int(options.get("visits") or 1),
                                       progress=progress)

    def train(self, request: TrainRequest, progress: ResearchProgress = SILENT) -> str:
        from radlens.tasks.dermoscopy import research

        return research.train(request, progress)

    def evaluate(self, data: Path, model: str, out: Path, *, device: str, seed: int,
                 options: Mapping[str, Any]) -> Path:
        from radlens.tasks.dermoscopy import research

        return research.evaluate(data, model, out, device=device, seed=seed,
                                 progress=SILENT)


TASK = DermoscopyTask()
