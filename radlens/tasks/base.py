"""What an analysis task is, for the agent and for whoever writes one.

A task is one model with everything around it: its card and scope, what it reads (its unit of
analysis), how it is loaded, what it finds (a pydantic model of its own, filed in
``findings.json`` under the image's ``analyses`` with the task's name), and what it adds to the
study's answer: SR measurement groups and qualitative evaluations, SEG segments, overlays, a
PDF table, narrative lines with the facts an LLM may use and the rules that check its text.
The pipeline, the writers and the reporting modules only assemble these contributions; none of
them knows a task by name.

Two halves, because they live in different processes: ``Task`` is light (it imports no torch
and reads only findings, so the writers and ``radlens status`` use it anywhere), and
``LoadedTask`` is the model in memory that a worker runs. ``radlens.tasks.registry`` finds the
built-in tasks and those installed packages declare under the ``radlens.tasks`` entry-point
group. The style follows highdicom's and pynetdicom's public classes: explicit types, explicit
errors, defaults that contribute nothing.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, ClassVar, Literal, Protocol

from pydantic import BaseModel

from radlens.findings import (
    DecodedImage,
    ImageInfo,
    ModelRef,
    StudyFindings,
    TaskFinding,
    TaskSummary,
)
from radlens.models.scope import ModelScope
from radlens.timing import StageTimes

if TYPE_CHECKING:
    from pydicom.dataset import Dataset
    from pydicom.sr.coding import Code

    from radlens.config import OutputSettings, Settings
    from radlens.datasets.summary import DatasetSummary
    from radlens.dicom_io.writers.common import Equipment, SeriesPlan
    from radlens.history import ObservedItem, PatientHistory

log = logging.getLogger(__name__)

# What one call of ``LoadedTask.analyse`` reads:
# - "image": one image (all its frames), as soon as it is decoded;
# - "study": every image of the study in its scope, at once (four mammography views);
# - "series": one series read as a volume (``SeriesVolume``: its voxels with their spacing,
#   orientation and origin).
AnalysisUnit = Literal["image", "study", "series"]


class TaskError(Exception):
    """A task that cannot be found, loaded or run as configured: the agent refuses to start."""


class TaskUsageError(TaskError):
    """A request a task cannot take as asked (an unknown architecture, an option it lacks):
    the command's usage, not the data, is wrong."""


@dataclass(frozen=True)
class ImageInput:
    """One decoded image and its header: what an ``image`` task reads."""

    decoded: DecodedImage
    header: Dataset

    @property
    def info(self) -> ImageInfo:
        return self.decoded.info


@dataclass(frozen=True)
class SeriesVolume:
    """One series read as a volume: what a ``series`` task reads.

    ``volume`` is a ``highdicom.Volume``: the voxels (slices, rows, columns) with the affine
    that highdicom derives from the headers' Image Position and Orientation (Patient) and Pixel
    Spacing, never computed here by hand; ``sources`` are the SOP Instance UIDs of its slices in
    the volume's order (``highdicom.spatial.sort_datasets``), so a task's label map goes back to
    the slices as SEG frames, and ``infos`` their descriptions in the same order."""

    volume: Any  # highdicom.Volume
    sources: tuple[str, ...]
    infos: tuple[ImageInfo, ...]

    @property
    def spacing_mm(self) -> tuple[float, float, float]:
        return tuple(float(v) for v in self.volume.spacing)  # type: ignore[return-value]

    @property
    def position_mm(self) -> tuple[float, float, float]:
        return tuple(float(v) for v in self.volume.position)  # type: ignore[return-value]

    @property
    def direction(self) -> Any:
        """The 3 x 3 direction cosines of the volume's axes."""
        return self.volume.direction


def abstained_image(info: ImageInfo, score: float, threshold: float, model: str,
                    what: str) -> ImageInfo | None:
    """The image as abstained on when ``score`` is above ``threshold`` (a single-image task's
    OOD decision, ``what`` the kind of image in the log), None when it is not: the log line,
    the abstained frame and the reason every single-image task states alike."""
    from radlens.findings import AbstainedFrame
    from radlens.logs import kv

    if score <= threshold:
        return None
    abstained = AbstainedFrame(frame=0, ood_score=round(score, 3), threshold=round(threshold, 3))
    log.info(f"{what} unlike the {model} model's training images: no reading",
             extra=kv(sop=info.ref.sop_instance_uid, score=round(score, 2)))
    return info.model_copy(update={"abstained": [abstained],
                                   "not_analysed": f"the {model} model abstains: "
                                                   f"{abstained.reason}"})


@dataclass
class TaskResult:
    """What a task made of its unit: each image's description with the task's reading added
    (``ImageInfo.analyses``, or the frame model's own fields), and anything the state database
    keeps for the cohort analysis."""

    images: list[ImageInfo]
    records: list[Any] = field(default_factory=list)


@dataclass(frozen=True)
class AnalysedSource:
    """An image a task read, with its header and file, for the task's output contributions."""

    info: ImageInfo
    header: Dataset
    path: Path


@dataclass(frozen=True)
class OutputContext:
    """What the writers hand each task: the study's findings, its sources and where its maps
    are, and which outputs the site asked for."""

    findings: StudyFindings
    sources: Mapping[str, Path]
    headers: Mapping[str, Dataset]
    study_results: Path
    settings: OutputSettings
    revision: int
    saliency_methods: tuple[str, ...] = ()  # configured, the first preferred
    times: StageTimes = field(default_factory=StageTimes)  # each output kind's seconds
    memo: dict[str, Any] = field(default_factory=dict)  # what a task loads once per study

    def analysed_by(self, task: str) -> list[AnalysedSource]:
        """The images with a reading of ``task`` whose header could be read."""
        return [AnalysedSource(info, self.headers[info.ref.sop_instance_uid],
                               self.sources[info.ref.sop_instance_uid])
                for info in self.findings.images
                if info.analyses_of(task) and info.ref.sop_instance_uid in self.headers]


@dataclass
class SrContent:
    """A task's part of the TID 1500 report: measurement groups (TID 1501 ``Dataset``s built
    with highdicom), study-level qualitative evaluations (content items), the procedures it
    reports (codes) and the headers of the images its groups reference."""

    groups: list[Dataset] = field(default_factory=list)
    evaluations: list[Dataset] = field(default_factory=list)
    procedures: list[Code] = field(default_factory=list)
    referenced: list[Dataset] = field(default_factory=list)


@dataclass(frozen=True)
class ImagePlans:
    """The series a task's maps and overlays go in, and the next free instance number in each
    (several tasks may fill one kind of series)."""

    parametric_map: SeriesPlan
    overlay: SeriesPlan
    first_parametric_map: int = 1
    first_overlay: int = 1


@dataclass
class ImageOutputs:
    """A task's saliency Parametric Maps, overlays (Secondary Capture ``Dataset``s) and PDF
    figures, and why any of them could not be made."""

    parametric_maps: list[Dataset] = field(default_factory=list)
    overlays: list[Dataset] = field(default_factory=list)
    figures: list[Any] = field(default_factory=list)  # radlens.reporting.pdf.Figure
    failures: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class PdfTable:
    """A task's table in the PDF report: a title, column labels, rows (those shown), a note
    beside the title (what was left out), a footnote, and what to say when there is no row."""

    title: str
    columns: tuple[str, ...]
    rows: list[list[str]]
    footnote: str = ""
    note: str = ""
    empty: str = ""


@dataclass(frozen=True)
class NarrativePart:
    """A task's lines in the template narrative, and the limitations that close it."""

    lines: list[str]
    limitations: str


class ResearchProgress(Protocol):
    """Where a task's phantoms, training and evaluation report how far they are (the CLI
    draws progress bars from it)."""

    def start(self, key: str, label: str, total: int) -> None: ...

    def update(self, key: str, completed: int, info: str = "") -> None: ...


class _Silent:
    def start(self, key: str, label: str, total: int) -> None:
        pass

    def update(self, key: str, completed: int, info: str = "") -> None:
        pass


SILENT: ResearchProgress = _Silent()


@dataclass(frozen=True)
class TrainRequest:
    """What ``radlens train`` asks of any task; ``options`` holds the task's own settings
    (an architecture, class weights...), by the names its docs give."""

    data: Path
    out: Path
    folds: int = 0
    epochs: int = 100
    batch_size: int = 8
    learning_rate: float = 1e-4
    patience: int = 4
    seed: int = 0
    size: int | None = None
    device: str = "auto"
    command: str = ""
    options: Mapping[str, Any] = field(default_factory=dict)


class Task(ABC):
    """One analysis task: the light half, which every process may hold.

    Subclasses set the class attributes and implement ``load``; every output contribution has
    a default that contributes nothing, so a minimal task writes only what it finds."""

    name: ClassVar[str]  # the name routing rules, --task and findings.json use
    title: ClassVar[str]  # a few words for people: "breast density on mammograms"
    unit: ClassVar[AnalysisUnit] = "image"
    segments: ClassVar[bool] = False  # whether it writes SEGs (label maps of what it found)
    finding_type: ClassVar[type[TaskFinding]] = TaskFinding
    summary_type: ClassVar[type[TaskSummary]] = TaskSummary
    # Where it came from: "built-in", or the distribution that declared its entry point.
    origin: str = "built-in"
    # What the LLM is asked to add when the study holds this task's findings (one sentence).
    prompt_guidance: ClassVar[str] = ""

    # ---- loading -------------------------------------------------------------------------
    def enabled(self, settings: Settings) -> bool:
        """Whether the configuration asks for this task."""
        return True

    def weights(self, settings: Settings) -> str:
        """The configured weights: a shipped model's name or a folder."""
        raise NotImplementedError

    def card(self, settings: Settings) -> dict[str, Any]:
        """The model card (``card.json`` of the configured weights), read without loading the
        model: ``radlens models`` and ``radlens route`` need only this."""
        from radlens.models.cards import model_folder, read_card

        return read_card(model_folder(self.weights(settings)))

    def scope(self, settings: Settings) -> ModelScope | None:
        return ModelScope.from_card(self.card(settings))

    @abstractmethod
    def load(self, settings: Settings, *, device: str) -> LoadedTask:
        """The model in memory. Raises TaskError when it cannot be loaded as configured."""

    # ---- research: phantoms, training, evaluation (radlens phantoms|train|evaluate) ---------
    def write_phantoms(self, out: Path, *, n: int, seed: int, size: int | None, dicom: bool,
                       options: Mapping[str, Any], progress: ResearchProgress = SILENT) -> str:
        """Write ``n`` seeded phantom cases (and DICOM studies with ``dicom``) to ``out``;
        returns a line saying what was written."""
        raise TaskError(f"task {self.name} ({self.origin}) has no phantoms in radlens")

    def train(self, request: TrainRequest, progress: ResearchProgress = SILENT) -> str:
        """Train the task's model on ``request.data`` into a weights folder at
        ``request.out`` (model, card, metrics, curves); returns the summary line."""
        raise TaskError(f"task {self.name} ({self.origin}) has no training in radlens")

    def check_dataset(self, data: Path, *, layout: str | None = None) -> DatasetSummary:
        """Read a labelled folder the way training and evaluation will (in ``layout``, or the
        one the folder shows) and say what is in it; raises TaskError when the folder cannot
        be read without guessing."""
        raise TaskError(f"task {self.name} ({self.origin}) has no dataset reader in radlens")

    def export(self, model: str, out: Path) -> str:
        """Write the task's network (``model``: a weights folder or shipped name) as a
        TorchScript file at ``out``; returns a line saying what was written."""
        raise TaskError(f"task {self.name} ({self.origin}) has no export in radlens")

    def evaluate(self, data: Path, model: str, out: Path, *, device: str, seed: int,
                 options: Mapping[str, Any]) -> Path:
        """Evaluate a weights folder (or the shipped model: ``model`` "default") on a labelled
        folder, writing ``report.json`` and ``report.md`` in ``out``; returns the Markdown's
        path."""
        raise TaskError(f"task {self.name} ({self.origin}) has no evaluation in radlens")

    # ---- findings ------------------------------------------------------------------------
    def code_modules(self) -> tuple[ModuleType, ...]:
        """Modules of the coded concepts only this task writes (the Conformance Statement
        lists them, each private one with its ``PRIVATE_REASONS`` entry)."""
        return ()

    def readings(self, info: ImageInfo) -> list[Any]:
        """This task's readings of an image, as its own typed findings."""
        return [analysis if isinstance(analysis, self.finding_type)
                else self.finding_type.model_validate(analysis.model_dump())
                for analysis in info.analyses_of(self.name)]

    def summarise(self, readings: list[Any]) -> TaskSummary | None:
        """The study-level result of its readings (None: it has none)."""
        return None

    def summary(self, findings: StudyFindings) -> Any:
        """Its study-level result as stored, typed again (None when it has none)."""
        stored = findings.summaries.get(self.name)
        if stored is None or isinstance(stored, self.summary_type):
            return stored
        return self.summary_type.model_validate(stored.model_dump())

    def analysed(self, findings: StudyFindings) -> bool:
        return any(info.analyses_of(self.name) for info in findings.images)

    def status_counts(self, findings: StudyFindings) -> dict[str, int]:
        """Counts ``radlens status`` and batch runs print for a study."""
        return {}

    # ---- outputs -------------------------------------------------------------------------
    def notes(self, findings: StudyFindings) -> list[str]:
        """Plain statements for the SR's notes (warnings on particular images)."""
        return []

    def segmentations(self, context: OutputContext, equipment: Equipment,
                      plan: SeriesPlan) -> list[Any]:
        """The task's SEGs (``dicom_io.writers.seg.WrittenSegmentation``), built before the SR
        that references their segments."""
        return []

    def segmentation_note(self, findings: StudyFindings) -> str | None:
        """Why it wrote no SEG for this study although it segments (nothing found)."""
        return None

    def pdf_sources(self, context: OutputContext) -> list[Dataset]:
        """Headers of the images the PDF report is filed with, when this task is the first
        that read the study (none: the study's first image)."""
        return []

    def sr_content(self, context: OutputContext, segmentations: Sequence[Any] = ()
                   ) -> SrContent:
        """Its part of the TID 1500 report; ``segmentations`` are its own SEGs."""
        return SrContent()

    def image_outputs(self, context: OutputContext, equipment: Equipment,
                      plans: ImagePlans) -> ImageOutputs:
        """Its saliency maps, overlays and PDF figures."""
        return ImageOutputs()

    def overlay_pngs(self, context: OutputContext, limit: int) -> list[bytes]:
        """Its overlays as PNG, for a vision-capable LLM (at most ``limit``)."""
        return []

    def pdf_table(self, findings: StudyFindings) -> PdfTable | None:
        return None

    def model_line(self, findings: StudyFindings) -> str | None:
        """The model this task ran, for the PDF's and narrative's "Model:" line."""
        for info in findings.images:
            for analysis in info.analyses_of(self.name):
                return f"{analysis.model.name} {analysis.model.version}"
        return None

    # ---- narrative -----------------------------------------------------------------------
    def narrative(self, findings: StudyFindings) -> NarrativePart | None:
        """Lines of the template narrative (None: it found nothing to say)."""
        return None

    def facts(self, findings: StudyFindings) -> BaseModel | None:
        """What an LLM may know of this task's findings: no identifiers, images numbered as in
        the study's findings. Filed in the prompt's facts under the task's name."""
        return None

    def grounding_numbers(self, facts: Mapping[str, Any]) -> set[float]:
        """Numbers a narrative may write because of this task's facts (``facts`` is the
        task's facts as JSON)."""
        return set()

    def grounding_violations(self, text: str, facts: Mapping[str, Any] | None) -> list[str]:
        """What in ``text`` this task's facts do not support (``facts`` None: the study holds
        none of its findings, so claiming one is a violation)."""
        return []

    def named_sides(self, facts: Mapping[str, Any]) -> frozenset[str]:
        """Sides ("left", "right") the facts state, which a narrative may therefore name."""
        return frozenset()

    def stated_dates(self, facts: Mapping[str, Any]) -> frozenset[str]:
        """Dates (YYYY-MM-DD) the facts state, which a narrative may therefore write: a study's
        and its prior visit's, when the task compares them. Any other date is refused."""
        return frozenset()

    # ---- a patient's earlier studies (radlens.history) -----------------------------------
    def compare_with_prior(self, findings: StudyFindings, history: PatientHistory
                           ) -> StudyFindings:
        """The findings with the change since the patient's prior study of what this task
        observed, where ``history`` holds one (called before the findings are written)."""
        return findings

    def observations(self, findings: StudyFindings) -> list[ObservedItem]:
        """What to remember of this study for the patient's later studies (recorded once the
        findings are written; none by default)."""
        return []


class LoadedTask(ABC):
    """A task's model in memory, in the worker that runs it."""

    task: Task
    card: dict[str, Any]

    @property
    @abstractmethod
    def model_ref(self) -> ModelRef: ...

    @property
    def scope(self) -> ModelScope | None:
        return ModelScope.from_card(self.card)

    @property
    def ood_threshold(self) -> float | None:
        """The out-of-distribution threshold it abstains above (None: it has no detector)."""
        return None

    def analyse_image(self, image: ImageInput, maps_dir: Path | None,
                      times: StageTimes) -> TaskResult:
        """An ``image`` task's reading of one image."""
        raise TaskError(f"task {self.task.name} does not read single images")

    def analyse_series(self, volume: SeriesVolume, maps_dir: Path | None,
                       times: StageTimes) -> TaskResult:
        """A ``series`` task's reading of one series as a volume."""
        raise TaskError(f"task {self.task.name} does not read volumes")

    def analyse_study(self, images: Sequence[ImageInput], maps_dir: Path | None,
                      times: StageTimes) -> TaskResult:
        """A ``study`` task's reading of every image of the study in its scope."""
        raise TaskError(f"task {self.task.name} does not read whole studies")
