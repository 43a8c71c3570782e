"""The domain types every stage speaks: what an image is, where it came from, what was found.

Pydantic models are the boundary (they become ``findings.json``); ``DecodedImage`` carries pixels
between stages in memory. Nothing heavy is imported here so any package can depend on it.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict, Field, SerializeAsAny, model_validator

if TYPE_CHECKING:
    import numpy as np

FINDINGS_SCHEMA_VERSION = 2  # 2: every task's readings under images[].analyses, summaries

# Schema 1 kept the two models' readings in fields of their own: the tasks that read them now,
# by the names they were filed under (``predictions``: the lesion model's frames).
SCHEMA_1_TASK_FIELDS = {"predictions": "breast_us", "density": "mammo_density"}
_SCHEMA_1_SUMMARY_FIELDS = {"breast_density": "mammo_density"}
_UNKNOWN_MODEL = {"name": "unknown", "version": "unknown", "architecture": "unknown"}

SpacingSource = Literal["PixelSpacing", "PixelMeasuresSequence", "SequenceOfUltrasoundRegions"]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ImageRef(_Frozen):
    """Which DICOM object an image or a finding belongs to."""

    study_instance_uid: str = Field(min_length=1, max_length=64)
    series_instance_uid: str = Field(min_length=1, max_length=64)
    sop_instance_uid: str = Field(min_length=1, max_length=64)
    sop_class_uid: str = Field(min_length=1, max_length=64)


class PixelSpacing(_Frozen):
    """Physical size of one pixel, in millimetres, and the attribute it was read from."""

    row_mm: float = Field(gt=0, description="distance between the centres of adjacent rows")
    column_mm: float = Field(gt=0, description="distance between the centres of adjacent columns")
    source: SpacingSource


LesionClass = Literal["benign", "malignant"]


class AnatomyOverlap(_Frozen):
    """A named structure of the configured label map that a mask overlaps."""

    label: int
    name: str
    pixels: int = Field(ge=1)
    fraction_of_mask: float = Field(ge=0, le=1)


class Levels(_Frozen):
    """Each descriptor on a 1 (very low) to 5 (very high) scale, for reports and narratives."""

    size: int | None
    compactness: int | None
    edge_sharpness: int | None
    asymmetry: int | None
    border_irregularity: int | None
    intensity_variation: int | None


class LesionMeasurements(_Frozen):
    """One lesion of one frame. Pixel coordinates are (row, column) of the source frame."""

    index: int = Field(ge=1, description="1-based, largest lesion first")
    frame: int = Field(ge=0)
    lesion_class: LesionClass
    probability: float = Field(ge=0, le=1, description="mean class probability inside it")
    malignant_probability: float | None = Field(
        default=None, ge=0, le=1, description="mean malignant probability inside it: the "
        "likelihood behind the BI-RADS-style suggestion")
    area_px: int = Field(ge=1)
    area_mm2: float | None
    perimeter_px: float
    perimeter_mm: float | None
    compactness: float = Field(description="4*pi*area/perimeter^2: 1 for a disc")
    edge_sharpness: float = Field(description="mean gradient magnitude on the boundary")
    centroid_fraction: tuple[float, float] = Field(description="(x, y) over width and height")
    centroid_px: tuple[float, float] = Field(description="(row, column)")
    bbox_px: tuple[int, int, int, int] = Field(description="row min, column min, row max, "
                                                            "column max (inclusive)")
    longest_diameter_px: float
    longest_diameter_mm: float | None
    perpendicular_diameter_px: float
    perpendicular_diameter_mm: float | None
    long_axis_px: tuple[tuple[float, float], tuple[float, float]] = Field(
        description="end points (row, column) of the longest diameter")
    short_axis_px: tuple[tuple[float, float], tuple[float, float]] = Field(
        description="end points (row, column) of the perpendicular diameter")
    elongation: float
    asymmetry: float = Field(description="|M - mirror(M)| / area about the principal axes")
    mean_abs_curvature_px: float = Field(description="mean |d tangent angle / d arc length| "
                                                     "of the smoothed contour, per pixel")
    border_irregularity: float = Field(description="total absolute turning / 2*pi: 1 for a "
                                                   "convex outline")
    intensity_mean: list[float]
    intensity_std: list[float]
    levels: Levels
    anatomy: list[AnatomyOverlap] = Field(default_factory=list)


class SaliencyAgreement(_Frozen):
    """How a saliency map agrees with the predicted lesion mask of its frame."""

    dice: float = Field(ge=0, le=1, description="map at an adaptive percentile vs the mask")
    mass_inside: float = Field(ge=0, le=1, description="share of the map's mass in the mask")
    anatomy: list[AnatomyOverlap] = Field(default_factory=list,
                                          description="where the thresholded map lies")


class ClassProbabilities(_Frozen):
    normal: float = Field(ge=0, le=1)
    benign: float = Field(ge=0, le=1)
    malignant: float = Field(ge=0, le=1)


class FramePrediction(_Frozen):
    """What the model made of one frame, at the frame's own size."""

    frame: int = Field(ge=0)
    class_probabilities: ClassProbabilities
    predicted_class: Literal["normal", "benign", "malignant"]
    lesion_pixels: dict[Literal["benign", "malignant"], int]
    lesions: list[LesionMeasurements] = Field(default_factory=list)
    saliency: dict[str, SaliencyAgreement] = Field(
        default_factory=dict, description="per method; saliency shows what the model attends "
                                          "to, not whether it is right")
    anatomy_note: str | None = Field(default=None, description="why anatomy was not mapped")
    ood_score: float | None = Field(default=None, description="out-of-distribution score of "
                                    "the frame (below the model's threshold, or it would have "
                                    "abstained); None when the model has no detector")
    maps_file: str | None = Field(default=None, description="npz with the class map, "
                                  "probabilities and saliency maps, relative to the study's "
                                  "results folder")


class AbstainedFrame(_Frozen):
    """A frame the model ran on but reports nothing for: it is unlike the training images."""

    frame: int = Field(ge=0)
    ood_score: float
    threshold: float

    @property
    def reason(self) -> str:
        return (f"unlike the model's training images (score {self.ood_score:.1f} > threshold "
                f"{self.threshold:.1f})")


class ModelRef(_Frozen):
    name: str
    version: str
    architecture: str
    training_data: str | None = Field(default=None, description="the card's one sentence on "
                                      "what the model was trained on")

    def training_statement(self) -> str:
        """The sentence every SR and PDF states about this model's training data."""
        said = (self.training_data or "").strip()
        return (f"Model {self.name} {self.version}: "
                + (said if said else "its card does not state what it was trained on."))


class TaskFinding(BaseModel):
    """One task's reading of one image, as ``findings.json`` keeps it under the image's
    ``analyses``. Each task declares its own subclass with typed fields; ``task`` names the
    task, so a reader (the writers, ``radlens status``, the cohort) hands each entry to the task
    that understands it, and an entry of a task not installed here is kept as it is."""

    model_config = ConfigDict(frozen=True, extra="allow")

    task: str = Field(min_length=1, max_length=64)
    model: ModelRef


class FrameReadings(TaskFinding):
    """A frame model's reading of one image: what it made of each frame it analysed (class
    probabilities, lesions and their measurements, saliency agreement). Frames it abstained on
    are the image's ``abstained``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: Literal["frames"] = "frames"
    frames: list[FramePrediction] = Field(min_length=1)


class TaskSummary(BaseModel):
    """One task's study-level result (a per-breast category, a volume): ``findings.json``'s
    ``summaries``, keyed by task name."""

    model_config = ConfigDict(frozen=True, extra="allow")

    task: str = Field(min_length=1, max_length=64)


class ImageInfo(_Frozen):
    """A decoded image as the later stages see it (no pixels: those travel in DecodedImage)."""

    ref: ImageRef
    modality: str | None
    photometric_interpretation: str = Field(description="as stored in the source object")
    transfer_syntax_uid: str
    rows: int = Field(ge=1)
    columns: int = Field(ge=1)
    frames: int = Field(ge=1)
    channels: Literal[1, 3] = Field(description="1 = greyscale, 3 = RGB after colour conversion")
    spacing: PixelSpacing | None = Field(description="None when unknown: never guessed")
    abstained: list[AbstainedFrame] = Field(
        default_factory=list, description="frames a model ran on but reports nothing for")
    analyses: list[SerializeAsAny[TaskFinding]] = Field(
        default_factory=list, description="what each task made of the image, each entry "
        "naming its task")
    route: str | None = Field(default=None, description="why the model did or did not see it")
    not_analysed: str | None = Field(default=None, description="why the model did not run, or "
                                     "why none of its frames has a finding")

    @model_validator(mode="before")
    @classmethod
    def _typed(cls, data: object) -> object:
        """Schema 1's readings filed under ``analyses`` as they are now, and frame readings
        typed as such (other tasks type their own entries: ``Task.readings``)."""
        if not isinstance(data, dict):
            return data
        data = dict(data)
        analyses = list(data.get("analyses", []) or [])
        model = data.pop("_study_model", None) or _UNKNOWN_MODEL
        frames = data.pop("predictions", None)
        if frames:
            analyses.insert(0, {"task": SCHEMA_1_TASK_FIELDS["predictions"], "model": model,
                                "kind": "frames", "frames": frames})
        for key, task in SCHEMA_1_TASK_FIELDS.items():
            reading = data.pop(key, None) if key != "predictions" else None
            if reading is not None:
                analyses.append({**reading, "task": task})
        data["analyses"] = [FrameReadings.model_validate(entry)
                            if isinstance(entry, dict) and entry.get("kind") == "frames"
                            else entry for entry in analyses]
        return data

    def analyses_of(self, task: str) -> list[TaskFinding]:
        return [analysis for analysis in self.analyses if analysis.task == task]

    @property
    def predictions(self) -> list[FramePrediction]:
        """The frames a frame model analysed (the lesion task's), in order."""
        return [frame for analysis in self.analyses if isinstance(analysis, FrameReadings)
                for frame in analysis.frames]


class SkippedObject(_Frozen):
    """An object of the study that no image came from, and why."""

    ref: ImageRef
    reason: str


class StudyFindings(_Frozen):
    """The result of one job over one study: written as ``results/<StudyUID>/findings.json``."""

    schema_version: int = FINDINGS_SCHEMA_VERSION
    study_instance_uid: str
    job_id: int
    revision: int = Field(ge=1, description="1 for a study's first job, then 2, 3, ...")
    radlens_version: str
    model: ModelRef | None = None
    created_at: datetime = Field(default_factory=lambda: datetime.now(UTC))
    images: list[ImageInfo] = Field(default_factory=list)
    skipped: list[SkippedObject] = Field(default_factory=list)
    summaries: dict[str, SerializeAsAny[TaskSummary]] = Field(
        default_factory=dict, description="each task's study-level result, by task name")
    timings: dict[str, float] = Field(default_factory=dict, description="wall-clock seconds "
                                      "per stage of the job (decode, inference, saliency, "
                                      "each writer...) and its total")
    failure: str | None = Field(default=None, description="why the job failed for good "
                                "(an error, a worker process past its memory or time limit, "
                                "or killed); what was found before it stays")

    @model_validator(mode="before")
    @classmethod
    def _schema_1(cls, data: object) -> object:
        """A schema 1 study's task summary, filed under ``summaries`` as it is now, and its
        images' readings with the model that made them."""
        if isinstance(data, dict) and data.get("schema_version", 1) == 1:
            data = dict(data)
            data["images"] = [{**image, "_study_model": data.get("model")}
                              if isinstance(image, dict) and image.get("predictions")
                              else image for image in data.get("images", []) or []]
        if isinstance(data, dict) and any(key in data for key in _SCHEMA_1_SUMMARY_FIELDS):
            data = dict(data)
            summaries = dict(data.get("summaries", {}))
            for key, task in _SCHEMA_1_SUMMARY_FIELDS.items():
                summary = data.pop(key, None)
                if summary is not None:
                    summaries[task] = {**summary, "task": task}
            data["summaries"] = summaries
        return data

    def models_used(self) -> list[ModelRef]:
        """Every model with a reading in this study, once each, in the order they appear."""
        models: list[ModelRef] = []
        for image in self.images:
            models += [a.model for a in image.analyses if a.model not in models]
        return models

    @property
    def tasks_run(self) -> list[str]:
        """The tasks with a reading in this study, in the order their first reading appears."""
        names: list[str] = []
        for image in self.images:
            names += [a.task for a in image.analyses if a.task not in names]
        return names


@dataclass(frozen=True)
class DecodedImage:
    """Pixels as float32, shaped (frames, rows, columns, channels), greyscale or RGB.

    Greyscale values are in modality units (rescale applied) with MONOCHROME1 already inverted
    so that larger is brighter; colour is RGB whatever the stored photometric interpretation.
    """

    info: ImageInfo
    pixels: np.ndarray

    def __post_init__(self) -> None:
        expected = (self.info.frames, self.info.rows, self.info.columns, self.info.channels)
        if tuple(self.pixels.shape) != expected:
            raise ValueError(f"pixels shaped {tuple(self.pixels.shape)}, info says {expected}")
        if str(self.pixels.dtype) != "float32":
            raise ValueError(f"pixels must be float32, not {self.pixels.dtype}")
