"""``radlens process``: the agent's pipeline over files and folders, without the network.

Files are grouped into studies by their headers, each study runs through the same stages as a
job of the agent, and the same objects land in ``OUT/results/<StudyUID>/``. A file that is not
DICOM, or not a usable image, is reported and skipped; it never stops the batch.
"""

from __future__ import annotations

import logging
import re
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from radlens.agent.pipeline import StudyInput, TaskSet, run_study
from radlens.agent.queue import JobInstance
from radlens.config import Settings
from radlens.dicom_io.nesting import read_bounded
from radlens.dicom_io.writers import WrittenOutputs, write_failure_report, write_outputs
from radlens.findings import StudyFindings
from radlens.logs import kv
from radlens.reporting.ollama import narrate
from radlens.tasks.registry import all_tasks

log = logging.getLogger(__name__)

OFFLINE_JOB_ID = 0
MEDIA_STORAGE_DIRECTORY = "1.2.840.10008.1.3.10"


@dataclass(frozen=True)
class ProcessedStudy:
    study_instance_uid: str
    revision: int
    findings_path: Path | None
    outputs: WrittenOutputs
    lesions: int
    error: str | None = None  # the study failed; its SR says so
    findings: StudyFindings | None = None


@dataclass(frozen=True)
class UnreadableFile:
    path: Path
    reason: str


def iter_files(paths: Iterable[Path]) -> Iterator[Path]:
    for path in paths:
        if path.is_dir():
            yield from sorted(p for p in path.rglob("*") if p.is_file())
        elif path.is_file():
            yield path
        else:
            raise FileNotFoundError(f"{path}: no such file or folder")


def collect_studies(paths: Iterable[Path]) -> tuple[dict[str, list[JobInstance]],
                                                     list[UnreadableFile]]:
    """Group DICOM files by study; everything else is listed with the reason."""
    studies: dict[str, list[JobInstance]] = defaultdict(list)
    unreadable = []
    for path in iter_files(paths):
        try:
            ds = read_bounded(path, stop_before_pixels=True)
            if _is_dicomdir(ds):  # every media export has one: an index, not a study's file
                log.info("DICOMDIR skipped", extra=kv(path=str(path)))
                continue
            instance = JobInstance(
                sop_instance_uid=str(ds.SOPInstanceUID), sop_class_uid=str(ds.SOPClassUID),
                series_instance_uid=str(ds.SeriesInstanceUID),
                transfer_syntax_uid=str(ds.file_meta.TransferSyntaxUID), path=path.resolve())
            studies[str(ds.StudyInstanceUID)].append(instance)
        except Exception as exc:  # noqa: BLE001 - pydicom raises many types on damaged files
            # (zlib.error for a deflate stream that does not inflate, NotImplementedError for
            # an unknown VR): each one is this file's reason, never the batch's end
            detail = " ".join(str(exc).split("\n", 1)[0].split())[:300]
            reason = f"not a DICOM instance radlens can read ({type(exc).__name__}: {detail})"
            unreadable.append(UnreadableFile(path, reason))
            log.warning("file skipped", extra=kv(path=str(path), reason=reason))
    return dict(studies), unreadable


def _is_dicomdir(ds: object) -> bool:
    meta = getattr(ds, "file_meta", None)
    return str(getattr(meta, "MediaStorageSOPClassUID", "")) == MEDIA_STORAGE_DIRECTORY


def next_revision(study_results: Path) -> int:
    """1 for a study never processed into this folder, then 2, 3, ..."""
    done = study_results / "dicom"
    if not done.is_dir():
        return 1
    revisions = [int(p.name.split("-")[1]) for p in done.glob("revision-*")
                 if p.name.split("-")[1].isdigit()]
    return max(revisions, default=0) + 1


def process_study(study_uid: str, instances: list[JobInstance], results_root: Path,
                  analysers: TaskSet, settings: Settings) -> ProcessedStudy:
    """One study, as a job of the agent would run it. An unexpected error (a bug) fails the
    study alone, and its SR still says so."""
    revision = next_revision(results_root / study_uid)
    try:
        return _process(study_uid, revision, instances, results_root, analysers, settings)
    except Exception as exc:
        error = f"{type(exc).__name__}: {exc}"[:2000]
        log.exception("study failed", extra=kv(study=study_uid))
        sr = write_failure_report(study_uid, revision,
                                  {i.sop_instance_uid: i.path for i in instances},
                                  results_root / study_uid, error, model=analysers.model_ref,
                                  fsync=settings.storage.fsync)
        return ProcessedStudy(study_uid, revision, None,
                              WrittenOutputs([], [sr] if sr else [], [], []), 0, error)


def _process(study_uid: str, revision: int, instances: list[JobInstance], results_root: Path,
             analysers: TaskSet, settings: Settings) -> ProcessedStudy:
    study = StudyInput(job_id=OFFLINE_JOB_ID, revision=revision, study_instance_uid=study_uid,
                       instances=sorted(instances, key=lambda i: str(i.path)))
    result = run_study(study, results_root, analysers=analysers,
                       fsync=settings.storage.fsync)
    with result.times.stage("narrative"):
        narrative = narrate(result.findings, settings.llm)
    written = write_outputs(
        result.findings, {i.sop_instance_uid: i.path for i in instances},
        results_root / study_uid, narrative,
        settings=settings.outputs, saliency_methods=settings.model.saliency,
        fsync=settings.storage.fsync, times=result.times)
    findings = result.finish(results_root, fsync=settings.storage.fsync)
    lesions = sum(len(p.lesions) for image in result.findings.images for p in image.predictions)
    return ProcessedStudy(study_uid, revision, results_root / study_uid / "findings.json",
                          written, lesions, findings=findings)


def outcome_counts(processed: list[ProcessedStudy], unreadable: list[UnreadableFile]
                   ) -> dict[str, int]:
    """What a batch did, for people and for the corpus test: files, studies done and failed,
    images analysed, and every reason an image or object was not analysed, with its count."""
    counts: Counter[str] = Counter({"files not DICOM or unreadable": len(unreadable),
                                    "studies done": 0, "images analysed": 0})
    for study in processed:
        counts["studies failed" if study.error else "studies done"] += 1
        if study.findings is None:
            continue
        for image in study.findings.images:
            counts["images analysed" if image.predictions or image.analyses
                   else "images not analysed"] += 1
            counts["frames analysed"] += len(image.predictions)
            counts["frames abstained (unlike the training images)"] += len(image.abstained)
            if image.not_analysed:
                counts[f"not analysed: {_reason_kind(image.not_analysed)}"] += 1
        for skipped in study.findings.skipped:
            counts[f"skipped: {_reason_kind(skipped.reason)}"] += 1
        for task in all_tasks():
            counts.update(task.status_counts(study.findings))
    return dict(sorted(counts.items(), key=lambda item: (not item[0].startswith(
        ("files", "studies", "images", "frames")), item[0])))


def _reason_kind(reason: str) -> str:
    """A reason without its numbers, so alike reasons count together."""
    return re.sub(r"\(scores? [^)]*\)|\d+(\.\d+)?", "#", reason)[:90]
