"""The pipeline: typed stages from a study's files to its findings, one image at a time.

Each stage takes the previous stage's result and returns its own; nothing reaches back. Images
flow through the per-image stages one by one so a large study never sits in memory whole. Stages
built so far: decoding (``dicom_io.pixels``), then segmentation and classification
(``models.infer``). Saliency, measurement, narrative and the DICOM writers plug in after
``analyse_image`` and before ``write_findings`` (issues 4 to 6).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from radlens import __version__
from radlens.agent.queue import JobInstance
from radlens.config import ModelSettings
from radlens.dicom_io import pixels
from radlens.dicom_io.spool import write_durably
from radlens.errors import UnsupportedImageError
from radlens.findings import (
    ClassProbabilities,
    DecodedImage,
    FramePrediction,
    ImageInfo,
    ImageRef,
    ModelRef,
    SkippedObject,
    StudyFindings,
)
from radlens.logs import kv

if TYPE_CHECKING:  # torch stays out of the agent's import path until a model is loaded
    from radlens.models.infer import Segmenter

log = logging.getLogger(__name__)

RESULTS_DIR = "results"
FINDINGS_FILE = "findings.json"


@dataclass(frozen=True)
class StudyInput:
    """What a job hands the pipeline: the study's instances as filed by the spool."""

    job_id: int
    revision: int
    study_instance_uid: str
    instances: list[JobInstance]


@dataclass
class StudyOutcome:
    """Per-image results gathered while images stream through the stages."""

    images: list[ImageInfo] = field(default_factory=list)
    skipped: list[SkippedObject] = field(default_factory=list)


def decode_image(instance: JobInstance) -> DecodedImage:
    """Stage 1: pixels and physical spacing (raises UnsupportedImageError with a reason)."""
    return pixels.decode_file(instance.path)


@dataclass(frozen=True)
class Analyser:
    """The model stage: a loaded segmenter and the settings saying which images it may see."""

    segmenter: Segmenter
    settings: ModelSettings

    @property
    def model_ref(self) -> ModelRef:
        return ModelRef(name=self.segmenter.name, version=self.segmenter.version,
                        architecture=str(self.segmenter.card["architecture"]))


def analyse_image(decoded: DecodedImage, analyser: Analyser) -> ImageInfo:
    """Stage 2: segmentation and image-level class probabilities for every frame, or the reason
    the model did not run (a modality it was not trained for)."""
    info = decoded.info
    allowed = analyser.settings.modalities
    if allowed and (info.modality or "") not in allowed:
        return info.model_copy(update={"not_analysed": (
            f"modality {info.modality or 'unknown'} is not one the model was trained for "
            f"({', '.join(allowed)})")})
    frames = decoded.pixels
    if analyser.settings.max_frames:
        frames = frames[:analyser.settings.max_frames]
    predictions = []
    for index, result in enumerate(analyser.segmenter.predict(list(frames))):
        normal, benign, malignant = (float(p) for p in result.image_probabilities)
        classes = result.classes
        predictions.append(FramePrediction(
            frame=index,
            class_probabilities=ClassProbabilities(normal=normal, benign=benign,
                                                   malignant=malignant),
            predicted_class=("normal", "benign", "malignant")[
                int(np.argmax(result.image_probabilities))],
            lesion_pixels={"benign": int((classes == 1).sum()),
                           "malignant": int((classes == 2).sum())},
        ))
    return info.model_copy(update={"predictions": predictions})


def findings_for(study: StudyInput, outcome: StudyOutcome,
                 model: ModelRef | None = None) -> StudyFindings:
    """Last stage before the writers: the study's findings as one validated object."""
    return StudyFindings(
        study_instance_uid=study.study_instance_uid,
        job_id=study.job_id,
        revision=study.revision,
        radlens_version=__version__,
        model=model,
        images=outcome.images,
        skipped=outcome.skipped,
    )


def write_findings(findings: StudyFindings, results_root: Path, *, fsync: bool = True) -> Path:
    folder = results_root / findings.study_instance_uid
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / FINDINGS_FILE
    write_durably(path, findings.model_dump_json(indent=2).encode(), fsync=fsync)
    return path


def run_study(study: StudyInput, results_root: Path, *, analyser: Analyser | None = None,
              fsync: bool = True) -> StudyFindings:
    """Run every stage over one study and write its findings; an image that cannot be used is
    skipped with its reason, never a failure of the study."""
    outcome = StudyOutcome()
    for instance in study.instances:
        ref = ImageRef(study_instance_uid=study.study_instance_uid,
                       series_instance_uid=instance.series_instance_uid,
                       sop_instance_uid=instance.sop_instance_uid,
                       sop_class_uid=instance.sop_class_uid)
        try:
            decoded = decode_image(instance)
        except UnsupportedImageError as exc:
            outcome.skipped.append(SkippedObject(ref=ref, reason=str(exc)))
            log.info("object skipped", extra=kv(job=study.job_id, sop=ref.sop_instance_uid,
                                                reason=str(exc)))
            continue
        info = analyse_image(decoded, analyser) if analyser is not None else decoded.info
        outcome.images.append(info)
    findings = findings_for(study, outcome, analyser.model_ref if analyser else None)
    path = write_findings(findings, results_root, fsync=fsync)
    log.info("findings written", extra=kv(job=study.job_id, study=study.study_instance_uid,
                                          images=len(outcome.images),
                                          skipped=len(outcome.skipped), path=str(path)))
    return findings
