"""Breast ultrasound lesions: every frame of a B-mode image or clip segmented and classified
(normal, benign- or malignant-appearing), each lesion measured, saliency where the model looked.

The task's readings are a ``FrameReadings`` entry in each image's ``analyses`` in
``findings.json`` (per frame: class probabilities, lesions with their measurements, saliency
agreement), and its abstained frames ``abstained``. This package holds the whole task: its
phantoms (``phantoms``), dataset loader (``datasets``), training and evaluation (``train``,
``evaluate``, ``research``), inference and saliency (``infer``, ``saliency``), the agent's stage
(``analyser``), the maps it keeps (``analysed``), its part of the SR, SEG, maps, overlays, PDF
and narrative (``outputs``, ``seg``, ``sr``, ``report``) and its codes (``codes``). The network
architectures, metrics and the out-of-distribution detector are shared with other tasks
(``radlens.models``). Its card is the shipped ``default`` weights' ``card.json``, and
docs/breast_us.md tells its science.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import BaseModel

from radlens.errors import RadlensError
from radlens.findings import FrameReadings, StudyFindings
from radlens.logs import kv
from radlens.tasks.base import (
    SILENT,
    ImageOutputs,
    ImagePlans,
    NarrativePart,
    OutputContext,
    PdfTable,
    ResearchProgress,
    SrContent,
    Task,
    TaskError,
    TrainRequest,
)

if TYPE_CHECKING:
    from radlens.config import Settings
    from radlens.datasets.summary import DatasetSummary
    from radlens.dicom_io.writers.common import Equipment, SeriesPlan
    from radlens.tasks.breast_us.analyser import Analyser

log = logging.getLogger(__name__)

TASK_NAME = "breast_us"


class BreastUltrasoundTask(Task):
    """The lesion model, configured by the ``model`` section (and ``anatomy``, ``compute``)."""

    name: ClassVar[str] = TASK_NAME
    title: ClassVar[str] = "lesions in 2-D breast ultrasound (B-mode images and clips)"
    unit = "image"
    segments = True
    finding_type = FrameReadings
    prompt_guidance = (
        "For the lesions: (2) lesions: for each lesion, in order, a one- or two-sentence "
        "description using its measurements and five-level descriptors (1 very low .. 5 very "
        "high), naming it 'Lesion N'; (3) comparison: how the lesions compare by size, shape "
        "and margins (or 'single lesion' / 'no lesion'); (4) recommendation: the BI-RADS-style "
        "category of each lesion worded as an AI suggestion (normal maps to 1, benign to 2-3, "
        "malignant to 4-5).")

    def enabled(self, settings: Settings) -> bool:
        return settings.model.enabled

    def weights(self, settings: Settings) -> str:
        return settings.model.weights

    def load(self, settings: Settings, *, device: str) -> Analyser:
        """The segmenter (on Ray actors when ``compute.backend`` is ray), its explainer and
        the anatomy label map when one is configured."""
        from radlens.models.cards import ModelError
        from radlens.models.scope import ModelScope
        from radlens.tasks.breast_us.analyser import Analyser
        from radlens.tasks.breast_us.compute import load_segmenter

        on_ray = settings.compute.backend == "ray"
        try:
            # With the model stage on Ray this copy only answers what the worker asks of the
            # model itself (its card, scope, OOD threshold): the CPU is enough.
            segmenter = load_segmenter(settings.model, device="cpu" if on_ray else None)
        except (ModelError, ValueError) as exc:
            raise TaskError(f"cannot load model {settings.model.weights!r}: {exc}") from exc
        try:
            scope = ModelScope.from_card(segmenter.card)
        except ValueError as exc:
            raise TaskError(f"model {settings.model.weights!r}: invalid scope in its card: "
                            f"{exc}") from exc
        if scope is None:
            log.warning("the model's card states no scope: every image routing lets through "
                        "runs")
        if segmenter.ood is None and settings.model.abstain:
            log.warning("the model has no out-of-distribution detector: it cannot abstain "
                        "(radlens calibrate-ood builds one)")
        from radlens.tasks.breast_us.saliency import SaliencyExplainer

        anatomy = None
        if settings.anatomy.label_map is not None and settings.anatomy.names is not None:
            from radlens.analysis.nifti import LabelMap

            try:
                anatomy = LabelMap.load(settings.anatomy.label_map, settings.anatomy.names)
            except (OSError, ValueError, KeyError) as exc:
                raise RadlensError(f"cannot load anatomy label map: {exc}") from exc
            log.info("anatomy label map loaded", extra=kv(structures=len(anatomy.names),
                                                          grid=str(anatomy.labels.shape)))
        stage = None
        if on_ray:
            from radlens.tasks.breast_us.compute import RayModelStage

            stage = RayModelStage(settings.compute, settings.model, name=segmenter.name,
                                  version=segmenter.version)
        return Analyser(segmenter, settings.model, SaliencyExplainer(segmenter), anatomy,
                        stage)

    def write_phantoms(self, out: Path, *, n: int, seed: int, size: int | None, dicom: bool,
                       options: Mapping[str, Any], progress: ResearchProgress = SILENT) -> str:
        from radlens.tasks.breast_us import research

        return research.write_phantoms(out, n=n, seed=seed, size=size, dicom=dicom,
                                       progress=progress)

    def train(self, request: TrainRequest, progress: ResearchProgress = SILENT) -> str:
        from radlens.tasks.breast_us import research

        return research.train(request, progress)

    def export(self, model: str, out: Path) -> str:
        import torch

        from radlens.models.export import export_torchscript
        from radlens.tasks.breast_us.infer import Segmenter

        segmenter = Segmenter(model, device="cpu")
        rows, columns = segmenter.input_size
        return export_torchscript(segmenter.model.net, torch.zeros(1, 1, rows, columns),
                                  out, segmenter.card)

    def check_dataset(self, data: Path, *, layout: str | None = None) -> DatasetSummary:
        from radlens.tasks.breast_us import research

        return research.check_dataset(data, layout)

    def evaluate(self, data: Path, model: str, out: Path, *, device: str, seed: int,
                 options: Mapping[str, Any]) -> Path:
        from radlens.tasks.breast_us import research

        return research.evaluate(data, model, out, device=device, seed=seed,
                                 options=options)

    def code_modules(self) -> tuple[ModuleType, ...]:
        from radlens.tasks.breast_us import codes

        return (codes,)

    def model_line(self, findings: StudyFindings) -> str | None:
        if findings.model is None or not self.analysed(findings):
            return None
        return (f"{findings.model.name} {findings.model.version} "
                f"({findings.model.architecture})")

    def notes(self, findings: StudyFindings) -> list[str]:
        from radlens.tasks.breast_us import report

        return report.notes(findings)

    def segmentation_note(self, findings: StudyFindings) -> str | None:
        if self.analysed(findings) and not any(
                p.lesions for info in findings.images for p in info.predictions):
            return "No lesion was found, so no segmentation (SEG) was written."
        return None

    def pdf_sources(self, context: OutputContext) -> list[Any]:
        from radlens.tasks.breast_us import outputs

        return [image.header for image in outputs.analysed_images(context)]

    def segmentations(self, context: OutputContext, equipment: Equipment,
                      plan: SeriesPlan) -> list[Any]:
        from radlens.tasks.breast_us import outputs

        return outputs.segmentations(context, equipment, plan)

    def sr_content(self, context: OutputContext, segmentations: Sequence[Any] = ()
                   ) -> SrContent:
        from radlens.tasks.breast_us import outputs

        return outputs.sr_content(context, segmentations)

    def image_outputs(self, context: OutputContext, equipment: Equipment,
                      plans: ImagePlans) -> ImageOutputs:
        from radlens.tasks.breast_us import outputs

        return outputs.image_outputs(context, equipment, plans)

    def overlay_pngs(self, context: OutputContext, limit: int) -> list[bytes]:
        from radlens.tasks.breast_us import outputs

        return outputs.overlay_pngs(context, limit)

    def pdf_table(self, findings: StudyFindings) -> PdfTable | None:
        from radlens.tasks.breast_us import report

        return report.pdf_table(findings)

    def narrative(self, findings: StudyFindings) -> NarrativePart | None:
        from radlens.tasks.breast_us import report

        return report.narrative(findings)

    def facts(self, findings: StudyFindings) -> BaseModel | None:
        from radlens.tasks.breast_us import report

        return report.facts(findings)

    def grounding_numbers(self, facts: Mapping[str, Any]) -> set[float]:
        from radlens.tasks.breast_us import report

        return report.grounding_numbers(facts)

    def grounding_violations(self, text: str, facts: Mapping[str, Any] | None) -> list[str]:
        from radlens.tasks.breast_us import report

        return report.violations(text, facts)


TASK = BreastUltrasoundTask()
