"""The pipeline: typed stages from a study's files to its findings, one image at a time.

Each stage takes the previous stage's result and returns its own; nothing reaches back. Images
flow through the per-image stages one by one so a large study never sits in memory whole. Stages
built so far: decoding (``dicom_io.pixels``). Inference, saliency, measurement, narrative and the
DICOM writers plug in after ``decode_image`` and before ``write_findings`` (issues 3 to 6).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from radlens import __version__
from radlens.agent.queue import JobInstance
from radlens.dicom_io import pixels
from radlens.dicom_io.spool import write_durably
from radlens.errors import UnsupportedImageError
from radlens.findings import DecodedImage, ImageInfo, ImageRef, SkippedObject, StudyFindings
from radlens.logs import kv

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


def findings_for(study: StudyInput, outcome: StudyOutcome) -> StudyFindings:
    """Last stage before the writers: the study's findings as one validated object."""
    return StudyFindings(
        study_instance_uid=study.study_instance_uid,
        job_id=study.job_id,
        revision=study.revision,
        radlens_version=__version__,
        images=outcome.images,
        skipped=outcome.skipped,
    )


def write_findings(findings: StudyFindings, results_root: Path, *, fsync: bool = True) -> Path:
    folder = results_root / findings.study_instance_uid
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / FINDINGS_FILE
    write_durably(path, findings.model_dump_json(indent=2).encode(), fsync=fsync)
    return path


def run_study(study: StudyInput, results_root: Path, *, fsync: bool = True) -> StudyFindings:
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
        outcome.images.append(decoded.info)
    findings = findings_for(study, outcome)
    path = write_findings(findings, results_root, fsync=fsync)
    log.info("findings written", extra=kv(job=study.job_id, study=study.study_instance_uid,
                                          images=len(outcome.images),
                                          skipped=len(outcome.skipped), path=str(path)))
    return findings
