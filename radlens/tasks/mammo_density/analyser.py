"""The breast density task's model in a worker: what it makes of a mammogram routing sent it.

The model reads one image at a time (a mammogram is one frame): its out-of-distribution score
first, so that it abstains on images unlike its training ones, then the category with its
probabilities and Grad-CAM, mapped back onto the mammogram, with the share of attention on
breast tissue, artifacts and background. The Grad-CAM map is kept in the study's maps folder
for the overlay and the PDF. The stage runs in the worker's process, on the lesion model's
device; the model is 5 MB and one view costs a fraction of a second on a CPU.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from pydicom.dataset import Dataset

from radlens.config import DensitySettings
from radlens.findings import DecodedImage, ImageInfo, ModelRef
from radlens.logs import kv
from radlens.tasks.base import ImageInput, LoadedTask, Task, TaskResult, abstained_image
from radlens.tasks.mammo_density.findings import AttentionShares, DensityPrediction
from radlens.timing import StageTimes

if TYPE_CHECKING:
    from radlens.models.ood import OodDetector
    from radlens.tasks.mammo_density.model import DensityModel

log = logging.getLogger(__name__)


def image_laterality(ds: Dataset) -> str | None:
    """ImageLaterality, else the series' Laterality: L or R (B and U say nothing of one side)."""
    for keyword in ("ImageLaterality", "Laterality"):
        value = str(ds.get(keyword, "") or "").strip().upper()
        if value in ("L", "R"):
            return value
    return None


def view_position(ds: Dataset) -> str | None:
    value = str(ds.get("ViewPosition", "") or "").strip().upper()
    return value or None


@dataclass(frozen=True)
class DensityAnalyser(LoadedTask):
    """A loaded density model, its card, its OOD detector and the settings it runs under."""

    model: DensityModel
    card: dict[str, Any]
    ood: OodDetector | None
    settings: DensitySettings
    task: Task

    @property
    def ood_threshold(self) -> float | None:
        return self.ood.threshold if self.ood is not None else None

    def analyse_image(self, image: ImageInput, maps_dir: Path | None,
                      times: StageTimes) -> TaskResult:
        with times.stage("density"):
            return TaskResult([self.analyse(image.decoded, image.header, maps_dir)])

    @property
    def model_ref(self) -> ModelRef:
        return ModelRef(name=str(self.card.get("name", "radlens-density")),
                        version=str(self.card.get("version", "unknown")),
                        architecture=str(self.card.get("architecture", "DensityCLIP")),
                        training_data=self.card.get("training_data"))

    @property
    def size(self) -> int:
        return int(self.card.get("input_size", 224))

    def _stated(self, probabilities: dict[str, float]) -> dict[str, float]:
        """The category probabilities the card's calibration measured (temperature scaling
        fitted at training; the category, their arg-max, does not change); a card without a
        calibration states them as the network gives them."""
        from radlens.models.calibration import apply_temperature, card_temperature

        temperature = card_temperature(self.card)
        if temperature == 1.0:
            return probabilities
        names = list(probabilities)
        scaled = apply_temperature(np.array([[probabilities[n] for n in names]]), temperature)
        return {name: float(value) for name, value in zip(names, scaled[0], strict=True)}

    @classmethod
    def load(cls, settings: DensitySettings, task: Task, *,
             device: str = "cpu") -> DensityAnalyser:
        """The configured density model. Raises ModelError when it cannot be loaded or its
        version is not the pinned one."""
        from radlens.models.cards import ModelError, model_folder
        from radlens.models.ood import OodDetector
        from radlens.tasks.mammo_density.train import DensityDataError, load_model

        folder = model_folder(settings.weights)
        try:
            model, card = load_model(folder, device)
        # RuntimeError: open_clip cannot load a fine-tuned CLIP folder
        except (DensityDataError, OSError, RuntimeError, KeyError) as exc:
            raise ModelError(f"cannot load the density model from {folder}: {exc}") from exc
        if settings.version is not None and card.get("version") != settings.version:
            raise ModelError(f"density model {folder} is version {card.get('version')!r}, "
                             f"not the pinned {settings.version!r}")
        ood = OodDetector.load(folder) if settings.abstain else None
        return cls(model, card, ood, settings, task)

    def analyse(self, decoded: DecodedImage, header: Dataset,
                maps_dir: Path | None) -> ImageInfo:
        """The image's density reading, or why it has none (abstained)."""
        import torch

        from radlens.tasks.mammo_density.model import breast_region, not_a_mammogram, prepare
        from radlens.tasks.mammo_density.saliency import explain

        info = decoded.info
        frame = decoded.pixels[0]
        image = frame.mean(axis=-1) if frame.shape[-1] == 3 else frame[..., 0]
        breast = breast_region(image)  # found once: the checks, the crop and the shares
        refusal = not_a_mammogram(image, breast)
        if refusal is not None:
            log.info("image does not look like a mammogram: no category",
                     extra=kv(sop=info.ref.sop_instance_uid, reason=refusal))
            return info.model_copy(update={
                "not_analysed": f"not like a mammogram: {refusal}"})
        prepared = prepare(image, self.size, region=breast)
        ood_score = None
        if self.ood is not None:
            device = next(self.model.parameters()).device
            with torch.no_grad():
                features = self.model.pooled_features(
                    torch.from_numpy(prepared.pixels)[None, None].to(device)).cpu().numpy()
            ood_score = float(self.ood.score(features)[0])
            abstained = abstained_image(info, ood_score, self.ood.threshold, "density",
                                        "mammogram")
            if abstained is not None:
                return abstained
        explanation = explain(self.model, image, size=self.size, prepared=prepared,
                              breast=breast)
        shares = AttentionShares(**{k: round(min(max(v, 0.0), 1.0), 4)
                                    for k, v in explanation.shares.items()})
        maps_file = None
        if maps_dir is not None:
            maps_file = _write_map(maps_dir, info.ref.sop_instance_uid, explanation.cam)
        reading = DensityPrediction(
            model=self.model_ref, category=explanation.category,  # type: ignore[arg-type]
            probabilities={c: round(p, 4) for c, p in self._stated(
                explanation.probabilities).items()},
            laterality=image_laterality(header),  # type: ignore[arg-type]
            view=view_position(header), attention=shares,
            attention_on_artifact=shares.tissue < self.settings.low_tissue_share,
            ood_score=round(ood_score, 3) if ood_score is not None else None,
            maps_file=maps_file)
        if reading.attention_on_artifact:
            log.warning("density attention on artifacts", extra=kv(
                sop=info.ref.sop_instance_uid, tissue_share=shares.tissue,
                artifacts_share=shares.artifacts))
        return info.model_copy(update={"analyses": [*info.analyses, reading]})


def _write_map(maps_dir: Path, sop_uid: str, cam: np.ndarray) -> str:
    """The Grad-CAM map of a mammogram, as the lesion model's maps are kept."""
    from radlens.agent.maps import MAPS_DIR, npz_bytes
    from radlens.dicom_io.spool import write_durably

    maps_dir.mkdir(parents=True, exist_ok=True)
    name = f"{sop_uid}_density.npz"
    write_durably(maps_dir / name, npz_bytes({"saliency_gradcam": cam.astype(np.float16)}),
                  fsync=False)
    return f"{MAPS_DIR}/{name}"
