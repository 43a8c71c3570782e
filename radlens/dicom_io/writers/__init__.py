"""The study's answer as DICOM: SEG, TID 1500 SR, saliency Parametric Map and RGB overlay.

``write_outputs`` builds every configured object of one job from its findings and the maps the
pipeline kept, and writes them durably under ``results/<Study>/dicom/`` (one folder per job
revision), ready for the outbox. Every object lies in the source study, in its own new series.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset

from radlens.config import OutputSettings
from radlens.dicom_io import pixels
from radlens.dicom_io.spool import write_durably
from radlens.dicom_io.writers.analysed import (
    AnalysedImage,
    load_analysed,
    read_header,
    with_type2_present,
)
from radlens.dicom_io.writers.common import (
    Equipment,
    OutputFolder,
    OutputKind,
    SeriesPlan,
    creation_time,
)
from radlens.dicom_io.writers.overlay import (
    build_density_overlay,
    build_overlays,
    build_parametric_map,
    chosen_method,
)
from radlens.dicom_io.writers.pdf import build_encapsulated_pdf
from radlens.dicom_io.writers.seg import build_segmentations
from radlens.dicom_io.writers.sr import DensityImage, build_report
from radlens.findings import ModelRef, StudyFindings
from radlens.logs import kv
from radlens.reporting.narrative import Narrative
from radlens.reporting.pdf import Figure, render_report
from radlens.timing import StageTimes

log = logging.getLogger(__name__)

DICOM_DIR = "dicom"
REPORT_PDF = "report.pdf"
FIGURES = 2  # key frames shown in the PDF report: those with lesions, most confident first


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


def study_notes(findings: StudyFindings, has_lesions: bool) -> list[str]:
    """Plain statements for the SR: what was not analysed, and why there is no SEG."""
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
    for image in findings.images:
        reading = image.density
        if reading is not None and reading.attention_on_artifact:
            notes.append(
                f"Image {image.ref.sop_instance_uid}: attention-on-artifact warning. Only "
                f"{reading.attention.tissue:.0%} of the density model's Grad-CAM attention lies "
                f"on breast tissue ({reading.attention.artifacts:.0%} on markers, text, clips or "
                f"paddle edges, {reading.attention.outside:.0%} outside the breast): breast "
                f"composition {reading.category} may rest on an artifact.")
    for image in findings.images:
        if image.frames > 1 and image.predictions:
            explained = [p.frame + 1 for p in image.predictions if p.saliency]
            shown = ", ".join(map(str, explained[:60])) + (" ..." if len(explained) > 60 else "")
            notes.append(f"Image {image.ref.sop_instance_uid}: saliency computed for "
                         f"{len(explained)} of {len(image.predictions)} analysed frame(s)"
                         + (f" (frames {shown})." if explained else "."))
    notes += [f"Object {skipped.ref.sop_instance_uid} skipped: {skipped.reason}."
              for skipped in findings.skipped]
    if any(image.density for image in findings.images) and not any(
            image.predictions for image in findings.images):
        notes.append("Breast density only: the lesion model does not read mammograms, so no "
                     "segmentation (SEG) or lesion measurement was written.")
    elif not any(image.predictions for image in findings.images):
        notes.append("No image was analysed, so no segmentation (SEG), saliency map or overlay "
                     "was written.")
    elif not has_lesions:
        notes.append("No lesion was found, so no segmentation (SEG) was written.")
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
    UID to its file; images without predictions contribute notes only. One object that cannot
    be built costs the others nothing, and the SR always goes out: with the measurements, or,
    when they cannot be written, with the reason. Each kind's time is added to ``times``."""
    times = times or StageTimes()
    equipment = Equipment.for_model(findings.model)
    with times.stage("sr"):  # the headers serve every object; the SR accounts for them all
        headers = source_headers(sources)
    images: list[AnalysedImage] = []
    for info in findings.images:
        sop_uid = info.ref.sop_instance_uid
        if info.predictions and sop_uid in headers:
            images.append(load_analysed(info, sources[sop_uid], study_results,
                                        header=headers[sop_uid]))
    folder = OutputFolder(study_results / DICOM_DIR / f"revision-{findings.revision}", fsync,
                          creation_time(headers.values()))
    written = WrittenOutputs([], [], [], [])

    failures: list[str] = []
    segmentations = []
    if settings.seg:
        with times.stage("seg"):
            try:
                segmentations = build_segmentations(
                    images, equipment, SeriesPlan.new(OutputKind.SEG, findings.revision))
                written.seg.extend(folder.save(seg.dataset, "SEG") for seg in segmentations)
            except Exception as exc:  # one object that cannot be built must not cost others
                failures.append(_failed("segmentation (SEG)", findings, exc))
                segmentations = []
    figures = _write_per_image(images, sources, equipment, findings, folder, settings,
                               saliency_methods, written, failures, times)
    density = [DensityImage(info, headers[info.ref.sop_instance_uid]) for info in findings.images
               if info.density is not None and info.ref.sop_instance_uid in headers]
    figures += _write_density_overlays(density, sources, findings, study_results, folder,
                                       settings, written, failures, times)
    if settings.sr and headers:
        with times.stage("sr"):
            notes = study_notes(findings, any(image.lesions for image in images))
            written.sr.append(folder.save(_report(images, segmentations, narrative, equipment,
                                                  findings, notes + failures,
                                                  list(headers.values()), density), "SR"))
    if settings.pdf:
        with times.stage("pdf"):
            try:
                pdf = render_report(findings, narrative, figures)
                write_durably(study_results / REPORT_PDF, pdf, fsync=fsync)
                pdf_headers = [image.header for image in images] or list(headers.values())[:1]
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


def _report(images: list[AnalysedImage], segmentations: list, narrative: Narrative,
            equipment: Equipment, findings: StudyFindings, notes: list[str],
            evidence: list[Dataset], density: list[DensityImage]) -> Dataset:
    """The SR with every measurement; if that cannot be built, one that says why."""
    plan = SeriesPlan.new(OutputKind.SR, findings.revision)
    try:
        return build_report(images, segmentations, narrative, equipment, plan, notes=notes,
                            evidence=evidence, density=density,
                            breast_density=findings.breast_density)
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
    """The saliency overlays as PNG, for a vision-capable LLM the user enabled (at most
    ``limit``: a prompt is not an archive)."""
    import io

    from PIL import Image

    from radlens.dicom_io.writers.overlay import render_overlay

    pngs: list[bytes] = []
    for info in findings.images:
        if not info.predictions or info.ref.sop_instance_uid not in sources:
            continue
        image = load_analysed(info, sources[info.ref.sop_instance_uid], study_results)
        method = chosen_method(image, saliency_methods)
        if method is None:
            continue
        decoded = pixels.decode_file(sources[image.sop_instance_uid])
        for number, frame in sorted(image.frames.items()):
            if method in frame.saliency and len(pngs) < limit:
                rgb = render_overlay(decoded.pixels[number], frame.saliency[method],
                                     image.mask(number))
                buffer = io.BytesIO()
                Image.fromarray(rgb).save(buffer, format="PNG")
                pngs.append(buffer.getvalue())
    return pngs


def _failed(what: str, findings: StudyFindings, exc: Exception) -> str:
    log.error("DICOM output not written", exc_info=exc,
              extra=kv(study=findings.study_instance_uid, output=what))
    return f"The {what} could not be written: {type(exc).__name__}: {exc}"[:1000]


def _write_per_image(images: list[AnalysedImage], sources: Mapping[str, Path],
                     equipment: Equipment, findings: StudyFindings, folder: OutputFolder,
                     settings: OutputSettings, saliency_methods: Sequence[str],
                     written: WrittenOutputs, failures: list[str],
                     times: StageTimes) -> list[Figure]:
    """Parametric Map and RGB overlay of every image with a saliency map, and the PDF's figures
    (the key frames: with a lesion, most confident first), decoding each source at most once."""
    map_plan = SeriesPlan.new(OutputKind.PARAMETRIC_MAP, findings.revision)
    overlay_plan = SeriesPlan.new(OutputKind.OVERLAY, findings.revision)
    figures: list[Figure] = []
    for number, image in enumerate(images, start=1):
        method = chosen_method(image, saliency_methods)
        if method is not None and settings.parametric_map:
            with times.stage("parametric_map"):
                try:
                    pm = build_parametric_map(image, method, equipment, map_plan,
                                              len(written.parametric_map) + 1)
                    written.parametric_map.append(folder.save(pm, "PM"))
                except Exception as exc:
                    failures.append(_failed(
                        f"saliency Parametric Map of {image.sop_instance_uid}", findings, exc))
        overlay = method is not None and settings.overlay
        figure = settings.pdf and bool(image.lesions)
        if not (overlay or figure):
            continue
        with times.stage("overlay"):  # the decode it needs included
            try:
                frames = pixels.decode_file(sources[image.sop_instance_uid]).pixels
            except Exception as exc:  # an undecodable source
                if overlay:
                    failures.append(_failed(f"saliency overlay of {image.sop_instance_uid}",
                                            findings, exc))
                continue
            if overlay:
                try:
                    with_pixels = dataclasses.replace(image, pixels=frames)
                    for sc in build_overlays(with_pixels, method, equipment, overlay_plan,
                                             len(written.overlay) + 1):
                        written.overlay.append(folder.save(sc, "SC"))
                except Exception as exc:  # a refused header
                    failures.append(_failed(f"saliency overlay of {image.sop_instance_uid}",
                                            findings, exc))
        if figure:
            with times.stage("pdf"):
                figures += _figures(image, number, frames, method, FIGURES)
            figures = sorted(figures, key=lambda f: -f.confidence)[:FIGURES]
    return figures


DENSITY_FIGURES = 4  # the four views of a screening mammogram


def _write_density_overlays(density: list[DensityImage], sources: Mapping[str, Path],
                            findings: StudyFindings, study_results: Path,
                            folder: OutputFolder, settings: OutputSettings,
                            written: WrittenOutputs, failures: list[str], times: StageTimes
                            ) -> list[Figure]:
    """The Grad-CAM overlay of every mammogram the density model read (a Secondary Capture
    each, its laterality and view kept, made by the density model's equipment), and the PDF's
    figures of up to four views."""
    from radlens.dicom_io.writers.overlay import render_overlay

    plan = SeriesPlan.new(OutputKind.OVERLAY, findings.revision)
    figures: list[tuple[tuple[int, int], Figure]] = []
    views = {"CC": 0, "MLO": 1}
    for image in density:
        reading = image.reading
        if reading.maps_file is None or not (settings.overlay or settings.pdf):
            continue
        sop_uid = image.info.ref.sop_instance_uid
        with times.stage("overlay"):
            try:
                frames = pixels.decode_file(sources[sop_uid]).pixels
                with np.load(study_results / reading.maps_file) as stored:
                    cam = stored["saliency_gradcam"].astype(np.float32)
            except Exception as exc:  # an undecodable source, a lost map
                failures.append(_failed(f"density overlay of {sop_uid}", findings, exc))
                continue
            if settings.overlay:
                try:
                    sc = build_density_overlay(image.header, image.info, frames[0], cam,
                                               Equipment.for_model(reading.model), plan,
                                               len(written.overlay) + 1)
                    written.overlay.append(folder.save(sc, "SC"))
                except Exception as exc:  # a refused header
                    failures.append(_failed(f"density overlay of {sop_uid}", findings, exc))
        if settings.pdf and len(figures) < DENSITY_FIGURES:
            zero = np.zeros(cam.shape, dtype=bool)
            side = reading.view_label or "view"
            warning = ", attention on artifacts!" if reading.attention_on_artifact else ""
            order = (views.get(reading.view or "", 2), 0 if reading.laterality == "R" else 1)
            figures.append((order, Figure(
                f"{side}: {reading.category}, {reading.attention.tissue:.0%} on tissue{warning}",
                render_overlay(frames[0], np.zeros(cam.shape, np.float32), zero),
                render_overlay(frames[0], cam, zero), confidence=-1.0,
                captions=("mammogram", "Grad-CAM: where the density model looked"))))
    return [figure for _, figure in sorted(figures, key=lambda item: item[0])]


def _figures(image: AnalysedImage, number: int, frames: np.ndarray, method: str | None,
             limit: int) -> list[Figure]:
    """The image's most confident frames with a lesion (at most ``limit``): outlined, and beside
    it the saliency overlay."""
    from radlens.dicom_io.writers.overlay import render_overlay

    def confidence(frame: int) -> float:
        return max(lesion.probability for lesion in image.frames[frame].prediction.lesions)

    figures = []
    key_frames = sorted((f for f, a in image.frames.items() if a.prediction.lesions),
                        key=lambda f: (-confidence(f), f))[:limit]
    for frame in key_frames:
        mask = image.mask(frame)
        zero = np.zeros(mask.shape, np.float32)
        saliency = image.frames[frame].saliency.get(method, zero) if method else zero
        title = f"image {number}" + (f", frame {frame + 1}" if image.info.frames > 1 else "")
        figures.append(Figure(title, render_overlay(frames[frame], zero, mask),
                              render_overlay(frames[frame], saliency, mask),
                              confidence=confidence(frame)))
    return figures


