"""The study's answer as DICOM: SEG, TID 1500 SR, saliency Parametric Map and RGB overlay.

``write_outputs`` builds every configured object of one job from its findings and the maps the
tasks kept, and writes them durably under ``results/<Study>/dicom/`` (one folder per job
revision), ready for the outbox. Every object lies in the source study, in its own new series.
What goes in them comes from each task that read an image of the study (``radlens.tasks``):
this module assembles their contributions and names none of them.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from pydicom.dataset import Dataset

from radlens.config import OutputSettings
from radlens.dicom_io.spool import write_durably
from radlens.dicom_io.writers.common import (
    Equipment,
    OutputFolder,
    OutputKind,
    SeriesPlan,
    creation_time,
)
from radlens.dicom_io.writers.headers import read_header, with_type2_present
from radlens.dicom_io.writers.pdf import build_encapsulated_pdf
from radlens.dicom_io.writers.sr import build_report
from radlens.findings import ModelRef, StudyFindings
from radlens.logs import kv
from radlens.reporting.narrative import Narrative
from radlens.reporting.pdf import Figure, render_report
from radlens.tasks.base import ImagePlans, OutputContext, SrContent, Task
from radlens.timing import StageTimes

log = logging.getLogger(__name__)

DICOM_DIR = "dicom"
REPORT_PDF = "report.pdf"


@dataclass(frozen=True)
class WrittenOutputs:
    """Paths of the objects one job wrote, by kind."""

    seg: list[Path]
    sr: list[Path]
    parametric_map: list[Path]
    overlay: list[Path]
    pdf: list[Path] = dataclasses.field(default_factory=list)
    retraction: list[Path] = dataclasses.field(default_factory=list)  # last: sent after the rest

    @property
    def all(self) -> list[Path]:
        return [*self.seg, *self.sr, *self.parametric_map, *self.overlay, *self.pdf,
                *self.retraction]


def tasks_of(findings: StudyFindings) -> list[Task]:
    """The installed tasks with a reading in this study, in the registry's order."""
    from radlens.tasks.registry import all_tasks

    return [task for task in all_tasks() if task.analysed(findings)]


def study_notes(findings: StudyFindings, tasks: Sequence[Task]) -> list[str]:
    """Plain statements for the SR: what was not analysed and why, each task's own notes, and
    why there is no SEG."""
    notes = [f"Image {image.ref.sop_instance_uid} not analysed: {image.not_analysed}."
             for image in findings.images if image.not_analysed]
    for image in findings.images:
        if image.abstained:
            scores = ", ".join(f"{a.frame + 1}: {a.ood_score:.1f}" for a in image.abstained[:60])
            more = f" and {len(image.abstained) - 60} more" if len(image.abstained) > 60 else ""
            notes.append(f"Image {image.ref.sop_instance_uid}: {len(image.abstained)} frame(s) "
                         f"not analysed, unlike the model's training images (out-of-"
                         f"distribution score above the threshold "
                         f"{image.abstained[0].threshold:.1f}; frame: score {scores}{more}).")
    for task in tasks:
        notes += task.notes(findings)
    notes += [f"Object {skipped.ref.sop_instance_uid} skipped: {skipped.reason}."
              for skipped in findings.skipped]
    if not tasks:
        notes.append("No image was analysed, so no segmentation (SEG), saliency map or overlay "
                     "was written.")
    elif not any(task.segments for task in tasks):
        notes.append(f"None of the tasks that read this study segments "
                     f"({', '.join(task.name for task in tasks)}), so no segmentation (SEG) "
                     "was written.")
    notes += [note for task in tasks if (note := task.segmentation_note(findings))]
    notes += [model.training_statement() for model in findings.models_used()]
    return notes


def source_headers(sources: Mapping[str, Path]) -> dict[str, Dataset]:
    """Every readable source's conformant header by SOP Instance UID: the SR accounts for all
    of them, and the analysed images' objects copy theirs. Unreadable files are left out (the
    findings already say why)."""
    headers: dict[str, Dataset] = {}
    for sop_uid, path in sources.items():
        try:
            headers[sop_uid] = read_header(path)
        except Exception as exc:  # a file pydicom cannot read even without its pixels
            log.warning("source header unreadable", extra=kv(sop=sop_uid, error=str(exc)))
    return headers


def write_outputs(findings: StudyFindings, sources: Mapping[str, Path], study_results: Path,
                  narrative: Narrative, *, settings: OutputSettings,
                  saliency_methods: Sequence[str], fsync: bool = True,
                  times: StageTimes | None = None) -> WrittenOutputs:
    """Build and write the study's DICOM outputs. ``sources`` maps each source SOP Instance
    UID to its file; images no task read contribute notes only. One object that cannot be
    built costs the others nothing, and the SR always goes out: with the measurements, or,
    when they cannot be written, with the reason. Each kind's time is added to ``times``."""
    times = times or StageTimes()
    equipment = Equipment.for_model(findings.model)
    with times.stage("sr"):  # the headers serve every object; the SR accounts for them all
        headers = source_headers(sources)
    context = OutputContext(findings=findings, sources=sources, headers=headers,
                            study_results=study_results, settings=settings,
                            revision=findings.revision,
                            saliency_methods=tuple(saliency_methods), times=times)
    tasks = tasks_of(findings)
    folder = OutputFolder(study_results / DICOM_DIR / f"revision-{findings.revision}", fsync,
                          creation_time(headers.values()))
    written = WrittenOutputs([], [], [], [])

    failures: list[str] = []
    segmentations: dict[str, list] = {}
    if settings.seg:
        plan = SeriesPlan.new(OutputKind.SEG, findings.revision)
        for task in tasks:
            with times.stage("seg"):
                try:
                    segmentations[task.name] = task.segmentations(context, equipment, plan)
                    written.seg.extend(folder.save(seg.dataset, "SEG")
                                       for seg in segmentations[task.name])
                except Exception as exc:  # one object that cannot be built must not cost others
                    failures.append(_failed(f"segmentation (SEG) of {task.name}", findings, exc))
                    segmentations[task.name] = []
    figures: list[Figure] = []
    for task in tasks:
        plans = ImagePlans(SeriesPlan.new(OutputKind.PARAMETRIC_MAP, findings.revision),
                           SeriesPlan.new(OutputKind.OVERLAY, findings.revision),
                           first_parametric_map=len(written.parametric_map) + 1,
                           first_overlay=len(written.overlay) + 1)
        try:
            made = task.image_outputs(context, equipment, plans)
        except Exception as exc:
            failures.append(_failed(f"maps and overlays of {task.name}", findings, exc))
            continue
        written.parametric_map.extend(folder.save(pm, "PM") for pm in made.parametric_maps)
        written.overlay.extend(folder.save(sc, "SC") for sc in made.overlays)
        figures += made.figures
        failures += made.failures
    if settings.sr and headers:
        with times.stage("sr"):
            contents: list[SrContent] = []
            for task in tasks:
                try:
                    contents.append(task.sr_content(context, segmentations.get(task.name, [])))
                except Exception as exc:
                    failures.append(_failed(f"measurements of {task.name}", findings, exc))
            notes = study_notes(findings, tasks)
            all_segmentations = [seg for task in tasks for seg in segmentations.get(task.name, [])]
            written.sr.append(folder.save(_report(contents, all_segmentations, narrative,
                                                  equipment, findings, notes + failures,
                                                  list(headers.values())), "SR"))
    if settings.pdf:
        with times.stage("pdf"):
            try:
                pdf = render_report(findings, narrative, figures, tasks)
                write_durably(study_results / REPORT_PDF, pdf, fsync=fsync)
                # One document with one source series: the first task's images that it names.
                pdf_headers = next((found for task in tasks
                                    if (found := task.pdf_sources(context))), [])
                pdf_headers = pdf_headers or list(headers.values())[:1]
                if pdf_headers:
                    document = build_encapsulated_pdf(
                        pdf, pdf_headers, equipment,
                        SeriesPlan.new(OutputKind.PDF, findings.revision))
                    written.pdf.append(folder.save(document, "PDF"))
            except Exception as exc:  # the report must not cost the SEG and SR written
                _failed("PDF report", findings, exc)
    if settings.retract_superseded and findings.revision > 1 and written.all:
        _write_rejection_note(study_results, findings, equipment, folder, written)
    log.info("DICOM outputs written", extra=kv(
        study=findings.study_instance_uid, revision=findings.revision, seg=len(written.seg),
        sr=len(written.sr), pm=len(written.parametric_map), sc=len(written.overlay)))
    return written


def _write_rejection_note(study_results: Path, findings: StudyFindings, equipment: Equipment,
                          folder: OutputFolder, written: WrittenOutputs) -> None:
    """The IOCM rejection note of the revision this one supersedes (see writers.kos); a note
    that cannot be built costs the new revision nothing."""
    from radlens.dicom_io.writers.kos import build_rejection_note, superseded_objects

    previous = study_results / DICOM_DIR / f"revision-{findings.revision - 1}"
    superseded = superseded_objects(previous)
    if not superseded:
        return
    plan = SeriesPlan.new(OutputKind.KOS, findings.revision)
    try:
        note = build_rejection_note(superseded, equipment, plan, revision=findings.revision)
        note.SeriesDescription = plan.description
        written.retraction.append(folder.save(note, "KO"))
    except Exception as exc:
        _failed("rejection note of the superseded revision", findings, exc)
        return
    log.info("superseded revision withdrawn", extra=kv(
        study=findings.study_instance_uid, revision=findings.revision - 1,
        objects=len(superseded)))


def _report(contents: list[SrContent], segmentations: list, narrative: Narrative,
            equipment: Equipment, findings: StudyFindings, notes: list[str],
            evidence: list[Dataset]) -> Dataset:
    """The SR with every measurement; if that cannot be built, one that says why."""
    plan = SeriesPlan.new(OutputKind.SR, findings.revision)
    try:
        return build_report(contents, segmentations, narrative, equipment, plan, notes=notes,
                            evidence=evidence)
    except Exception as exc:
        failure = _failed("measurement report", findings, exc)
        return build_report([], [], narrative, equipment, plan, evidence=evidence, failed=True,
                            notes=[*notes, failure])


def write_failure_report(study_uid: str, revision: int, sources: Mapping[str, Path],
                         study_results: Path, reason: str, *, model: ModelRef | None,
                         fsync: bool = True) -> Path | None:
    """The SR of a study whose analysis failed for good: it names the reason, so the sender
    hears of the failure instead of waiting for results that never come. None when no source
    header can be read to place it in the study."""
    headers = source_headers(sources)
    if not headers:
        return None
    narrative = Narrative.failure(reason)
    notes = [f"The analysis of this study failed: {reason}"[:1000]]
    plan = SeriesPlan.new(OutputKind.SR, revision)
    try:
        report = build_report([], [], narrative, Equipment.for_model(model), plan,
                              notes=notes, evidence=list(headers.values()), failed=True)
    except Exception as exc:  # the last word a study gets: from its UIDs alone, then
        log.warning("failure report rebuilt from the sources' UIDs alone",
                    extra=kv(study=study_uid, error=f"{type(exc).__name__}: {exc}"[:300]))
        report = build_report([], [], narrative, Equipment.for_model(model), plan,
                              notes=notes, failed=True,
                              evidence=[uids_only(header) for header in headers.values()])
    folder = OutputFolder(study_results / DICOM_DIR / f"revision-{revision}", fsync,
                          creation_time(headers.values()))
    return folder.save(report, "SR")


def uids_only(header: Dataset) -> Dataset:
    """A source header cut down to what places an object in its study (UIDs, study and
    series identity, empty type 2 patient and study attributes): nothing a sender wrote there
    can fail the object built on it."""
    kept = Dataset()
    for keyword in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID",
                    "Modality"):
        if keyword in header:
            setattr(kept, keyword, header.get(keyword))
    kept.SpecificCharacterSet = "ISO_IR 192"
    return with_type2_present(kept)


def overlay_pngs(findings: StudyFindings, sources: Mapping[str, Path], study_results: Path,
                 saliency_methods: Sequence[str], *, limit: int = 4) -> list[bytes]:
    """The tasks' overlays as PNG, for a vision-capable LLM the user enabled (at most
    ``limit``: a prompt is not an archive)."""
    from radlens.config import OutputSettings

    context = OutputContext(findings=findings, sources=sources, headers={},
                            study_results=study_results, settings=OutputSettings(),
                            revision=findings.revision,
                            saliency_methods=tuple(saliency_methods))
    pngs: list[bytes] = []
    for task in tasks_of(findings):
        pngs += task.overlay_pngs(context, limit - len(pngs))
    return pngs[:limit]


def _failed(what: str, findings: StudyFindings, exc: Exception) -> str:
    log.error("DICOM output not written", exc_info=exc,
              extra=kv(study=findings.study_instance_uid, output=what))
    return f"The {what} could not be written: {type(exc).__name__}: {exc}"[:1000]
