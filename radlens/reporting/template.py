"""The deterministic narrative: the embedded default, and the fallback whenever the LLM is off,
slow, wrong or absent. Built from the findings alone, in a plain clinical style."""

from __future__ import annotations

from radlens.findings import DENSITY_MEANINGS, LesionMeasurements, StudyFindings
from radlens.reporting.narrative import TEMPLATE_AUTHOR, Category, Narrative

_LEVEL_WORDS = {1: "very low", 2: "low", 3: "moderate", 4: "high", 5: "very high"}
_MARGIN_WORDS = {1: "indistinct", 2: "mostly indistinct", 3: "partly defined",
                 4: "well defined", 5: "sharply defined"}
_SHAPE_WORDS = {1: "irregular", 2: "lobulated", 3: "oval", 4: "oval", 5: "round"}


def _size(lesion: LesionMeasurements) -> str:
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
            f"margins, {irregular}; {_size(lesion)}. Model probability "
            f"{lesion.probability:.0%}. Suggested: {Category.for_lesion(lesion).wording}.")


LIMITATIONS = ("Limitations: automated segmentation and classification of 2-D images without "
               "clinical context or prior studies; saliency maps show where the model looked, "
               "not whether it is correct. Not for diagnostic use: to be reviewed by a "
               "qualified reader.")


DENSITY_LIMITATIONS = ("Limitations: automated breast density categories of 2-D mammograms "
                       "without clinical context or prior studies; readers themselves disagree "
                       "between neighbouring categories; Grad-CAM shows where the model looked, "
                       "not whether it is correct. Not for diagnostic use: to be reviewed by a "
                       "qualified reader.")


def density_lines(findings: StudyFindings) -> list[str]:
    """The breast composition per breast and for the study, and any attention warning."""
    summary = findings.breast_density
    readings = [image.density for image in findings.images if image.density is not None]
    if summary is None or not readings:
        return []
    model = f"{readings[0].model.name} {readings[0].model.version}"
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
    return lines


def template_narrative(findings: StudyFindings) -> Narrative:
    analysed = [image for image in findings.images if image.predictions]
    model = (f"{findings.model.name} {findings.model.version}" if findings.model
             else "no model")
    density = density_lines(findings)
    if not analysed and not density:
        return _nothing_analysed(findings, model)
    if not analysed:
        lines = [*density, *_not_analysed_lines(findings), DENSITY_LIMITATIONS]
        return Narrative(text="\n".join(lines), author=TEMPLATE_AUTHOR)
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
    lines += density
    lines += _not_analysed_lines(findings)
    lines.append(LIMITATIONS)
    return Narrative(text="\n".join(lines), author=TEMPLATE_AUTHOR)


def _not_analysed_lines(findings: StudyFindings) -> list[str]:
    lines = []
    not_analysed = [image for image in findings.images if image.not_analysed]
    if not_analysed:
        lines.append(f"{len(not_analysed)} image(s) were not analysed (see the report notes).")
    abstained = sum(len(image.abstained) for image in findings.images if image.predictions)
    if abstained:
        lines.append(f"{abstained} frame(s) were not analysed because they are unlike the "
                     "images the model was trained on; no finding is stated for them.")
    return lines


def _nothing_analysed(findings: StudyFindings, model: str) -> Narrative:
    """No frame was analysed: say so, and state no finding either way."""
    received = len(findings.images) + len(findings.skipped)
    lines = [f"No image of this study was analysed by {model}: {received} object(s) received, "
             "none within the model's scope or like its training images (the reasons are in "
             "the report notes). radlens makes no statement about this study.",
             "Not for diagnostic use."]
    return Narrative(text="\n".join(lines), author=TEMPLATE_AUTHOR)
