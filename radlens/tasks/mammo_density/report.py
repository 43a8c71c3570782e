"""What the breast density task adds to a study's answer: an SR group per mammogram and each
breast's composition, a Grad-CAM overlay per mammogram, the PDF's density table and views, the
narrative's lines, the facts an LLM may use and the rules its text is checked by."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import numpy as np
from pydantic import BaseModel

from radlens.findings import StudyFindings
from radlens.tasks.base import (
    AnalysedSource,
    ImageOutputs,
    ImagePlans,
    NarrativePart,
    OutputContext,
    PdfTable,
    SrContent,
)
from radlens.tasks.mammo_density import codes
from radlens.tasks.mammo_density.findings import (
    DENSITY_MEANINGS,
    TASK_NAME,
    BreastDensity,
    DensityPrediction,
)

FIGURES = 4  # the four views of a screening mammogram
_SIDE_WORDS = {"L": "left", "R": "right"}

PROMPT_GUIDANCE = (
    "When the findings hold breast density (mammograms), the impression also gives the BI-RADS "
    "breast composition (A almost entirely fatty, B scattered fibroglandular, C heterogeneously "
    "dense, D extremely dense) of each breast the findings name and of the study, as an AI "
    "suggestion, with any attention-on-artifact warning; name a side only as the findings do.")

LIMITATIONS = ("Limitations: automated breast density categories of 2-D mammograms "
               "without clinical context or prior studies; readers themselves disagree "
               "between neighbouring categories; Grad-CAM shows where the model looked, "
               "not whether it is correct. Not for diagnostic use: to be reviewed by a "
               "qualified reader.")


def readings_of(findings: StudyFindings) -> list[tuple[int, Any, DensityPrediction]]:
    """(image number in the study's findings, image, reading) of every mammogram read."""
    from radlens.tasks.mammo_density import TASK

    return [(number, info, reading)
            for number, info in enumerate(findings.images, start=1)
            for reading in TASK.readings(info)]


# ---- notes -------------------------------------------------------------------------------

def notes(findings: StudyFindings) -> list[str]:
    return [f"Image {info.ref.sop_instance_uid}: attention-on-artifact warning. Only "
            f"{reading.attention.tissue:.0%} of the density model's Grad-CAM attention lies "
            f"on breast tissue ({reading.attention.artifacts:.0%} on markers, text, clips or "
            f"paddle edges, {reading.attention.outside:.0%} outside the breast): breast "
            f"composition {reading.category} may rest on an artifact."
            for _, info, reading in readings_of(findings) if reading.attention_on_artifact]


# ---- SR ----------------------------------------------------------------------------------

def sr_content(context: OutputContext, summary: BreastDensity | None) -> SrContent:
    from radlens.tasks.mammo_density import TASK

    images = context.analysed_by(TASK_NAME)
    if not images:
        return SrContent()
    groups = [_group(image, reading) for image in images for reading in TASK.readings(image.info)]
    evaluations = _composition_items(summary) if summary is not None else []
    return SrContent(groups=groups, evaluations=evaluations, procedures=[codes.MAMMOGRAPHY],
                     referenced=[image.header for image in images])


def _group(image: AnalysedSource, reading: DensityPrediction) -> Any:
    """One mammogram's breast composition (CID 6000) with its view and laterality, the
    probabilities behind it and where Grad-CAM put its attention."""
    import highdicom as hd
    from pydicom.uid import generate_uid

    from radlens.dicom_io import codes as common
    from radlens.dicom_io.writers.sr import whole_image

    outline = whole_image(image.info)
    measurements = [
        hd.sr.Measurement(codes.DENSITY_PROBABILITY[category], round(probability, 4),
                          common.UCUM_NO_UNITS,
                          referenced_coordinates=outline if number == 0 else None)
        for number, (category, probability) in enumerate(sorted(reading.probabilities.items()))]
    shares = reading.attention
    measurements += [
        hd.sr.Measurement(codes.ATTENTION_ON_TISSUE, round(shares.tissue, 4),
                          common.UCUM_NO_UNITS, method=common.SALIENCY_METHODS["gradcam"]),
        hd.sr.Measurement(codes.ATTENTION_ON_ARTIFACTS, round(shares.artifacts, 4),
                          common.UCUM_NO_UNITS),
        hd.sr.Measurement(codes.ATTENTION_OUTSIDE, round(shares.outside, 4),
                          common.UCUM_NO_UNITS),
    ]
    if reading.ood_score is not None:
        measurements.append(hd.sr.Measurement(common.OOD_SCORE, round(reading.ood_score, 3),
                                              common.UCUM_NO_UNITS))
    evaluations = [hd.sr.QualitativeEvaluation(
        codes.BREAST_COMPOSITION, codes.BREAST_COMPOSITION_VALUES[reading.category])]
    if reading.view in codes.VIEWS:
        evaluations.append(hd.sr.QualitativeEvaluation(codes.IMAGE_VIEW,
                                                       codes.VIEWS[reading.view]))
    if reading.laterality is not None:
        evaluations.append(hd.sr.QualitativeEvaluation(common.IMAGE_LATERALITY,
                                                       common.SIDES[reading.laterality]))
    if reading.attention_on_artifact:
        evaluations.append(hd.sr.QualitativeEvaluation(codes.ATTENTION_WARNING,
                                                       codes.ATTENTION_ON_ARTIFACT))
    side = f"{reading.laterality or ''}{reading.view or ''}" or "view"
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=generate_uid(), identifier=f"Breast composition {side} "
            f"{image.info.ref.sop_instance_uid[-12:]}"),
        finding_type=codes.BREAST_COMPOSITION,
        algorithm_id=hd.sr.AlgorithmIdentification(name=reading.model.name,
                                                   version=reading.model.version),
        finding_sites=[hd.sr.FindingSite(
            codes.BREAST, laterality=common.SIDES.get(reading.laterality or ""))],
        measurements=measurements,
        qualitative_evaluations=evaluations,
        source_images=[hd.sr.SourceImageForMeasurementGroup(
            referenced_sop_class_uid=image.info.ref.sop_class_uid,
            referenced_sop_instance_uid=image.info.ref.sop_instance_uid)],
    )


def _composition_items(summary: BreastDensity) -> list[Any]:
    """Per breast and for the study (the denser breast): TID 1500's qualitative evaluations."""
    import highdicom as hd

    from radlens.dicom_io import codes as common

    items = []
    for side, category in (("R", summary.right), ("L", summary.left), (None, summary.study)):
        if category is None:
            continue
        item = hd.sr.CodeContentItem(name=codes.BREAST_COMPOSITION,
                                     value=codes.BREAST_COMPOSITION_VALUES[category],
                                     relationship_type=hd.sr.RelationshipTypeValues.CONTAINS)
        if side is not None:
            item.ContentSequence = hd.sr.ContentSequence([hd.sr.CodeContentItem(
                name=common.LATERALITY, value=common.SIDES[side],
                relationship_type=hd.sr.RelationshipTypeValues.HAS_CONCEPT_MOD)])
        items.append(item)
    return items


# ---- overlays and PDF figures ------------------------------------------------------------

def image_outputs(context: OutputContext, plans: ImagePlans) -> ImageOutputs:
    """The Grad-CAM overlay of every mammogram read (a Secondary Capture each, its laterality
    and view kept, made by the density model's equipment), and the PDF's figures of up to
    four views, CC before MLO and right before left."""
    from radlens.dicom_io import pixels
    from radlens.dicom_io.writers.common import Equipment
    from radlens.dicom_io.writers.overlay import build_heat_overlay, render_overlay
    from radlens.reporting.pdf import Figure
    from radlens.tasks.mammo_density import TASK

    settings = context.settings
    out = ImageOutputs()
    figures: list[tuple[tuple[int, int], Figure]] = []
    views = {"CC": 0, "MLO": 1}
    number = plans.first_overlay
    for image in context.analysed_by(TASK_NAME):
        for reading in TASK.readings(image.info):
            if reading.maps_file is None or not (settings.overlay or settings.pdf):
                continue
            sop_uid = image.info.ref.sop_instance_uid
            try:
                frames = pixels.decode_file(image.path).pixels
                with np.load(context.study_results / reading.maps_file) as stored:
                    cam = stored["saliency_gradcam"].astype(np.float32)
            except Exception as exc:  # an undecodable source, a lost map
                out.failures.append(f"density overlay of {sop_uid}: "
                                    f"{type(exc).__name__}: {exc}")
                continue
            if settings.overlay:
                side = reading.view_label
                warning = (" Attention-on-artifact warning: only "
                           f"{reading.attention.tissue:.0%} of it lies on breast tissue."
                           if reading.attention_on_artifact else "")
                comments = (f"{side + ': ' if side else ''}Grad-CAM of the breast density "
                            f"model over {sop_uid} (composition {reading.category}).{warning} "
                            "Saliency shows what the model attends to, not whether it is "
                            "right.")
                try:
                    out.overlays.append(build_heat_overlay(
                        image.header, image.info, frames[0], cam,
                        Equipment.for_model(reading.model), plans.overlay, number,
                        comments=comments))
                    number += 1
                except Exception as exc:  # a refused header
                    out.failures.append(f"density overlay of {sop_uid}: "
                                        f"{type(exc).__name__}: {exc}")
            if settings.pdf and len(figures) < FIGURES:
                zero = np.zeros(cam.shape, dtype=bool)
                side = reading.view_label or "view"
                warning = ", attention on artifacts!" if reading.attention_on_artifact else ""
                order = (views.get(reading.view or "", 2), 0 if reading.laterality == "R" else 1)
                figures.append((order, Figure(
                    f"{side}: {reading.category}, {reading.attention.tissue:.0%} on tissue"
                    f"{warning}",
                    render_overlay(frames[0], np.zeros(cam.shape, np.float32), zero),
                    render_overlay(frames[0], cam, zero), confidence=-1.0,
                    captions=("mammogram", "Grad-CAM: where the density model looked"))))
    out.figures = [figure for _, figure in sorted(figures, key=lambda item: item[0])]
    return out


# ---- PDF table ---------------------------------------------------------------------------

def pdf_table(findings: StudyFindings, summary: BreastDensity | None) -> PdfTable | None:
    rows = [[str(number), reading.laterality or "-", reading.view or "-", reading.category,
             f"{reading.probabilities[reading.category]:.0%}", f"{reading.attention.tissue:.0%}",
             "attention on artifacts" if reading.attention_on_artifact else "-"]
            for number, _, reading in readings_of(findings)]
    if not rows or summary is None:
        return None
    sides = ", ".join(f"{name} {category}" for name, category in
                      (("right", summary.right), ("left", summary.left)) if category)
    return PdfTable(
        title=f"Breast density: study {summary.study}" + (f" ({sides})" if sides else ""),
        columns=("image", "side", "view", "category*", "prob.", "attention on tissue",
                 "warning"),
        rows=rows,
        footnote="* BI-RADS breast composition (A fatty .. D extremely dense): an AI "
                 "suggestion; the study takes the denser breast.")


# ---- narrative ---------------------------------------------------------------------------

def narrative(findings: StudyFindings, summary: BreastDensity | None) -> NarrativePart | None:
    """The breast composition per breast and for the study, and any attention warning."""
    readings = readings_of(findings)
    if summary is None or not readings:
        return None
    model = f"{readings[0][2].model.name} {readings[0][2].model.version}"
    sides = [f"{name} breast {category} ({DENSITY_MEANINGS[category]})"
             for name, category in (("right", summary.right), ("left", summary.left))
             if category is not None]
    lines = [f"Breast density of {summary.images} mammogram(s) by {model}, an AI suggestion of "
             "the BI-RADS breast composition."]
    if sides:
        lines.append(f"Density: {'; '.join(sides)}.")
    lines.append(f"Study density category: {summary.study} ({DENSITY_MEANINGS[summary.study]})"
                 + (", the denser breast." if len(sides) == 2 else "."))
    if summary.attention_warnings:
        lines.append(f"Attention-on-artifact warning on {summary.attention_warnings} "
                     "mammogram(s): the model looked mostly outside the breast tissue (markers, "
                     "text, clips or paddle edges), so their category may rest on an artifact.")
    return NarrativePart(lines=lines, limitations=LIMITATIONS)


class MammogramFacts(BaseModel):
    number: int
    side: str | None  # "left" / "right", as ImageLaterality says
    view: str | None
    category: str
    probability_percent: dict[str, int]
    attention_on_tissue_percent: int
    attention_on_artifact: bool


class DensityFacts(BaseModel):
    """Breast density: per breast, for the study (the denser breast), and per mammogram."""

    left: str | None
    right: str | None
    study: str
    mammograms: list[MammogramFacts]
    attention_warnings: int


def facts(findings: StudyFindings, summary: BreastDensity | None) -> DensityFacts | None:
    if summary is None:
        return None
    mammograms = [
        MammogramFacts(number=number, side=_SIDE_WORDS.get(reading.laterality or ""),
                       view=reading.view, category=reading.category,
                       probability_percent={c: round(100 * p) for c, p in
                                            reading.probabilities.items()},
                       attention_on_tissue_percent=round(100 * reading.attention.tissue),
                       attention_on_artifact=reading.attention_on_artifact)
        for number, _, reading in readings_of(findings)]
    return DensityFacts(left=summary.left, right=summary.right, study=summary.study,
                        mammograms=mammograms, attention_warnings=summary.attention_warnings)


def grounding_numbers(stated: Mapping[str, Any]) -> set[float]:
    density = DensityFacts.model_validate(stated)
    values = {float(len(density.mammograms)), float(density.attention_warnings)}
    for mammogram in density.mammograms:
        for value in (mammogram.number, mammogram.attention_on_tissue_percent,
                      *mammogram.probability_percent.values()):
            for decimals in (0, 1, 2):
                values.add(round(float(value), decimals))
        for value in (mammogram.attention_on_tissue_percent,
                      *mammogram.probability_percent.values()):
            for decimals in (0, 1, 2):
                values.add(round(value / 100, decimals))
    return values


def named_sides(stated: Mapping[str, Any]) -> frozenset[str]:
    density = DensityFacts.model_validate(stated)
    return frozenset({"left", "right"} & {m.side for m in density.mammograms if m.side})


# A density category, by letter ("category C", "density C", "composition (C)") or in words.
_DENSITY_LETTER = re.compile(r"\b(?i:category|composition|density|BI-RADS)\s*[:(]?\s*([A-D])\b")
_DENSITY_WORDS = {"almost entirely fat": "A", "scattered fibroglandular": "B",
                  "scattered areas": "B", "heterogeneously dense": "C",
                  "extremely dense": "D"}


def _categories(sentence: str) -> set[str]:
    named = {m.group(1) for m in _DENSITY_LETTER.finditer(sentence)}
    lower = sentence.lower()
    return named | {c for words, c in _DENSITY_WORDS.items() if words in lower}


def violations(text: str, stated: Mapping[str, Any] | None) -> list[str]:
    """A density category the findings do not hold, or one given to the wrong breast."""
    from radlens.reporting.grounding import sentences

    density = DensityFacts.model_validate(stated) if stated is not None else None
    found = []
    for sentence in sentences(text):
        named = _categories(sentence)
        if not named:
            continue
        if density is None:
            found.append(f"'{sentence.strip()[:80]}': the findings hold no breast density")
            continue
        held = {density.study} | {m.category for m in density.mammograms}
        for category in sorted(named - held):
            found.append(f"density category {category} is not in the findings (they "
                         f"hold {', '.join(sorted(held))})")
        lower = sentence.lower()
        for side in ("left", "right"):
            other = "right" if side == "left" else "left"
            if re.search(rf"\b{side}\b", lower) and not re.search(rf"\b{other}\b", lower):
                breast = getattr(density, side)
                allowed = {breast} | {m.category for m in density.mammograms if m.side == side}
                for category in sorted(named - allowed - {None}):
                    found.append(f"the {side} breast is "
                                 f"{breast if breast else 'not in the findings'}, not "
                                 f"{category}")
    return found
