"""What the lesion task adds to the words of a study's answer: its notes, the PDF's lesion
table, the template narrative's lines, the facts an LLM may use and the checks on its text."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, Field

from radlens.findings import LesionMeasurements, StudyFindings
from radlens.reporting.narrative import Category
from radlens.tasks.base import NarrativePart, PdfTable

# ---- SR notes ----------------------------------------------------------------------------


def notes(findings: StudyFindings) -> list[str]:
    """Which frames of a clip got saliency."""
    found = []
    for image in findings.images:
        if image.frames > 1 and image.predictions:
            explained = [p.frame + 1 for p in image.predictions if p.saliency]
            shown = ", ".join(map(str, explained[:60])) + (" ..." if len(explained) > 60 else "")
            found.append(f"Image {image.ref.sop_instance_uid}: saliency computed for "
                         f"{len(explained)} of {len(image.predictions)} analysed frame(s)"
                         + (f" (frames {shown})." if explained else "."))
    return found


# ---- PDF ---------------------------------------------------------------------------------

MAX_TABLE_ROWS = 10  # the PDF is a summary with key frames; the SR carries every lesion


def _size(lesion: LesionMeasurements) -> str:
    if lesion.longest_diameter_mm is None or lesion.perpendicular_diameter_mm is None:
        return f"{lesion.longest_diameter_px:.0f} x {lesion.perpendicular_diameter_px:.0f} px"
    return f"{lesion.longest_diameter_mm:.1f} x {lesion.perpendicular_diameter_mm:.1f} mm"


def lesion_rows(findings: StudyFindings) -> list[list[str]]:
    """One row per lesion, numbered as in the SR and the narrative."""
    rows: list[list[str]] = []
    analysed = [image for image in findings.images if image.predictions]
    for image_number, image in enumerate(analysed, start=1):
        for prediction in image.predictions:
            for lesion in prediction.lesions:
                rows.append([
                    str(len(rows) + 1),
                    f"{image_number}" + (f"/{lesion.frame + 1}" if image.frames > 1 else ""),
                    lesion.lesion_class, f"{lesion.probability:.0%}", _size(lesion),
                    f"{lesion.area_mm2:.1f}" if lesion.area_mm2 is not None else "-",
                    f"{lesion.compactness:.2f}", f"{lesion.edge_sharpness:.1f}",
                    str(Category.for_lesion(lesion).value)])
    return rows


def pdf_table(findings: StudyFindings) -> PdfTable | None:
    """The lesion table (the most suspicious lesions), or why there is none."""
    if not any(image.predictions for image in findings.images):
        return None
    rows = lesion_rows(findings)
    shown = rows
    if len(rows) > MAX_TABLE_ROWS:  # the most suspicious first: category, probability
        shown = sorted(rows, key=lambda r: (-int(r[8]), -float(r[3].rstrip("%"))))[
            :MAX_TABLE_ROWS]
    return PdfTable(
        title=f"Lesions ({len(rows)})",
        columns=("#", "image", "class", "prob.", "size", "area mm²", "compact.", "sharpness",
                 "cat.*"),
        rows=shown,
        note=(f"the {MAX_TABLE_ROWS} most suspicious shown; every lesion is in the SR"
              if len(rows) > len(shown) else ""),
        footnote="* BI-RADS-style category: an AI suggestion, not a BI-RADS assessment.",
        empty="No lesion was detected by the model.")


# ---- template narrative ------------------------------------------------------------------

_MARGIN_WORDS = {1: "indistinct", 2: "mostly indistinct", 3: "partly defined",
                 4: "well defined", 5: "sharply defined"}
_SHAPE_WORDS = {1: "irregular", 2: "lobulated", 3: "oval", 4: "oval", 5: "round"}

LIMITATIONS = ("Limitations: automated segmentation and classification of 2-D images without "
               "clinical context or prior studies; saliency maps show where the model looked, "
               "not whether it is correct. Not for diagnostic use: to be reviewed by a "
               "qualified reader.")


def _size_words(lesion: LesionMeasurements) -> str:
    if lesion.longest_diameter_mm is not None and lesion.perpendicular_diameter_mm is not None:
        area = f", area {lesion.area_mm2:.1f} mm²" if lesion.area_mm2 is not None else ""
        return (f"{lesion.longest_diameter_mm:.1f} x {lesion.perpendicular_diameter_mm:.1f} mm"
                f"{area}")
    return (f"{lesion.longest_diameter_px:.0f} x {lesion.perpendicular_diameter_px:.0f} pixels "
            "(physical spacing unknown)")


def describe_lesion(number: int, lesion: LesionMeasurements, image_number: int,
                    frames: int) -> str:
    where = f"image {image_number}" + (f", frame {lesion.frame + 1}" if frames > 1 else "")
    levels = lesion.levels
    shape = _SHAPE_WORDS.get(levels.compactness or 3, "oval")
    margin = _MARGIN_WORDS.get(levels.edge_sharpness or 3, "partly defined")
    irregular = ("irregular border" if (levels.border_irregularity or 1) >= 4
                 else "smooth border" if (levels.border_irregularity or 1) <= 2
                 else "mildly irregular border")
    return (f"Lesion {number} ({where}): {lesion.lesion_class}-appearing, {shape}, {margin} "
            f"margins, {irregular}; {_size_words(lesion)}. Model probability "
            f"{lesion.probability:.0%}. Suggested: {Category.for_lesion(lesion).wording}.")


def narrative(findings: StudyFindings) -> NarrativePart | None:
    analysed = [image for image in findings.images if image.predictions]
    if not analysed:
        return None
    model = (f"{findings.model.name} {findings.model.version}" if findings.model
             else "no model")
    lines = [f"Automated analysis of {len(analysed)} ultrasound image(s) by {model}."]
    lesions = [(image_number, image.frames, lesion)
               for image_number, image in enumerate(analysed, start=1)
               for prediction in image.predictions for lesion in prediction.lesions]
    if not lesions:
        lines.append("Impression: no focal lesion detected by the model.")
    else:
        classes = sorted({lesion.lesion_class for _, _, lesion in lesions})
        lines.append(f"Impression: {len(lesions)} lesion(s) detected "
                     f"({', '.join(classes)}-appearing).")
        lines += [describe_lesion(number, lesion, image_number, frames)
                  for number, (image_number, frames, lesion) in enumerate(lesions, start=1)]
        if len(lesions) > 1:
            largest = max(lesions, key=lambda item: item[2].area_px)
            lines.append(f"The largest is lesion {lesions.index(largest) + 1}.")
    return NarrativePart(lines=lines, limitations=LIMITATIONS)


# ---- LLM facts and grounding -------------------------------------------------------------

class LesionFacts(BaseModel):
    number: int
    image: int
    frame: int
    lesion_class: str
    probability_percent: int
    malignant_probability_percent: int | None
    longest_diameter_mm: float | None
    perpendicular_diameter_mm: float | None
    area_mm2: float | None
    longest_diameter_px: float
    compactness: float
    edge_sharpness: float
    asymmetry: float
    border_irregularity: float
    levels: dict[str, int | None]
    suggested_category: int


class FrameFacts(BaseModel):
    number: int
    frame: int
    predicted_class: str
    probability_percent: dict[str, int]
    saliency_agreement: dict[str, dict[str, float]] = Field(default_factory=dict)


class LesionTaskFacts(BaseModel):
    """Each analysed frame's class probabilities and each lesion's measurements, numbered as
    in the narrative ("Lesion N", "image N")."""

    images: list[FrameFacts]
    lesions: list[LesionFacts]


def _mm(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


def facts(findings: StudyFindings) -> LesionTaskFacts | None:
    images, lesions = [], []
    analysed = [image for image in findings.images if image.predictions]
    if not analysed:
        return None
    for image_number, image in enumerate(analysed, start=1):
        for prediction in image.predictions:
            p = prediction.class_probabilities
            images.append(FrameFacts(
                number=image_number, frame=prediction.frame + 1,
                predicted_class=prediction.predicted_class,
                probability_percent={"normal": round(100 * p.normal),
                                     "benign": round(100 * p.benign),
                                     "malignant": round(100 * p.malignant)},
                saliency_agreement={method: {"dice": round(a.dice, 2),
                                             "mass_inside": round(a.mass_inside, 2)}
                                    for method, a in prediction.saliency.items()}))
            for lesion in prediction.lesions:
                lesions.append(LesionFacts(
                    number=len(lesions) + 1, image=image_number, frame=lesion.frame + 1,
                    lesion_class=lesion.lesion_class,
                    probability_percent=round(100 * lesion.probability),
                    malignant_probability_percent=(
                        round(100 * lesion.malignant_probability)
                        if lesion.malignant_probability is not None else None),
                    longest_diameter_mm=_mm(lesion.longest_diameter_mm),
                    perpendicular_diameter_mm=_mm(lesion.perpendicular_diameter_mm),
                    area_mm2=_mm(lesion.area_mm2),
                    longest_diameter_px=round(lesion.longest_diameter_px, 1),
                    compactness=round(lesion.compactness, 2),
                    edge_sharpness=round(lesion.edge_sharpness, 1),
                    asymmetry=round(lesion.asymmetry, 2),
                    border_irregularity=round(lesion.border_irregularity, 2),
                    levels=lesion.levels.model_dump(),
                    suggested_category=Category.for_lesion(lesion).value))
    return LesionTaskFacts(images=images, lesions=lesions)


def grounding_numbers(stated: Mapping[str, Any]) -> set[float]:
    """Every number the lesion facts allow, in every unit and rounding a narrative may use."""
    task_facts = LesionTaskFacts.model_validate(stated)
    values: set[float] = set()

    def add(value: float | None, *, decimals: tuple[int, ...] = (0, 1, 2)) -> None:
        if value is None:
            return
        for d in decimals:
            values.add(round(float(value), d))

    for image in task_facts.images:
        add(image.number)
        add(image.frame)
        for percent in image.probability_percent.values():
            add(percent)
            add(percent / 100)
        for agreement in image.saliency_agreement.values():
            for value in agreement.values():
                add(value)
                add(value * 100, decimals=(0,))
    for lesion in task_facts.lesions:
        for value in (lesion.number, lesion.image, lesion.frame, lesion.probability_percent,
                      lesion.malignant_probability_percent, lesion.compactness,
                      lesion.edge_sharpness, lesion.asymmetry, lesion.border_irregularity,
                      lesion.longest_diameter_px, lesion.suggested_category):
            add(value)
        for percent in (lesion.probability_percent, lesion.malignant_probability_percent):
            if percent is not None:
                add(percent / 100)
        for mm in (lesion.longest_diameter_mm, lesion.perpendicular_diameter_mm):
            add(mm)
            add(None if mm is None else mm / 10)  # cm
        add(lesion.area_mm2)
        add(None if lesion.area_mm2 is None else lesion.area_mm2 / 100)  # cm²
        for level in lesion.levels.values():
            add(level)
    values.add(float(len(task_facts.lesions)))
    return values


_LESION = re.compile(r"\blesion\s+(\d+)\b", re.IGNORECASE)
_WORD_NUMBERS = {"no": 0, "one": 1, "a single": 1, "single": 1, "two": 2, "three": 3,
                 "four": 4, "five": 5, "six": 6}
_COUNT = re.compile(r"\b(\d+|no|one|a single|single|two|three|four|five|six)\s+(?:focal\s+|"
                    r"distinct\s+|separate\s+)?lesions?\b", re.IGNORECASE)


def violations(text: str, stated: Mapping[str, Any] | None) -> list[str]:
    """Lesions that do not exist, a class a lesion does not have, a count the findings do not
    hold."""
    from radlens.reporting.grounding import sentences

    lesions = LesionTaskFacts.model_validate(stated).lesions if stated is not None else []
    found = []
    numbers = {lesion.number: lesion for lesion in lesions}
    for match in _LESION.finditer(text):
        number = int(match.group(1))
        if number not in numbers:
            found.append(f"lesion {number} does not exist (the findings hold "
                         f"{len(numbers)} lesion(s))")
    for number, lesion in numbers.items():
        for sentence in sentences(text):
            if not re.search(rf"\blesion\s+{number}\b", sentence, re.IGNORECASE):
                continue
            other = "malignant" if lesion.lesion_class == "benign" else "benign"
            if re.search(rf"\b{other}(-appearing| lesion)?\b", sentence, re.IGNORECASE) and \
                    not re.search(rf"\b{lesion.lesion_class}\b", sentence, re.IGNORECASE):
                found.append(f"lesion {number} is {lesion.lesion_class}, not {other}")
    if not lesions and re.search(r"\b(a|one|two|\d+) (focal )?(lesion|mass)(es|s)? "
                                 r"(is|are|was|were) (seen|detected|found|present)",
                                 text, re.IGNORECASE):
        found.append("the findings hold no lesion")
    for match in _COUNT.finditer(text):
        said = match.group(1).lower()
        count = int(said) if said.isdigit() else _WORD_NUMBERS[said]
        if count != len(lesions):
            found.append(f"'{match.group(0)}': the findings hold {len(lesions)} lesion(s)")
    return found
