"""The LLM prompt, built from a study's findings alone (docs/method.md: the narrative).

Free of identifiers by construction: ``StudyFacts`` is made from ``StudyFindings``, which holds no
names, IDs, dates or header free text, and images are numbered here instead of being named by
their UIDs. The facts go to the model as structured JSON, never as prose, with the tasks of the
published report adapted to one study.
"""

from __future__ import annotations

import json

from pydantic import BaseModel, Field

from radlens.findings import StudyFindings
from radlens.reporting.narrative import Category

SYSTEM = (
    "You are a careful radiology reporting assistant for breast imaging research. You write "
    "only what the structured findings you are given support: every number you write must be "
    "one of theirs, rounded as given, and you never add a lesion, a side, a location, a size or "
    "a finding they do not hold. Nothing you write is a diagnosis: the category is an AI "
    "suggestion for a qualified reader. Answer with JSON matching the schema you are given."
)

TASKS = (
    "From the findings JSON below, write: (1) impression: a short, readable clinical summary of "
    "the study; (2) lesions: for each lesion, in order, a one- or two-sentence description using "
    "its measurements and five-level descriptors (1 very low .. 5 very high), naming it 'Lesion "
    "N'; (3) comparison: how the lesions compare by size, shape and margins (or 'single "
    "lesion' / 'no lesion'); (4) recommendation: the BI-RADS-style category of each lesion "
    "worded as an AI suggestion (normal maps to 1, benign to 2-3, malignant to 4-5); (5) "
    "limitations: what this automated analysis cannot tell (2-D images, no clinical context, "
    "saliency shows where the model looked, not whether it is correct). When the findings hold "
    "density (mammograms), the impression also gives the BI-RADS breast composition (A almost "
    "entirely fatty, B scattered fibroglandular, C heterogeneously dense, D extremely dense) of "
    "each breast the findings name and of the study, as an AI suggestion, with any "
    "attention-on-artifact warning; name a side only as the findings do."
)


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


class ImageFacts(BaseModel):
    number: int
    frame: int
    predicted_class: str
    probability_percent: dict[str, int]
    saliency_agreement: dict[str, dict[str, float]] = Field(default_factory=dict)


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


class StudyFacts(BaseModel):
    """Everything the LLM may know about a study, and all the grounding checks against."""

    modality: str
    body_part: str = "breast"
    model: str
    images_analysed: int
    images_not_analysed: int
    images: list[ImageFacts]
    lesions: list[LesionFacts]
    density: DensityFacts | None = None

    @classmethod
    def from_findings(cls, findings: StudyFindings) -> StudyFacts:
        images, lesions = [], []
        analysed = [image for image in findings.images if image.predictions]
        for image_number, image in enumerate(analysed, start=1):
            for prediction in image.predictions:
                p = prediction.class_probabilities
                images.append(ImageFacts(
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
        modality = next((image.modality for image in analysed if image.modality), "US") or "US"
        model = f"{findings.model.name} {findings.model.version}" if findings.model else "none"
        return cls(modality=modality, model=model, images_analysed=len(analysed),
                   images_not_analysed=sum(1 for i in findings.images if i.not_analysed),
                   images=images, lesions=lesions, density=_density_facts(findings))


_SIDE_WORDS = {"L": "left", "R": "right"}


def _density_facts(findings: StudyFindings) -> DensityFacts | None:
    summary = findings.breast_density
    if summary is None:
        return None
    mammograms = [
        MammogramFacts(number=number, side=_SIDE_WORDS.get(image.density.laterality or ""),
                       view=image.density.view, category=image.density.category,
                       probability_percent={c: round(100 * p) for c, p in
                                            image.density.probabilities.items()},
                       attention_on_tissue_percent=round(100 * image.density.attention.tissue),
                       attention_on_artifact=image.density.attention_on_artifact)
        for number, image in enumerate(findings.images, start=1) if image.density is not None]
    return DensityFacts(left=summary.left, right=summary.right, study=summary.study,
                        mammograms=mammograms, attention_warnings=summary.attention_warnings)


def _mm(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


def chat_messages(facts: StudyFacts, *, violations: list[str] | None = None
                  ) -> list[dict[str, str]]:
    """System and user messages; on a retry, the grounding violations to correct."""
    user = f"{TASKS}\n\nFindings JSON:\n{json.dumps(facts.model_dump(), indent=1)}"
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}]
    if violations:
        messages.append({"role": "user", "content": (
            "Your previous answer was rejected because it is not supported by the findings:\n- "
            + "\n- ".join(violations) + "\nWrite it again using only the findings.")})
    return messages
