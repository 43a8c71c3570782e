"""The dermoscopy task's model in a worker: what it makes of a photograph routing sent it.

One photograph at a time: the plausibility check first (``scope.not_a_dermoscopic_photograph``)
and the out-of-distribution score (the Mahalanobis distance of the ViT's pooled feature), so
that it abstains on images unlike its training ones; then the model's one ``analyse`` (coarse
mask, refinement, ABC(D) features and levels, melanoma probability as stated, descriptors),
Grad-CAM of the stated class with its share on the lesion, and the lesion mask and the map
kept in the study's maps folder for the SEG, the overlay and the PDF. The site, side and
lesion identifier come from the header, for the change since a prior visit.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from pydicom.dataset import Dataset

from radlens.config import DermoscopySettings, PriorVisitSettings
from radlens.findings import DecodedImage, ImageInfo, ModelRef
from radlens.logs import kv
from radlens.tasks.base import ImageInput, LoadedTask, Task, TaskResult, abstained_image
from radlens.tasks.dermoscopy.findings import (
    AbcMeasurements,
    DermoscopyReading,
    RetrievedDescriptor,
)
from radlens.timing import StageTimes

if TYPE_CHECKING:
    from radlens.models.ood import OodDetector
    from radlens.tasks.dermoscopy.model import DermoscopyModel

log = logging.getLogger(__name__)

ISOTROPY_TOLERANCE = 0.02  # row and column spacing this close count as one spacing


def square_spacing(info: ImageInfo) -> float | None:
    """The pixel spacing in mm when the header states one and rows and columns share it
    (within 2 %); None otherwise: the features are then stated in pixels only."""
    spacing = info.spacing
    if spacing is None:
        return None
    row, column = spacing.row_mm, spacing.column_mm
    if abs(row - column) > ISOTROPY_TOLERANCE * max(row, column):
        return None
    return float(np.sqrt(row * column))


def lesion_identity(header: Dataset, rule: PriorVisitSettings
                    ) -> tuple[str | None, str | None, str | None]:
    """(site, laterality, lesion identifier) as the header states them: the anatomic
    region's meaning, Laterality or ImageLaterality (L or R), and the lesion's identifier as
    the first group of the rule's ``lesion_id_pattern`` in its ``lesion_id_attribute`` (by
    default "lesion 2" in the series description, as the phantoms and many capture systems
    write it)."""
    import re

    site = None
    regions = header.get("AnatomicRegionSequence")
    if regions:
        site = str(getattr(regions[0], "CodeMeaning", "") or "") or None
    laterality = None
    for keyword in ("ImageLaterality", "Laterality"):
        value = str(header.get(keyword, "") or "").strip().upper()
        if value in ("L", "R"):
            laterality = value
            break
    found = re.search(rule.lesion_id_pattern, str(header.get(rule.lesion_id_attribute, "") or ""),
                      re.IGNORECASE)
    return site, laterality, found.group(1) if found else None


def lesion_key(settings: PriorVisitSettings, site: str | None, laterality: str | None,
               lesion_id: str | None) -> str | None:
    """The lesion as every study of the patient names it, by the site's matching rule; None
    when the header lacks a part the rule needs (no side is a value: the back has none)."""
    if not settings.enabled:
        return None
    parts = {"site": (site or "").strip().lower() or None, "laterality": laterality or "none",
             "lesion_id": (lesion_id or "").strip().lower() or None}
    if any(parts[name] is None for name in settings.match_on):
        return None
    return "|".join(f"{name}={parts[name]}" for name in settings.match_on)


@dataclass(frozen=True)
class DermoscopyAnalyser(LoadedTask):
    """A loaded dermoscopy model, its card, its OOD detector and the settings it runs under."""

    model: DermoscopyModel
    card: dict[str, Any]
    ood: OodDetector | None
    settings: DermoscopySettings
    task: Task
    device: str = "cpu"

    @property
    def ood_threshold(self) -> float | None:
        return self.ood.threshold if self.ood is not None else None

    @property
    def model_ref(self) -> ModelRef:
        return ModelRef(name=str(self.card.get("name", "radlens-dermoscopy")),
                        version=str(self.card.get("version", "unknown")),
                        architecture=str(self.card.get("architecture", "")),
                        training_data=self.card.get("training_data"))

    @classmethod
    def load(cls, settings: DermoscopySettings, task: Task, *,
             device: str = "cpu") -> DermoscopyAnalyser:
        """The configured model. Raises ModelError when it cannot be loaded, its version is
        not the pinned one, or its refiner cannot be."""
        from radlens.models.cards import ModelError, model_folder, read_card
        from radlens.models.ood import OodDetector
        from radlens.tasks.dermoscopy.model import DermoscopyModel
        from radlens.tasks.dermoscopy.refine import RefinerError, Sam2Refiner

        folder = model_folder(settings.weights)
        card = read_card(folder)
        if settings.version is not None and card.get("version") != settings.version:
            raise ModelError(f"dermoscopy model {folder} is version {card.get('version')!r}, "
                             f"not the pinned {settings.version!r}")
        try:
            refiner = (Sam2Refiner(settings.sam2, device=device) if settings.sam2 is not None
                       else None)
            model = DermoscopyModel.load(folder, card=card, device=device, refiner=refiner)
        except (RefinerError, OSError, RuntimeError, KeyError) as exc:
            raise ModelError(f"cannot load the dermoscopy model from {folder}: {exc}") from exc
        ood = OodDetector.load(folder) if settings.abstain else None
        return cls(model, card, ood, settings, task, device)

    def analyse_image(self, image: ImageInput, maps_dir: Path | None,
                      times: StageTimes) -> TaskResult:
        with times.stage("dermoscopy"):
            return TaskResult([self.analyse(image.decoded, image.header, maps_dir)])

    def analyse(self, decoded: DecodedImage, header: Dataset,
                maps_dir: Path | None) -> ImageInfo:
        """The photograph's reading, or why it has none (refused or abstained)."""
        from radlens.tasks.dermoscopy.saliency import explain
        from radlens.tasks.dermoscopy.scope import not_a_dermoscopic_photograph
        from radlens.tasks.dermoscopy.segment import prepare_rgb

        info = decoded.info
        if info.channels != 3:
            return info.model_copy(update={"not_analysed": "not a colour photograph"})
        image = np.clip(decoded.pixels[0], 0, 255).round().astype(np.uint8)
        refusal = not_a_dermoscopic_photograph(image)
        if refusal is not None:
            log.info("image does not look like a dermoscopic photograph: no reading",
                     extra=kv(sop=info.ref.sop_instance_uid, reason=refusal))
            return info.model_copy(update={
                "not_analysed": f"not like a dermoscopic photograph: {refusal}"})
        ood_score = None
        if self.ood is not None:
            _, pooled = self.model.classify(prepare_rgb(image, self.model.shape.image_size)[None])
            ood_score = float(self.ood.score(pooled)[0])
            abstained = abstained_image(info, ood_score, self.ood.threshold, "dermoscopy",
                                        "photograph")
            if abstained is not None:
                return abstained
        spacing = square_spacing(info)
        analysis = self.model.analyse(image, spacing)
        melanoma = analysis.probability >= 0.5
        explanation = explain(self.model.classifier, image, analysis.refined.mask,
                              melanoma=melanoma, device=self.device)
        measurements = None
        if analysis.features is not None:
            f = analysis.features
            measurements = AbcMeasurements(
                asymmetry=round(f.asymmetry, 4),
                asymmetry_axes=(round(f.asymmetry_axes[0], 4), round(f.asymmetry_axes[1], 4)),
                border_per_mm=None if f.border_per_mm is None else round(f.border_per_mm, 4),
                border_per_pixel=round(f.border_per_px, 5),
                border_turns=round(f.border_turns, 3), hue_sd=round(f.hue_sd, 4),
                saturation_sd=round(f.saturation_sd, 4), value_sd=round(f.value_sd, 4),
                colour_score=round(f.colour, 4),
                diameter_mm=None if f.diameter_mm is None else round(f.diameter_mm, 2),
                area_mm2=None if spacing is None else round(f.area_px * spacing ** 2, 2),
                levels=analysis.levels)
        maps_file = None
        if maps_dir is not None:
            maps_file = _write_maps(maps_dir, info.ref.sop_instance_uid,
                                    analysis.refined.mask, explanation.cam)
        prior = self.settings.prior
        site, laterality, lesion_id = lesion_identity(header, prior)
        reading = DermoscopyReading(
            model=self.model_ref, melanoma_probability=round(analysis.probability, 4),
            assessment="melanoma" if melanoma else "nevus", measurements=measurements,
            measurement_note=analysis.feature_error,
            descriptors=[RetrievedDescriptor(
                name=name, similarity=round(analysis.descriptor_similarity[name], 4),
                probability=round(analysis.descriptor_probability[name], 4))
                for name in analysis.descriptors],
            refined=analysis.refined.kept, refinement_note=analysis.refined.note or None,
            refiner=analysis.refined.refiner, lesion_pixels=int(analysis.refined.mask.sum()),
            alignment=None if analysis.alignment is None else round(analysis.alignment, 4),
            attention_on_lesion=round(explanation.lesion_share, 4),
            ood_score=None if ood_score is None else round(ood_score, 3), site=site,
            laterality=laterality, lesion_id=lesion_id,  # type: ignore[arg-type]
            lesion_key=lesion_key(prior, site, laterality, lesion_id),
            maps_file=maps_file)
        return info.model_copy(update={"analyses": [*info.analyses, reading]})


def _write_maps(maps_dir: Path, sop_uid: str, mask: np.ndarray, cam: np.ndarray) -> str:
    """The lesion mask and the Grad-CAM map, kept as the other tasks keep their maps."""
    from radlens.agent.maps import MAPS_DIR, npz_bytes
    from radlens.dicom_io.spool import write_durably

    maps_dir.mkdir(parents=True, exist_ok=True)
    name = f"{sop_uid}_dermoscopy.npz"
    write_durably(maps_dir / name, npz_bytes({"lesion_mask": mask.astype(np.uint8),
                                              "saliency_gradcam": cam.astype(np.float16)}),
                  fsync=False)
    return f"{MAPS_DIR}/{name}"
