"""What the dermoscopy task finds: one reading per photograph."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from radlens.findings import TaskFinding

TASK_NAME = "dermoscopy"
Severity = int  # 1-5


class AbcMeasurements(BaseModel):
    """The lesion's ABC(D) features on its refined mask, and their 1-5 levels."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    asymmetry: float = Field(ge=0, description="A: mean of the two principal axes")
    asymmetry_axes: tuple[float, float]
    border_per_mm: float | None = Field(description="B: mean curvature, 1/mm (spacing known)")
    border_per_pixel: float = Field(ge=0, description="B: mean curvature, 1/pixel")
    border_turns: float = Field(ge=0, description="B x perimeter / 2 pi: 1 when convex")
    hue_sd: float = Field(ge=0, description="C: circular SD of hue, in turns")
    saturation_sd: float = Field(ge=0)
    value_sd: float = Field(ge=0)
    colour_score: float = Field(ge=0, description="sigma H + sigma S + sigma V")
    diameter_mm: float | None = Field(description="D: largest Feret diameter (spacing known)")
    area_mm2: float | None = None
    levels: dict[str, int | None] = Field(description="asymmetry, border, colour, diameter_mm")


class RetrievedDescriptor(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    similarity: float = Field(ge=-1, le=1, description="cosine of image and phrase")
    probability: float = Field(ge=0, le=1)


class Change(BaseModel):
    """One value at the prior visit and now."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    prior: float
    now: float
    change: float = Field(description="now minus prior")


class PriorVisit(BaseModel):
    """The same lesion at the patient's prior visit, and what changed since."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    study_date: str = Field(description="this study's date, YYYY-MM-DD")
    prior_study_date: str = Field(description="the prior visit's study date, YYYY-MM-DD")
    prior_study_instance_uid: str
    interval_days: int = Field(ge=1)
    changes: dict[str, Change] = Field(description="asymmetry, border_turns, border_per_mm, "
                                       "colour_score, diameter_mm, area_mm2, "
                                       "melanoma_probability: those both visits measured")
    prior_levels: dict[str, int | None]
    prior_assessment: Literal["nevus", "melanoma"]
    prior_model: str = Field(description="the model (name and version) of the prior reading")


class DermoscopyReading(TaskFinding):
    """The dermoscopy model's reading of one photograph."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    task: Literal["dermoscopy"] = TASK_NAME
    melanoma_probability: float = Field(ge=0, le=1, description="as stated (calibrated)")
    assessment: Literal["nevus", "melanoma"] = Field(description="at a probability of 0.5")
    measurements: AbcMeasurements | None = Field(description="None: the mask could not be "
                                                 "measured (see measurement_note)")
    measurement_note: str | None = None
    descriptors: list[RetrievedDescriptor] = Field(description="the top three, one of each "
                                                   "complementary pair")
    refined: bool = Field(description="the refined mask was kept (else the coarse one)")
    refinement_note: str | None = None
    refiner: str
    lesion_pixels: int = Field(ge=0)
    alignment: float | None = Field(default=None, description="cosine of the image's and "
                                    "its features' embeddings")
    attention_on_lesion: float | None = Field(default=None, ge=0, le=1,
                                              description="Grad-CAM mass on the lesion mask")
    ood_score: float | None = None
    site: str | None = Field(default=None, description="the anatomic region's meaning")
    laterality: Literal["L", "R"] | None = None
    lesion_id: str | None = Field(default=None, description="how the site identifies the "
                                  "lesion across visits")
    lesion_key: str | None = Field(default=None, description="the lesion as the site's "
                                   "matching rule names it in every study of the patient "
                                   "(None: not compared)")
    prior: PriorVisit | None = Field(default=None, description="the change since the "
                                     "patient's prior visit of this lesion, where one is known")
    maps_file: str | None = Field(default=None, description="npz with the lesion mask "
                                  "(lesion_mask) and Grad-CAM (saliency_gradcam)")
