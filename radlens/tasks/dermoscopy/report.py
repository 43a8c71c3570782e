"""What the dermoscopy task adds to a study's answer: a SEG of each photograph's refined
lesion; a TID 1500 measurement group per photograph with the ABC(D) values (each with its
units and its severity level), the melanoma probability, the assessment, the retrieved
descriptors as qualitative evaluations, the attention on the lesion and the OOD score; a
Grad-CAM overlay with the lesion outlined; the PDF's table and figures; the narrative in the
published reports' three sections, the facts an LLM may use, and the rules its text is
checked by (a descriptor the findings do not hold, or that a level contradicts, is refused).
Where the patient's prior visit of the lesion is known, the group holds the change in each
value with the prior visit's date and study, and the narrative and PDF state both dates; a
change the narrative claims against the findings, or without a prior visit, is refused.

Each feature's severity level is a measurement of its own (1 to 5) beside the feature's
value, its concept naming the feature it grades. A
photograph without Pixel Spacing states B per pixel and no diameter: nothing is guessed.
"""

from __future__ import annotations

import datetime as dt
import logging
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from pydantic import BaseModel

from radlens.findings import StudyFindings
from radlens.tasks.base import AnalysedSource, OutputContext, SrContent
from radlens.tasks.dermoscopy import codes
from radlens.tasks.dermoscopy.findings import TASK_NAME, DermoscopyReading, PriorVisit

log = logging.getLogger(__name__)

SEGMENT = "skin lesion"
# Sites on the body's midline: an image of one has no side (Image Laterality U).
UNPAIRED_SITES = frozenset({"back", "abdomen", "trunk", "scalp", "neck", "nose", "lip"})
SEGMENT_COLOUR = (250, 170, 30)


def readings_of(findings: StudyFindings) -> list[tuple[int, Any, DermoscopyReading]]:
    """(image number in the study's findings, image, reading) of every photograph read."""
    from radlens.tasks.dermoscopy import TASK

    return [(number, info, reading)
            for number, info in enumerate(findings.images, start=1)
            for reading in TASK.readings(info)]


# ---- SEG ---------------------------------------------------------------------------------

def segmentations(context: OutputContext, equipment: Any, plan: Any) -> list[Any]:
    """One SEG per photograph read (its refined lesion as one segment), built with highdicom
    on the photograph's grid; a photograph whose mask is lost is left out and logged."""
    from radlens.tasks.dermoscopy import TASK

    written = []
    for image in context.analysed_by(TASK_NAME):
        for reading in TASK.readings(image.info):
            if reading.maps_file is None or reading.lesion_pixels == 0:
                continue
            try:
                with np.load(context.study_results / reading.maps_file) as stored:
                    mask = stored["lesion_mask"].astype(bool)
            except (OSError, KeyError, ValueError) as exc:
                log.warning("dermoscopy lesion mask not readable: no SEG for the image",
                            extra={"sop": image.info.ref.sop_instance_uid, "error": str(exc)})
                continue
            written.append(_segmentation(image, mask, equipment, plan, len(written) + 1))
    return written


def _segmentation(image: AnalysedSource, mask: np.ndarray, equipment: Any, plan: Any,
                  instance_number: int) -> Any:
    import highdicom as hd
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    from radlens.dicom_io import codes as common
    from radlens.dicom_io.writers.common import geometry_sources
    from radlens.dicom_io.writers.seg import WrittenSegmentation

    algorithm = hd.AlgorithmIdentificationSequence(
        name=equipment.algorithm_name, version=equipment.algorithm_version,
        family=common.ARTIFICIAL_INTELLIGENCE)
    description = hd.seg.SegmentDescription(
        segment_number=1, segment_label=SEGMENT,
        segmented_property_category=common.MORPHOLOGICALLY_ALTERED_STRUCTURE,
        segmented_property_type=codes.SKIN_LESION,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm, tracking_uid=generate_uid(),
        tracking_id="radlens skin lesion",
        display_color=hd.color.CIELabColor.from_rgb(*SEGMENT_COLOUR))
    spacing = image.info.spacing
    headers, pixel_measures = geometry_sources(
        [image.header], (spacing.row_mm, spacing.column_mm) if spacing else None)
    seg = hd.seg.Segmentation(
        source_images=headers, pixel_array=mask[None, :, :, None].astype(np.uint8),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[description],
        series_instance_uid=plan.series_instance_uid, series_number=plan.series_number,
        sop_instance_uid=generate_uid(), instance_number=instance_number,
        manufacturer=equipment.manufacturer, manufacturer_model_name=equipment.model_name,
        software_versions=equipment.software_versions,
        device_serial_number=equipment.device_serial_number,
        content_description="radlens skin lesion", content_label="LESION",
        transfer_syntax_uid=ExplicitVRLittleEndian, pixel_measures=pixel_measures,
        omit_empty_frames=True)
    seg.SeriesDescription = plan.description
    return WrittenSegmentation(seg, {SEGMENT: 1}, (image.info.ref.sop_instance_uid,))


# ---- SR ----------------------------------------------------------------------------------

def sr_content(context: OutputContext, segmentations: Sequence[Any] = ()) -> SrContent:
    from radlens.tasks.dermoscopy import TASK

    images = context.analysed_by(TASK_NAME)
    if not images:
        return SrContent()
    by_source = {uid: seg for seg in segmentations for uid in seg.source_sop_instance_uids}
    groups = [_group(image, reading, by_source.get(image.info.ref.sop_instance_uid))
              for image in images for reading in TASK.readings(image.info)]
    return SrContent(groups=groups, procedures=[codes.DERMOSCOPIC_PHOTOGRAPHY],
                     referenced=[image.header for image in images])


def _site(image: AnalysedSource, reading: DermoscopyReading) -> Any:
    """The finding site: the photograph's anatomic region as its header codes it, with the
    side; the skin when the header names none."""
    import highdicom as hd
    from pydicom.sr.coding import Code

    from radlens.dicom_io import codes as common

    site = codes.SKIN
    regions = image.header.get("AnatomicRegionSequence")
    if regions:
        item = regions[0]
        try:
            site = Code(str(item.CodeValue), str(item.CodingSchemeDesignator),
                        str(item.CodeMeaning))
        except AttributeError:
            pass
    return hd.sr.FindingSite(site, laterality=common.SIDES.get(reading.laterality or ""))


def _group(image: AnalysedSource, reading: DermoscopyReading, segmentation: Any) -> Any:
    import highdicom as hd
    from pydicom.uid import generate_uid

    from radlens.dicom_io import codes as common
    from radlens.dicom_io.writers.sr import whole_image

    no_units = common.UCUM_NO_UNITS
    outline = whole_image(image.info)
    measurements = [hd.sr.Measurement(codes.MELANOMA_PROBABILITY,
                                      round(reading.melanoma_probability, 4), no_units,
                                      referenced_coordinates=outline)]

    def level(feature: str, value: int | None) -> None:
        if value is not None:
            measurements.append(hd.sr.Measurement(codes.LEVELS[feature], value, no_units))

    m = reading.measurements
    if m is not None:
        measurements += [hd.sr.Measurement(common.ASYMMETRY, m.asymmetry, no_units)]
        level("asymmetry", m.levels.get("asymmetry"))
        if m.border_per_mm is not None:
            measurements.append(hd.sr.Measurement(codes.BORDER_CURVATURE, m.border_per_mm,
                                                  codes.UCUM_PER_MM))
        else:
            measurements.append(hd.sr.Measurement(codes.BORDER_CURVATURE, m.border_per_pixel,
                                                  codes.UCUM_PER_PIXEL))
        measurements.append(hd.sr.Measurement(codes.BORDER_TURNS, m.border_turns, no_units))
        level("border", m.levels.get("border"))
        measurements += [hd.sr.Measurement(codes.HUE_SD, m.hue_sd, no_units),
                         hd.sr.Measurement(codes.SATURATION_SD, m.saturation_sd, no_units),
                         hd.sr.Measurement(codes.VALUE_SD, m.value_sd, no_units),
                         hd.sr.Measurement(codes.COLOUR_SCORE, m.colour_score, no_units)]
        level("colour", m.levels.get("colour"))
        if m.diameter_mm is not None:
            measurements.append(hd.sr.Measurement(codes.DIAMETER, m.diameter_mm,
                                                  common.UCUM_MM))
            level("diameter_mm", m.levels.get("diameter_mm"))
        if m.area_mm2 is not None:
            measurements.append(hd.sr.Measurement(common.AREA, m.area_mm2, common.UCUM_MM2))
    if reading.attention_on_lesion is not None:
        measurements.append(hd.sr.Measurement(
            codes.ATTENTION_ON_LESION, reading.attention_on_lesion, no_units,
            method=common.SALIENCY_METHODS["gradcam"]))
    if reading.alignment is not None:
        measurements.append(hd.sr.Measurement(codes.ALIGNMENT, reading.alignment, no_units))
    if reading.ood_score is not None:
        measurements.append(hd.sr.Measurement(common.OOD_SCORE, reading.ood_score, no_units))
    if reading.prior is not None:
        units = {"border_per_mm": codes.UCUM_PER_MM, "diameter_mm": common.UCUM_MM,
                 "area_mm2": common.UCUM_MM2}
        measurements += [hd.sr.Measurement(codes.CHANGE_SINCE_PRIOR[name], value.change,
                                           units.get(name, no_units))
                         for name, value in reading.prior.changes.items()
                         if name in codes.CHANGE_SINCE_PRIOR]
    evaluations = [hd.sr.QualitativeEvaluation(
        codes.ASSESSMENT, codes.MALIGNANT_MELANOMA if reading.assessment == "melanoma"
        else codes.NEVUS)]
    evaluations += [hd.sr.QualitativeEvaluation(codes.DERMOSCOPIC_FEATURE,
                                                codes.DESCRIPTOR_CODES[d.name])
                    for d in reading.descriptors if d.name in codes.DESCRIPTOR_CODES]
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=generate_uid(), identifier=f"Skin lesion "
            f"{reading.lesion_id or image.info.ref.sop_instance_uid[-12:]}"),
        finding_type=codes.SKIN_LESION,
        algorithm_id=hd.sr.AlgorithmIdentification(name=reading.model.name,
                                                   version=reading.model.version),
        finding_sites=[_site(image, reading)],
        measurements=measurements, qualitative_evaluations=evaluations,
        source_images=[hd.sr.SourceImageForMeasurementGroup(
            referenced_sop_class_uid=image.info.ref.sop_class_uid,
            referenced_sop_instance_uid=image.info.ref.sop_instance_uid)])
    if reading.prior is not None:
        content = group[0].ContentSequence
        content.append(hd.sr.DateContentItem(
            name=codes.PRIOR_VISIT_DATE,
            value=dt.date.fromisoformat(reading.prior.prior_study_date),
            relationship_type=hd.sr.RelationshipTypeValues.CONTAINS))
        content.append(hd.sr.UIDRefContentItem(
            name=codes.PRIOR_VISIT_STUDY, value=reading.prior.prior_study_instance_uid,
            relationship_type=hd.sr.RelationshipTypeValues.CONTAINS))
    if segmentation is not None:
        seg = segmentation.dataset
        group[0].ContentSequence.append(hd.sr.ImageContentItem(
            name=common.REFERENCED_SEGMENT, referenced_sop_class_uid=seg.SOPClassUID,
            referenced_sop_instance_uid=seg.SOPInstanceUID,
            referenced_segment_numbers=[1],
            relationship_type=hd.sr.RelationshipTypeValues.CONTAINS))
    return group


# ---- overlays and PDF figures ------------------------------------------------------------

def _outlined(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The photograph in its own colours with the lesion's border drawn."""
    from radlens.dicom_io.writers.overlay import draw_outline

    return draw_outline(np.clip(image, 0, 255).astype(np.uint8).copy(), mask)


def image_outputs(context: OutputContext, plans: Any) -> Any:
    """A Grad-CAM overlay per photograph read (a Secondary Capture with the lesion outlined),
    and the PDF's figures: the photograph with its outline beside the saliency map."""
    from radlens.dicom_io import pixels
    from radlens.dicom_io.writers.common import Equipment
    from radlens.dicom_io.writers.overlay import build_heat_overlay, render_overlay
    from radlens.reporting.pdf import Figure
    from radlens.tasks.base import ImageOutputs
    from radlens.tasks.dermoscopy import TASK

    settings = context.settings
    out = ImageOutputs()
    number = plans.first_overlay
    for image in context.analysed_by(TASK_NAME):
        for reading in TASK.readings(image.info):
            if reading.maps_file is None or not (settings.overlay or settings.pdf):
                continue
            sop_uid = image.info.ref.sop_instance_uid
            try:
                photograph = pixels.decode_file(image.path).pixels[0]
                with np.load(context.study_results / reading.maps_file) as stored:
                    cam = stored["saliency_gradcam"].astype(np.float32)
                    mask = stored["lesion_mask"].astype(bool)
            except Exception as exc:  # an undecodable source, a lost map
                out.failures.append(f"dermoscopy overlay of {sop_uid}: "
                                    f"{type(exc).__name__}: {exc}")
                continue
            where = _where(reading)
            if settings.overlay:
                header = image.header
                if reading.laterality is None and "ImageLaterality" not in header and \
                        (reading.site or "").lower() in UNPAIRED_SITES:
                    header = header.copy()  # the site has no side: say so on the overlay
                    header.ImageLaterality = "U"
                comments = (f"Grad-CAM of the dermoscopy model over {sop_uid}"
                            f"{' (' + where + ')' if where else ''}, lesion outlined: "
                            f"{reading.assessment}, melanoma probability "
                            f"{reading.melanoma_probability:.0%}, "
                            f"{reading.attention_on_lesion or 0:.0%} of the attention on the "
                            "lesion. Saliency shows what the model attends to, not whether it "
                            "is right.")
                try:
                    out.overlays.append(build_heat_overlay(
                        header, image.info, photograph, cam,
                        Equipment.for_model(reading.model), plans.overlay, number,
                        comments=comments, outline=mask))
                    number += 1
                except Exception as exc:  # a refused header
                    out.failures.append(f"dermoscopy overlay of {sop_uid}: "
                                        f"{type(exc).__name__}: {exc}")
            if settings.pdf:
                out.figures.append(Figure(
                    f"{where or 'lesion'}: {reading.assessment}, melanoma "
                    f"{reading.melanoma_probability:.0%}",
                    _outlined(photograph, mask), render_overlay(photograph, cam, mask),
                    confidence=reading.melanoma_probability,
                    captions=("photograph, lesion outlined",
                              "Grad-CAM: where the model looked")))
    return out


def _where(reading: DermoscopyReading) -> str:
    side = {"L": "left", "R": "right"}.get(reading.laterality or "", "")
    return " ".join(filter(None, (side, (reading.site or "").lower(),
                                  f"lesion {reading.lesion_id}" if reading.lesion_id
                                  else ""))).strip()


# ---- PDF table ---------------------------------------------------------------------------

def _value(value: float | None, level: int | None, digits: int) -> str:
    if value is None:
        return "-"
    return f"{value:.{digits}f}" + (f" ({level})" if level is not None else "")


def pdf_table(findings: StudyFindings) -> Any:
    from radlens.tasks.base import PdfTable

    rows = []
    for number, _, reading in readings_of(findings):
        m = reading.measurements
        levels = m.levels if m is not None else {}
        rows.append([str(number), _where(reading) or "-",
                     _value(m.asymmetry if m else None, levels.get("asymmetry"), 2),
                     _value(m.border_turns if m else None, levels.get("border"), 2),
                     _value(m.colour_score if m else None, levels.get("colour"), 2),
                     _value(m.diameter_mm if m else None, levels.get("diameter_mm"), 1),
                     f"{reading.melanoma_probability:.0%}", reading.assessment])
    if not rows:
        return None
    changes = [f"image {number}: {_change_line(facts_of_prior(reading.prior))}"
               for number, _, reading in readings_of(findings) if reading.prior is not None]
    return PdfTable(
        title="Dermoscopy: ABC(D) of each lesion",
        columns=("image", "site", "A (level)", "B turns (level)", "C (level)", "D mm (level)",
                 "melanoma*", "assessment*"),
        rows=rows,
        footnote="A asymmetry about the principal axes; B the border's total turning (1 when "
                 "convex); C the sum of the hue, saturation and value spreads; D the largest "
                 "diameter where the pixel spacing is known; levels 1 (least) to 5. * An AI "
                 "suggestion, calibrated; not for diagnostic use."
                 + "".join(f" Change since the prior visit, {line}." for line in changes))


# ---- narrative, facts and grounding ------------------------------------------------------

PROMPT_GUIDANCE = (
    "When the findings hold dermoscopy, the narrative has three parts, each opening with its "
    "name: 'Quantitative analysis:' (each lesion's A, B, C and, when stated, D with their "
    "levels 1-5, exactly as the findings give them), 'Visual features:' (only the descriptors "
    "the findings list, never one that contradicts a level, e.g. not 'symmetric' beside an "
    "asymmetry level of 4 or 5) and 'Risk assessment:' (the melanoma probability and the "
    "assessment as an AI suggestion). Where a photograph's facts hold a prior visit, a "
    "fourth part, 'Change since the prior visit:', gives both dates and each change exactly "
    "as the facts give them; no other date, and no change the facts do not hold.")

LIMITATIONS = ("Limitations: an automated reading of dermoscopic photographs without the "
               "patient's history, palpation or the lesion's evolution unless a prior visit "
               "is stated; trained on synthetic phantoms; Grad-CAM shows where the model "
               "looked, not whether it is correct. Not for diagnostic use: to be reviewed by "
               "a dermatologist.")

_LEVEL_NAMES = {"asymmetry": "asymmetry", "border": "border", "colour": "colour",
                "diameter_mm": "diameter"}


class PhotographFacts(BaseModel):
    number: int
    site: str | None
    side: str | None
    melanoma_probability_percent: int
    assessment: str
    asymmetry: float | None
    border_turns: float | None
    border_per_mm: float | None
    colour_score: float | None
    diameter_mm: float | None
    levels: dict[str, int | None]
    descriptors: list[str]
    attention_on_lesion_percent: int | None
    prior: PriorFacts | None = None


class ChangeFacts(BaseModel):
    """One value at the prior visit and now, as the narrative writes them."""

    prior: float
    now: float
    change: float


class PriorFacts(BaseModel):
    """The same lesion at the prior visit: both dates, the interval and each change (A, B,
    C to 2 decimals, D in mm to 1, the probability in percent and percentage points)."""

    prior_date: str
    date: str
    interval_days: int
    changes: dict[str, ChangeFacts]
    prior_assessment: str
    same_model: bool


class DermoscopyFacts(BaseModel):
    """Each photograph's ABC(D), levels, descriptors, probability and assessment."""

    photographs: list[PhotographFacts]


def facts(findings: StudyFindings) -> DermoscopyFacts | None:
    photographs = []
    for number, _, reading in readings_of(findings):
        m = reading.measurements
        photographs.append(PhotographFacts(
            number=number, site=(reading.site or "").lower() or None,
            side={"L": "left", "R": "right"}.get(reading.laterality or ""),
            melanoma_probability_percent=round(100 * reading.melanoma_probability),
            assessment=reading.assessment,
            asymmetry=None if m is None else round(m.asymmetry, 2),
            border_turns=None if m is None else round(m.border_turns, 2),
            border_per_mm=None if m is None or m.border_per_mm is None
            else round(m.border_per_mm, 3),
            colour_score=None if m is None else round(m.colour_score, 2),
            diameter_mm=None if m is None or m.diameter_mm is None else round(m.diameter_mm, 1),
            levels=dict(m.levels) if m is not None else {},
            descriptors=[d.name for d in reading.descriptors],
            attention_on_lesion_percent=None if reading.attention_on_lesion is None
            else round(100 * reading.attention_on_lesion),
            prior=None if reading.prior is None else facts_of_prior(
                reading.prior, same_model=reading.prior.prior_model
                == f"{reading.model.name} {reading.model.version}")))
    return DermoscopyFacts(photographs=photographs) if photographs else None


# How the narrative names each value compared, its decimals and unit; the probability is in
# percent, its change in percentage points.
_CHANGE_NAMES = {"asymmetry": ("asymmetry", 2, ""), "border_turns": ("border", 2, ""),
                 "colour_score": ("colour", 2, ""), "diameter_mm": ("diameter", 1, " mm"),
                 "melanoma_probability": ("melanoma probability", 0, "%")}


def facts_of_prior(prior: PriorVisit, *, same_model: bool = True) -> PriorFacts:
    changes = {}
    for name, (_, digits, unit) in _CHANGE_NAMES.items():
        value = prior.changes.get(name)
        if value is None:
            continue
        scale = 100.0 if unit == "%" else 1.0
        before, after = round(scale * value.prior, digits), round(scale * value.now, digits)
        changes[name] = ChangeFacts(prior=before, now=after, change=round(after - before, digits))
    return PriorFacts(prior_date=prior.prior_study_date, date=prior.study_date,
                      interval_days=prior.interval_days, changes=changes,
                      prior_assessment=prior.prior_assessment, same_model=same_model)


def _change_line(prior: PriorFacts) -> str:
    """"2025-03-01 to 2025-09-01 (184 days): asymmetry 0.12 to 0.25 (+0.13); ..." """
    parts = []
    for name, value in prior.changes.items():
        label, digits, unit = _CHANGE_NAMES[name]
        change_unit = " points" if unit == "%" else unit
        parts.append(f"{label} {value.prior:.{digits}f}{unit} to {value.now:.{digits}f}{unit} "
                     f"({value.change:+.{digits}f}{change_unit})")
    return (f"{prior.prior_date} to {prior.date} ({prior.interval_days} days): "
            + ("; ".join(parts) or "nothing both visits measured"))


def narrative(findings: StudyFindings) -> Any:
    """The three sections of the published reports, from the findings alone."""
    from radlens.tasks.base import NarrativePart

    stated = facts(findings)
    if stated is None:
        return None
    readings = readings_of(findings)
    model = f"{readings[0][2].model.name} {readings[0][2].model.version}"
    lines = [f"Dermoscopy of {len(stated.photographs)} photograph(s) by {model}, an AI "
             "suggestion."]
    for photo in stated.photographs:
        where = " ".join(filter(None, (photo.side, photo.site))) or "the lesion"
        parts = []
        for key, value, digits in (("asymmetry", photo.asymmetry, 2),
                                   ("border", photo.border_turns, 2),
                                   ("colour", photo.colour_score, 2),
                                   ("diameter_mm", photo.diameter_mm, 1)):
            if value is None:
                continue
            unit = " mm" if key == "diameter_mm" else ""
            parts.append(f"{_LEVEL_NAMES[key]} {value:.{digits}f}{unit} (level "
                         f"{photo.levels.get(key)})")
        quantitative = "; ".join(parts) if parts else "the lesion's outline could not be measured"
        lines.append(f"Quantitative analysis ({where}, image {photo.number}): {quantitative}.")
        lines.append("Visual features: " + (", ".join(photo.descriptors) or "none retrieved")
                     + ".")
        lines.append(f"Risk assessment: {photo.assessment}, melanoma probability "
                     f"{photo.melanoma_probability_percent}% (calibrated).")
        if photo.prior is not None:
            lines.append(f"Change since the prior visit: {_change_line(photo.prior)}; then "
                         f"{photo.prior.prior_assessment}."
                         + ("" if photo.prior.same_model else " The prior reading was by "
                            "another model version: a change of model is not a change of "
                            "the lesion."))
    return NarrativePart(lines=lines, limitations=LIMITATIONS)


def grounding_numbers(stated: Mapping[str, Any]) -> set[float]:
    derm = DermoscopyFacts.model_validate(stated)
    values: set[float] = {float(len(derm.photographs))}
    for photo in derm.photographs:
        numbers = [photo.number, photo.melanoma_probability_percent,
                   photo.attention_on_lesion_percent, photo.asymmetry, photo.border_turns,
                   photo.border_per_mm, photo.colour_score, photo.diameter_mm,
                   *photo.levels.values()]
        for value in numbers:
            if value is None:
                continue
            for decimals in (0, 1, 2, 3):
                values.add(round(float(value), decimals))
        for percent in (photo.melanoma_probability_percent, photo.attention_on_lesion_percent):
            if percent is not None:
                for decimals in (0, 1, 2):
                    values.add(round(percent / 100, decimals))
        if photo.diameter_mm is not None:
            values.add(round(photo.diameter_mm / 10, 2))  # in cm
        if photo.prior is not None:
            days = photo.prior.interval_days
            values |= {float(days), round(days / 7), round(days / 30.4375),
                       round(days / 30.4375, 1), round(days / 365.25, 1)}
            for change in photo.prior.changes.values():
                for value in (change.prior, change.now, abs(change.change)):
                    for decimals in (0, 1, 2, 3):
                        values.add(round(float(value), decimals))
    return values


def stated_dates(stated: Mapping[str, Any]) -> frozenset[str]:
    """This study's and each prior visit's dates, which the narrative states."""
    derm = DermoscopyFacts.model_validate(stated)
    return frozenset(date for p in derm.photographs if p.prior is not None
                     for date in (p.prior.prior_date, p.prior.date))


def named_sides(stated: Mapping[str, Any]) -> frozenset[str]:
    derm = DermoscopyFacts.model_validate(stated)
    return frozenset(p.side for p in derm.photographs if p.side)


# How a narrative may name each descriptor; the pattern must not match its opposite
# ("symmetric" inside "asymmetric" is not a word of its own).
_DESCRIBED = {
    # "asymmetry 0.31", "asymmetry (level 4)" or "asymmetry change" is the measurement A, not
    # the descriptor
    "asymmetric shape": r"\basymmetric\b|\basymmetry\b(?!\s*(?:[-+(]?\s*\d|\(?level|change))",
    "symmetric shape": r"\bsymmetric\b",
    "irregular border": r"\birregular(?:ly)?\b[^.;]*\bborder", "regular border":
    r"(?<!ir)\bregular\b[^.;]*\bborder", "multiple colours": r"\b(?:multiple|several|many)\s+"
    r"colou?rs\b", "one or two colours": r"\b(?:one or two|uniform|single)\s+colou?rs?\b",
    "regular pigment network": r"(?<!a)\btypical\b[^.;]*network|(?<!ir)\bregular\b[^.;]*"
    r"network", "atypical pigment network": r"\batypical\b[^.;]*network",
    "blue-gray areas": r"\bblue[- ]gr[ae]y\b", "white regression areas":
    r"\b(?:white|regression)\b", "black dots or blotches": r"\bblack\b",
    "red areas": r"\bred\b", "streaks": r"\bstreaks?\b",
}
# A descriptor a level contradicts: (feature, the lowest level that contradicts it).
_CONTRADICTED_BY = {"symmetric shape": ("asymmetry", 4), "regular border": ("border", 4),
                    "one or two colours": ("colour", 4)}
_NEGATED = re.compile(r"\b(?:no|not|without|neither|nor|absent)\b[^.;,]*$", re.IGNORECASE)
_LEVEL = re.compile(r"\b(asymmetry|border|colou?r|diameter)\b[^.;]*?\blevel\s*(\d)",
                    re.IGNORECASE)
_MELANOMA_CLAIM = re.compile(r"\b(?:suggest\w*|consistent with|likely|suspicious for|"
                             r"indicat\w*|probable)\b[^.;]*\bmelanoma\b", re.IGNORECASE)


# A claim of change over time (not a mention: "unless a prior visit is stated" claims none).
_CHANGE_WORDS = re.compile(r"\b(?:(?:since|from|compared (?:with|to)) the (?:prior|previous|"
                           r"last|earlier|first) (?:visit|study|examination)|(?:has|have) "
                           r"(?:grown|enlarged|increased|decreased|shrunk|changed)|unchanged|"
                           r"stable)\b", re.IGNORECASE)
_RISE = re.compile(r"\b(?:increas\w*|gr[eo]w\w*|enlarg\w*|rose|risen|higher|larger|more)\b",
                   re.IGNORECASE)
_FALL = re.compile(r"\b(?:decreas\w*|shr[ua]nk\w*|smaller|lower|fell|fallen|less|regress\w*)\b",
                   re.IGNORECASE)
_FEATURE_WORDS = {"asymmetry": r"\basymmetr", "border_turns": r"\bborder",
                  "colour_score": r"\bcolou?r", "diameter_mm": r"\b(?:diameter|size)",
                  "melanoma_probability": r"\bprobabilit"}


def _change_violations(sentence: str, derm: DermoscopyFacts) -> list[str]:
    """A change claimed where no prior visit is known, or in the wrong direction."""
    priors = [p.prior for p in derm.photographs if p.prior is not None]
    if not priors:
        if _CHANGE_WORDS.search(sentence):
            return [f"'{sentence.strip()[:80]}': the findings hold no prior visit to compare "
                    "with"]
        return []
    found = []
    rises, falls = bool(_RISE.search(sentence)), bool(_FALL.search(sentence))
    if rises == falls:  # neither, or both (a list of changes): nothing one-way to check
        return []
    for name, pattern in _FEATURE_WORDS.items():
        if not re.search(pattern, sentence, re.IGNORECASE):
            continue
        changes = [p.changes[name].change for p in priors if name in p.changes]
        if not changes:
            found.append(f"a change of {name.split('_')[0]} is claimed, but the visits do not "
                         "both measure it")
        elif rises and all(c <= 0 for c in changes):
            found.append(f"{name.split('_')[0]} is said to rise, but it did not")
        elif falls and all(c >= 0 for c in changes):
            found.append(f"{name.split('_')[0]} is said to fall, but it did not")
    return found


def _named(sentence: str, descriptor: str) -> bool:
    """Whether ``sentence`` names ``descriptor`` affirmatively (not after a negation)."""
    for match in re.finditer(_DESCRIBED[descriptor], sentence, re.IGNORECASE):
        if not _NEGATED.search(sentence[:match.start()]):
            return True
    return False


def violations(text: str, stated: Mapping[str, Any] | None) -> list[str]:
    """A descriptor the findings do not hold or a level contradicts, a level the findings do
    not give, or a melanoma the model did not suggest."""
    from radlens.reporting.grounding import sentences

    derm = DermoscopyFacts.model_validate(stated) if stated is not None else None
    found = []
    for sentence in sentences(text):
        levels = [(m.group(1).lower().replace("color", "colour"), int(m.group(2)))
                  for m in _LEVEL.finditer(sentence)]
        named = [d for d in _DESCRIBED if _named(sentence, d)]
        if derm is None:
            if levels:
                found.append(f"'{sentence.strip()[:80]}': the findings hold no dermoscopy")
            continue
        held = {d for p in derm.photographs for d in p.descriptors}
        for descriptor in named:
            if descriptor not in held:
                found.append(f"the descriptor '{descriptor}' is not in the findings (they "
                             f"hold {', '.join(sorted(held)) or 'none'})")
            if descriptor in _CONTRADICTED_BY:
                feature, lowest = _CONTRADICTED_BY[descriptor]
                if any((p.levels.get(feature) or 0) >= lowest for p in derm.photographs):
                    found.append(f"'{descriptor}' contradicts the measured {feature} "
                                 f"(level {lowest} or more)")
        for feature, level in levels:
            key = "diameter_mm" if feature == "diameter" else feature
            if not any(p.levels.get(key) == level for p in derm.photographs):
                found.append(f"{feature} level {level} is not in the findings")
        found += _change_violations(sentence, derm)
        claim = _MELANOMA_CLAIM.search(sentence)
        if claim and not _NEGATED.search(sentence[:claim.end()]) and \
                all(p.assessment != "melanoma" for p in derm.photographs):
            found.append("melanoma is suggested, but the model's assessment is nevus")
    return found
