"""Breast density on mammograms: the BI-RADS breast composition (A-D) of each 2-D mammogram,
per breast and for the study, with Grad-CAM and the share of its attention on breast tissue.

Everything of the task is in this package: phantoms (``phantoms``, ``dicom``), the network
(``model``), training and evaluation (``train``), explanation (``saliency``), the agent's
stage (``analyser``), its findings (``findings``), codes (``codes``) and its part of the
study's answer (``report``). Its card is the shipped ``density`` weights' ``card.json``; the
method and figures are in docs/mammo_density.md.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import BaseModel

from radlens.findings import StudyFindings, TaskSummary
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
from radlens.tasks.mammo_density import report
from radlens.tasks.mammo_density.findings import TASK_NAME, BreastDensity, DensityPrediction

if TYPE_CHECKING:
    from collections.abc import Sequence

    from radlens.config import Settings
    from radlens.datasets.summary import DatasetSummary
    from radlens.dicom_io.writers.common import Equipment
    from radlens.tasks.mammo_density.analyser import DensityAnalyser


class MammoDensityTask(Task):
    """The breast density model, configured by the ``density`` section."""

    name: ClassVar[str] = TASK_NAME
    title: ClassVar[str] = "BI-RADS breast density of 2-D mammograms"
    unit = "image"
    finding_type = DensityPrediction
    summary_type = BreastDensity
    prompt_guidance = report.PROMPT_GUIDANCE

    def enabled(self, settings: Settings) -> bool:
        return settings.density.enabled

    def weights(self, settings: Settings) -> str:
        return settings.density.weights

    def load(self, settings: Settings, *, device: str) -> DensityAnalyser:
        from radlens.models.cards import ModelError
        from radlens.tasks.mammo_density.analyser import DensityAnalyser

        try:
            loaded = DensityAnalyser.load(settings.density, self, device=device)
        except (ModelError, ValueError) as exc:
            raise TaskError(f"cannot load density model {settings.density.weights!r}: {exc}"
                            ) from exc
        if loaded.scope is None:
            raise TaskError(f"cannot load density model {settings.density.weights!r}: its "
                            "card states no scope")
        return loaded

    def write_phantoms(self, out: Path, *, n: int, seed: int, size: int | None, dicom: bool,
                       options: Mapping[str, Any], progress: ResearchProgress = SILENT) -> str:
        from radlens.tasks.mammo_density import research

        return research.write_phantoms(out, n=n, seed=seed, size=size, dicom=dicom,
                                       tomosynthesis=bool(options.get("tomosynthesis", False)),
                                       progress=progress)

    def train(self, request: TrainRequest, progress: ResearchProgress = SILENT) -> str:
        from radlens.tasks.mammo_density import research

        return research.train(request, progress)

    def export(self, model: str, out: Path) -> str:
        import torch

        from radlens.models.cards import model_folder
        from radlens.models.export import export_torchscript
        from radlens.tasks.mammo_density.train import load_model

        network, card = load_model(model_folder("density" if model == "default" else model))
        size = int(card.get("input_size") or 224)
        return export_torchscript(network, torch.zeros(1, 1, size, size), out, card)

    def check_dataset(self, data: Path, *, layout: str | None = None) -> DatasetSummary:
        from radlens.tasks.mammo_density import research

        return research.check_dataset(data, layout)

    def evaluate(self, data: Path, model: str, out: Path, *, device: str, seed: int,
                 options: Mapping[str, Any]) -> Path:
        from radlens.tasks.mammo_density import research

        return research.evaluate(data, model, out, device=device,
                                 options=options)

    def code_modules(self) -> tuple[ModuleType, ...]:
        from radlens.tasks.mammo_density import codes

        return (codes,)

    def summarise(self, readings: list[Any]) -> TaskSummary | None:
        return BreastDensity.of(readings)

    def status_counts(self, findings: StudyFindings) -> dict[str, int]:
        counts: dict[str, int] = {}
        for _, _, reading in report.readings_of(findings):
            key = f"mammograms, density {reading.category}"
            counts[key] = counts.get(key, 0) + 1
        return counts

    def notes(self, findings: StudyFindings) -> list[str]:
        return report.notes(findings)

    def sr_content(self, context: OutputContext, segmentations: Sequence[Any] = ()
                   ) -> SrContent:
        return report.sr_content(context, self.summary(context.findings))

    def image_outputs(self, context: OutputContext, equipment: Equipment,
                      plans: ImagePlans) -> ImageOutputs:
        with context.times.stage("overlay"):
            return report.image_outputs(context, plans)

    def pdf_table(self, findings: StudyFindings) -> PdfTable | None:
        return report.pdf_table(findings, self.summary(findings))

    def narrative(self, findings: StudyFindings) -> NarrativePart | None:
        return report.narrative(findings, self.summary(findings))

    def facts(self, findings: StudyFindings) -> BaseModel | None:
        return report.facts(findings, self.summary(findings))

    def grounding_numbers(self, facts: Mapping[str, Any]) -> set[float]:
        return report.grounding_numbers(facts)

    def grounding_violations(self, text: str, facts: Mapping[str, Any] | None) -> list[str]:
        return report.violations(text, facts)

    def named_sides(self, facts: Mapping[str, Any]) -> frozenset[str]:
        return report.named_sides(facts)


TASK = MammoDensityTask()
