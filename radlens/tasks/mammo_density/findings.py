"""What the breast density task finds: one reading per mammogram, and per breast and study."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from radlens.findings import TaskFinding, TaskSummary

TASK_NAME = "mammo_density"

DensityCategory = Literal["A", "B", "C", "D"]
DENSITY_MEANINGS: dict[str, str] = {"A": "almost entirely fatty",
                                    "B": "scattered areas of fibroglandular density",
                                    "C": "heterogeneously dense",
                                    "D": "extremely dense"}


class AttentionShares(BaseModel):
    """Where the density model's Grad-CAM mass lies: fractions that sum to 1."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    tissue: float = Field(ge=0, le=1, description="breast tissue, artifacts excepted")
    artifacts: float = Field(ge=0, le=1, description="markers, text, clips, paddle edges")
    outside: float = Field(ge=0, le=1, description="background outside the breast")


class DensityPrediction(TaskFinding):
    """The breast density model's reading of one mammogram."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    task: Literal["mammo_density"] = TASK_NAME
    category: DensityCategory
    probabilities: dict[DensityCategory, float]
    laterality: Literal["L", "R"] | None = Field(description="ImageLaterality (or Laterality); "
                                                 "None when the header states neither")
    view: str | None = Field(description="ViewPosition, e.g. CC or MLO")
    attention: AttentionShares
    attention_on_artifact: bool = Field(description="the share on tissue is below "
                                        "density.low_tissue_share: the category may rest on "
                                        "an artifact")
    ood_score: float | None = None
    maps_file: str | None = Field(default=None, description="npz with the Grad-CAM map "
                                  "(saliency_gradcam), relative to the study's results folder")

    @property
    def view_label(self) -> str:
        """Laterality and view as readers write them ("R CC"); empty when neither is known."""
        return " ".join(filter(None, (self.laterality, self.view)))


class BreastDensity(TaskSummary):
    """Per breast (its views' probabilities averaged) and per study: the denser breast, as
    readers report it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    task: Literal["mammo_density"] = TASK_NAME
    left: DensityCategory | None = None
    right: DensityCategory | None = None
    study: DensityCategory
    images: int = Field(ge=1, description="mammograms the category rests on")
    attention_warnings: int = Field(ge=0, description="of them, with attention on artifacts")

    @classmethod
    def of(cls, readings: list[DensityPrediction]) -> BreastDensity | None:
        """Each breast's category from the mean of its views' probabilities; the study's is
        the denser breast's (views without a laterality count for the study only)."""
        if not readings:
            return None
        order = ("A", "B", "C", "D")

        def category(items: list[DensityPrediction]) -> DensityCategory | None:
            if not items:
                return None
            means = {c: sum(r.probabilities[c] for r in items) / len(items) for c in order}
            return max(order, key=lambda c: (means[c], order.index(c)))  # type: ignore[return-value]

        left = category([r for r in readings if r.laterality == "L"])
        right = category([r for r in readings if r.laterality == "R"])
        sides = [c for c in (left, right) if c is not None]
        study = max(sides, key=order.index) if sides else category(readings)
        assert study is not None
        return cls(left=left, right=right, study=study, images=len(readings),
                   attention_warnings=sum(r.attention_on_artifact for r in readings))
