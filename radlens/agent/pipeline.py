"""The pipeline: typed stages from a study's files to its findings, one image at a time.

Each stage takes the previous stage's result and returns its own; nothing reaches back. Images
flow through the per-image stages one by one so a large study never sits in memory whole:
routing (``agent.routing``: which tasks may read the image?), decoding (``dicom_io.pixels``),
then each task that reads single images (``radlens.tasks``), which adds its reading to the
image's description and keeps its maps on disk. Tasks that read a series as a volume, or the
study's images together, run once the stream has passed, on what was routed to them. An image
that cannot be used, or whose analysis fails, carries its reason; it never costs the study. The
narrative (``reporting``) and the DICOM writers (``dicom_io.writers``) run after
``write_findings``, from the findings and those maps (``agent.worker``, ``agent.offline``).
Before the findings are written, each task may compare them with the patient's earlier studies
that the runner loaded (``radlens.history``).
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from radlens import __version__
from radlens.agent.maps import MAPS_DIR
from radlens.agent.queue import JobInstance
from radlens.agent.routing import ImageFacts, Router
from radlens.dicom_io import pixels
from radlens.dicom_io.spool import write_durably
from radlens.dicom_io.volumes import SeriesRefused, check_multiframe, check_series
from radlens.errors import ComputeUnavailableError, UnsupportedImageError
from radlens.findings import ImageInfo, ImageRef, ModelRef, SkippedObject, StudyFindings
from radlens.history import ObservedItem, PatientHistory
from radlens.logs import kv
from radlens.tasks.base import ImageInput, LoadedTask, SeriesVolume, TaskResult
from radlens.timing import StageTimes

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
    # The study's patient and their earlier observations (radlens.history): None where the
    # runner has no state to read (offline), so nothing is compared or remembered.
    history: PatientHistory | None = None


@dataclass
class StudyOutcome:
    """Per-image results gathered while images stream through the stages."""

    images: list[ImageInfo] = field(default_factory=list)
    skipped: list[SkippedObject] = field(default_factory=list)
    records: list[Any] = field(default_factory=list)  # analyses for the state database


@dataclass(frozen=True)
class StudyResult:
    findings: StudyFindings
    records: list[Any]
    times: StageTimes = field(default_factory=StageTimes)
    observed: list[tuple[str, ObservedItem]] = field(default_factory=list)  # (task, item)

    def finish(self, results_root: Path, *, fsync: bool = True) -> StudyFindings:
        """The findings again, with every stage's time (the writers' included)."""
        findings = self.findings.model_copy(update={"timings": self.times.rounded()})
        write_findings(findings, results_root, fsync=fsync)
        return findings


@dataclass(frozen=True)
class TaskSet:
    """The tasks a worker loaded, in the registry's order, and the router that says which of
    them reads an image. ``saliency_methods``: the configured methods, first preferred."""

    tasks: dict[str, LoadedTask]
    router: Router
    saliency_methods: tuple[str, ...] = ()

    @property
    def model_ref(self) -> ModelRef:
        """The model that signs the study's report: the first task's."""
        return next(iter(self.tasks.values())).model_ref


def findings_for(study: StudyInput, outcome: StudyOutcome,
                 model: ModelRef | None = None) -> StudyFindings:
    """Last stage before the writers: the study's findings as one validated object, with each
    task's study-level summary of its readings."""
    from radlens.tasks.registry import all_tasks

    summaries = {}
    for task in all_tasks():
        readings = [reading for image in outcome.images for reading in task.readings(image)]
        summary = task.summarise(readings) if readings else None
        if summary is not None:
            summaries[task.name] = summary
    return StudyFindings(
        study_instance_uid=study.study_instance_uid,
        job_id=study.job_id,
        revision=study.revision,
        radlens_version=__version__,
        model=model,
        images=outcome.images,
        skipped=outcome.skipped,
        summaries=summaries,
    )


def compared_with_prior(findings: StudyFindings, history: PatientHistory | None
                        ) -> tuple[StudyFindings, list[tuple[str, ObservedItem]]]:
    """Each task's change since the patient's prior study, and what each remembers of this
    one. A task that fails here costs the comparison, never the study's findings."""
    from radlens.tasks.registry import all_tasks

    if history is None or history.subject is None:
        return findings, []
    observed: list[tuple[str, ObservedItem]] = []
    for task in all_tasks():
        if not task.analysed(findings):
            continue
        try:
            findings = task.compare_with_prior(findings, history)
            observed += [(task.name, item) for item in task.observations(findings)]
        except Exception:  # noqa: BLE001 - logged; the findings stand without the change
            log.exception("comparison with the prior study failed",
                          extra=kv(task=task.name, study=findings.study_instance_uid))
    return findings, observed


def write_findings(findings: StudyFindings, results_root: Path, *, fsync: bool = True) -> Path:
    folder = results_root / findings.study_instance_uid
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / FINDINGS_FILE
    write_durably(path, findings.model_dump_json(indent=2).encode(), fsync=fsync)
    return path


@dataclass
class _Deferred:
    """Images routed to tasks that read more than one image at a time (a series as a volume,
    the study's images together): their instances, run once the stream has passed."""

    series: dict[str, dict[str, list[JobInstance]]] = field(
        default_factory=lambda: defaultdict(lambda: defaultdict(list)))
    study: dict[str, list[JobInstance]] = field(default_factory=lambda: defaultdict(list))


def _failure(exc: Exception) -> str:
    return f"the analysis failed (logged): {type(exc).__name__}: {exc}"[:500]


def _image(instance: JobInstance, analysers: TaskSet | None, maps_dir: Path, job_id: int,
           times: StageTimes, deferred: _Deferred) -> tuple[ImageInfo, list[Any]]:
    """One object through routing, decoding and each image task routing chose. Raises
    UnsupportedImageError for an object without usable pixels; an image the router keeps from
    every task is described from its header alone, and one whose analysis fails says why
    instead of costing the study."""
    with times.stage("decode"):
        ds = pixels.read_dataset(instance.path)
    if analysers is None:
        with times.stage("decode"):
            return pixels.decode_dataset(ds).info, []
    described = pixels.describe(ds)
    decision = analysers.router.route(ImageFacts.from_dataset(ds), instance.calling_aet)
    if not decision.analyse:
        log.info("image not analysed", extra=kv(job=job_id, sop=instance.sop_instance_uid,
                                                reason=decision.reason))
        return described.model_copy(update={"not_analysed": decision.reason,
                                            "route": decision.reason}), []
    info = described.model_copy(update={"route": decision.reason})
    records: list[Any] = []
    image_tasks = []
    for name in decision.tasks:
        loaded = analysers.tasks[name]
        unit = loaded.task.unit
        if unit == "series":
            deferred.series[name][instance.series_instance_uid].append(instance)
        elif unit == "study":
            deferred.study[name].append(instance)
        else:
            image_tasks.append(loaded)
    if not image_tasks:
        return info, records
    with times.stage("decode"):
        decoded = pixels.decode_dataset(ds, info=info)
    for loaded in image_tasks:
        try:
            result = loaded.analyse_image(ImageInput(decoded, ds), maps_dir, times)
        except ComputeUnavailableError:
            raise  # nothing wrong with the image: the job runs again
        except Exception as exc:
            log.exception("analysis failed", extra=kv(job=job_id, task=loaded.task.name,
                                                      sop=instance.sop_instance_uid))
            reason = _failure(exc)
            if len(decision.tasks) > 1:
                reason = f"{loaded.task.name}: {reason}"
            info = info.model_copy(update={"not_analysed": reason})
            continue
        info = result.images[0].model_copy(update={"route": decision.reason})
        records += result.records
        decoded = type(decoded)(info, decoded.pixels)  # the next task sees what this one added
    return info, records


def _run_deferred(analysers: TaskSet, deferred: _Deferred, outcome: StudyOutcome,
                  maps_dir: Path, job_id: int, times: StageTimes) -> None:
    """The series and study tasks, on what routing sent them; their readings replace the
    images' descriptions in the outcome."""
    by_uid = {info.ref.sop_instance_uid: index for index, info in enumerate(outcome.images)}

    def merge(result: TaskResult) -> None:
        outcome.records.extend(result.records)
        for info in result.images:
            index = by_uid.get(info.ref.sop_instance_uid)
            if index is not None:
                outcome.images[index] = info

    def fail(instances: list[JobInstance], name: str, exc: Exception) -> None:
        if isinstance(exc, SeriesRefused):  # the series, not radlens, is at fault
            log.info("series refused", extra=kv(job=job_id, task=name, reason=str(exc)))
            reason = f"the series was not read as a volume: {exc}"
        else:
            log.exception("analysis failed", extra=kv(job=job_id, task=name))
            reason = _failure(exc)
        for instance in instances:
            index = by_uid.get(instance.sop_instance_uid)
            if index is not None:
                outcome.images[index] = outcome.images[index].model_copy(
                    update={"not_analysed": f"{name}: {reason}"})

    for name, series in deferred.series.items():
        loaded = analysers.tasks[name]
        for instances in series.values():
            try:
                volume = read_volume(instances, [outcome.images[by_uid[i.sop_instance_uid]]
                                                 for i in instances if i.sop_instance_uid
                                                 in by_uid])
                merge(loaded.analyse_series(volume, maps_dir, times))
            except ComputeUnavailableError:
                raise
            except Exception as exc:  # one series costs its own images, never the study
                fail(instances, name, exc)
    for name, instances in deferred.study.items():
        loaded = analysers.tasks[name]
        try:
            inputs = []
            for instance in instances:
                ds = pixels.read_dataset(instance.path)
                info = outcome.images[by_uid[instance.sop_instance_uid]]
                inputs.append(ImageInput(pixels.decode_dataset(ds, info=info), ds))
            merge(loaded.analyse_study(inputs, maps_dir, times))
        except ComputeUnavailableError:
            raise
        except Exception as exc:
            fail(instances, name, exc)


def read_volume(instances: list[JobInstance], infos: list[ImageInfo]) -> SeriesVolume:
    """One series as a volume, built by highdicom from the slices' headers: it sorts them along
    their normal and takes spacing, orientation and position from Image Position and Orientation
    (Patient). The headers are checked first (``check_series``; the datasets' pixels are
    read only when used): slices that make no regular volume raise SeriesRefused with the
    reason before any pixel is read; highdicom's own ValueError remains for what the check
    does not cover. A series of one multi-frame image (Enhanced MR) is one volume, placed by
    its per-frame functional groups (``highdicom.Image.get_volume``)."""
    import highdicom as hd

    datasets = [pixels.read_dataset(i.path) for i in instances]
    if len(datasets) == 1 and int(datasets[0].get("NumberOfFrames", 1) or 1) > 1:
        # one multi-frame image (Enhanced MR or CT): its frames' functional groups place them
        check_multiframe(datasets[0])
        volume = hd.Image.from_dataset(datasets[0]).get_volume(dtype="float32")
    else:
        check_series(datasets)
        datasets = hd.spatial.sort_datasets(datasets)
        volume = hd.get_volume_from_series(datasets, dtype="float32")
    sources = tuple(str(ds.SOPInstanceUID) for ds in datasets)
    order = {uid: n for n, uid in enumerate(sources)}
    return SeriesVolume(volume=volume, sources=sources, infos=tuple(sorted(
        infos, key=lambda info: order.get(info.ref.sop_instance_uid, len(order)))))


def run_study(study: StudyInput, results_root: Path, *, analysers: TaskSet | None = None,
              fsync: bool = True) -> StudyResult:
    """Run every stage over one study and write its findings; an image that cannot be used is
    skipped with its reason, never a failure of the study."""
    outcome = StudyOutcome()
    times = StageTimes()
    maps_dir = results_root / study.study_instance_uid / MAPS_DIR
    deferred = _Deferred()
    for instance in study.instances:
        ref = ImageRef(study_instance_uid=study.study_instance_uid,
                       series_instance_uid=instance.series_instance_uid,
                       sop_instance_uid=instance.sop_instance_uid,
                       sop_class_uid=instance.sop_class_uid)
        try:
            info, records = _image(instance, analysers, maps_dir, study.job_id, times, deferred)
        except ComputeUnavailableError:
            raise
        except UnsupportedImageError as exc:
            outcome.skipped.append(SkippedObject(ref=ref, reason=str(exc)))
            log.info("object skipped", extra=kv(job=study.job_id, sop=ref.sop_instance_uid,
                                                reason=str(exc)))
            continue
        except Exception as exc:  # a bug must cost this object, never the study
            log.exception("object failed", extra=kv(job=study.job_id, sop=ref.sop_instance_uid))
            outcome.skipped.append(SkippedObject(ref=ref, reason=(
                f"unexpected error (logged): {type(exc).__name__}: {exc}")[:500]))
            continue
        outcome.records.extend(records)
        outcome.images.append(info)
    if analysers is not None and (deferred.series or deferred.study):
        _run_deferred(analysers, deferred, outcome, maps_dir, study.job_id, times)
    with times.stage("findings"):
        findings = findings_for(study, outcome, analysers.model_ref if analysers else None)
        findings, observed = compared_with_prior(findings, study.history)
        path = write_findings(findings, results_root, fsync=fsync)
    log.info("findings written", extra=kv(job=study.job_id, study=study.study_instance_uid,
                                          images=len(outcome.images),
                                          skipped=len(outcome.skipped), path=str(path)))
    return StudyResult(findings, outcome.records, times, observed)
