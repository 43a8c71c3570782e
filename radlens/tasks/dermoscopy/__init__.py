"""Melanoma on dermoscopy: a lesion mask refined in two stages, its ABC(D) features measured
on the mask, a ViT image encoder aligned with those features, a melanoma probability and a
report whose every number and descriptor comes from the findings.

Everything of the task is in this package: phantoms (``phantoms``, ``dicom``), the
descriptor list (``descriptors``), the ABC(D) features (``features``), the two segmentation
stages (``segment``, ``refine``), the classifier (``classifier``), the model as one object
(``model``), training and evaluation (``train``, ``evaluate``, ``research``), the scope and
plausibility check (``scope``), explanation (``saliency``), its findings (``findings``), the
change since the patient's prior visit of a lesion (``prior``) and
the agent's stage (``analyser``) and its part of the study's answer: SEG, SR, overlay, PDF,
narrative and its grounding (``report``, ``codes``). A model trained on phantoms ships
(``weights/dermoscopy``); it misses two of its targets, so the task is off by default. The
method and figures are in docs/dermoscopy.md.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from radlens.tasks.base import SILENT, ResearchProgress, Task, TaskError, TrainRequest
from radlens.tasks.dermoscopy.findings import TASK_NAME, DermoscopyReading
from radlens.tasks.dermoscopy.report import PROMPT_GUIDANCE

if TYPE_CHECKING:
    from collections.abc import Sequence
    from types import ModuleType

    from pydantic import BaseModel

    from radlens.config import Settings
    from radlens.datasets.summary import DatasetSummary
    from radlens.dicom_io.writers.common import Equipment, SeriesPlan
    from radlens.findings import StudyFindings
    from radlens.history import ObservedItem, PatientHistory
    from radlens.tasks.base import (
        ImageOutputs,
        ImagePlans,
        LoadedTask,
        NarrativePart,
        OutputContext,
        PdfTable,
        SrContent,
    )



class DermoscopyTask(Task):
    """The melanoma model, configured by the ``dermoscopy`` section."""

    name: ClassVar[str] = TASK_NAME
    title: ClassVar[str] = "melanoma on dermoscopic photographs"
    unit = "image"
    segments = True
    finding_type = DermoscopyReading
    prompt_guidance = PROMPT_GUIDANCE

    def enabled(self, settings: Settings) -> bool:
        return settings.dermoscopy.enabled

    def weights(self, settings: Settings) -> str:
        return settings.dermoscopy.weights

    def load(self, settings: Settings, *, device: str) -> LoadedTask:
        from radlens.models.cards import ModelError
        from radlens.tasks.dermoscopy.analyser import DermoscopyAnalyser

        try:
            return DermoscopyAnalyser.load(settings.dermoscopy, self, device=device)
        except (ModelError, ValueError) as exc:
            raise TaskError(f"cannot load dermoscopy model {settings.dermoscopy.weights!r}: "
                            f"{exc} (radlens ships one named dermoscopy; or train one "
                            "with radlens train --task dermoscopy, or set "
                            "dermoscopy.enabled to false)") from exc

    def write_phantoms(self, out: Path, *, n: int, seed: int, size: int | None, dicom: bool,
                       options: Mapping[str, Any], progress: ResearchProgress = SILENT) -> str:
        from radlens.tasks.dermoscopy import research

        return research.write_phantoms(out, n=n, seed=seed, size=size, dicom=dicom,
                                       visits=int(options.get("visits") or 1),
                                       progress=progress)

    def train(self, request: TrainRequest, progress: ResearchProgress = SILENT) -> str:
        from radlens.tasks.dermoscopy import research

        return research.train(request, progress)

    def check_dataset(self, data: Path, *, layout: str | None = None) -> DatasetSummary:
        from radlens.tasks.dermoscopy import research

        return research.check_dataset(data, layout)

    def evaluate(self, data: Path, model: str, out: Path, *, device: str, seed: int,
                 options: Mapping[str, Any]) -> Path:
        from radlens.tasks.dermoscopy import research

        return research.evaluate(data, model, out, device=device, seed=seed,
                                 progress=SILENT)

    def code_modules(self) -> tuple[ModuleType, ...]:
        from radlens.tasks.dermoscopy import codes

        return (codes,)

    def status_counts(self, findings: StudyFindings) -> dict[str, int]:
        from radlens.tasks.dermoscopy import report

        counts: dict[str, int] = {}
        for _, _, reading in report.readings_of(findings):
            key = f"dermoscopy, {reading.assessment}"
            counts[key] = counts.get(key, 0) + 1
        return counts

    def segmentations(self, context: OutputContext, equipment: Equipment,
                      plan: SeriesPlan) -> list[Any]:
        from radlens.tasks.dermoscopy import report

        return report.segmentations(context, equipment, plan)

    def sr_content(self, context: OutputContext, segmentations: Sequence[Any] = ()
                   ) -> SrContent:
        from radlens.tasks.dermoscopy import report

        return report.sr_content(context, segmentations)

    def image_outputs(self, context: OutputContext, equipment: Equipment,
                      plans: ImagePlans) -> ImageOutputs:
        from radlens.tasks.dermoscopy import report

        with context.times.stage("overlay"):
            return report.image_outputs(context, plans)

    def pdf_table(self, findings: StudyFindings) -> PdfTable | None:
        from radlens.tasks.dermoscopy import report

        return report.pdf_table(findings)

    def narrative(self, findings: StudyFindings) -> NarrativePart | None:
        from radlens.tasks.dermoscopy import report

        return report.narrative(findings)

    def facts(self, findings: StudyFindings) -> BaseModel | None:
        from radlens.tasks.dermoscopy import report

        return report.facts(findings)

    def grounding_numbers(self, facts: Mapping[str, Any]) -> set[float]:
        from radlens.tasks.dermoscopy import report

        return report.grounding_numbers(facts)

    def grounding_violations(self, text: str, facts: Mapping[str, Any] | None) -> list[str]:
        from radlens.tasks.dermoscopy import report

        return report.violations(text, facts)

    def named_sides(self, facts: Mapping[str, Any]) -> frozenset[str]:
        from radlens.tasks.dermoscopy import report

        return report.named_sides(facts)

    def stated_dates(self, facts: Mapping[str, Any]) -> frozenset[str]:
        from radlens.tasks.dermoscopy import report

        return report.stated_dates(facts)

    def compare_with_prior(self, findings: StudyFindings, history: PatientHistory
                           ) -> StudyFindings:
        from radlens.tasks.dermoscopy import prior

        return prior.compare_with_prior(findings, history)

    def observations(self, findings: StudyFindings) -> list[ObservedItem]:
        from radlens.tasks.dermoscopy import prior

        return prior.observations(findings)


TASK = DermoscopyTask()
