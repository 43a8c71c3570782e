"""The pipeline: typed stages from a study's files to its findings, one image at a time.

Each stage takes the previous stage's result and returns its own; nothing reaches back. Images
flow through the per-image stages one by one so a large study never sits in memory whole:
routing (``agent.routing``: is the image in the model's scope?), decoding
(``dicom_io.pixels``), segmentation and classification (``models.infer``) with a per-frame
out-of-distribution score that makes the model abstain on frames unlike its training images,
lesion measurement (``analysis.lesions``) and saliency (``models.saliency``), their maps kept
on disk. An image that cannot be used, or whose analysis fails, carries its reason; it never
costs the study. The narrative (``reporting``) and the DICOM writers (``dicom_io.writers``) run
after ``write_findings``, from the findings and those maps (``agent.worker``, ``agent.offline``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from radlens import __version__
from radlens.agent.analyses import FrameRecord, LesionRecord
from radlens.agent.maps import MAPS_DIR, npz_bytes
from radlens.agent.queue import JobInstance
from radlens.agent.routing import DENSITY_MODEL, ImageFacts, Router
from radlens.config import ModelSettings
from radlens.dicom_io import pixels
from radlens.dicom_io.spool import write_durably
from radlens.errors import ComputeUnavailableError, UnsupportedImageError
from radlens.findings import (
    AbstainedFrame,
    AnatomyOverlap,
    BreastDensity,
    ClassProbabilities,
    DecodedImage,
    FramePrediction,
    ImageInfo,
    ImageRef,
    LesionMeasurements,
    ModelRef,
    SaliencyAgreement,
    SkippedObject,
    StudyFindings,
)
from radlens.logs import kv
from radlens.memory import release_freed_memory
from radlens.timing import StageTimes

if TYPE_CHECKING:  # torch stays out of the agent's import path until a model is loaded
    from radlens.agent.compute import LocalModelStage, RayModelStage
    from radlens.agent.density import DensityAnalyser
    from radlens.analysis.nifti import LabelMap
    from radlens.models.infer import Prediction, Segmenter
    from radlens.models.saliency import SaliencyExplainer, SaliencyMap

log = logging.getLogger(__name__)

RESULTS_DIR = "results"
FINDINGS_FILE = "findings.json"


@dataclass(frozen=True)
class StudyInput:
    """What a job hands the pipeline: the study's instances as filed by the spool."""

    job_id: int
    revision: int
    study_instance_uid: str
    instances: list[JobInstance]


@dataclass
class StudyOutcome:
    """Per-image results gathered while images stream through the stages."""

    images: list[ImageInfo] = field(default_factory=list)
    skipped: list[SkippedObject] = field(default_factory=list)
    records: list[FrameRecord] = field(default_factory=list)  # analyses for the state database


@dataclass(frozen=True)
class StudyResult:
    findings: StudyFindings
    records: list[FrameRecord]
    times: StageTimes = field(default_factory=StageTimes)

    def finish(self, results_root: Path, *, fsync: bool = True) -> StudyFindings:
        """The findings again, with every stage's time (the writers' included)."""
        findings = self.findings.model_copy(update={"timings": self.times.rounded()})
        write_findings(findings, results_root, fsync=fsync)
        return findings


@dataclass(frozen=True)
class Analyser:
    """The model stage: a loaded segmenter and the settings saying which images it may see."""

    segmenter: Segmenter
    settings: ModelSettings
    router: Router
    explainer: SaliencyExplainer | None = None
    anatomy: LabelMap | None = None
    # Where inference and saliency run (radlens.agent.compute); None: in this process.
    stage: LocalModelStage | RayModelStage | None = None
    density: DensityAnalyser | None = None  # the breast density model, for mammograms

    def __post_init__(self) -> None:
        if self.stage is None:
            from radlens.agent.compute import LocalModelStage

            object.__setattr__(self, "stage", LocalModelStage(self.segmenter, self.explainer))

    @property
    def model_ref(self) -> ModelRef:
        return ModelRef(name=self.segmenter.name, version=self.segmenter.version,
                        architecture=str(self.segmenter.card["architecture"]))


def analyse_image(decoded: DecodedImage, analyser: Analyser, maps_dir: Path | None = None,
                  times: StageTimes | None = None) -> tuple[ImageInfo, list[FrameRecord]]:
    """Stages 2-4 for every frame: segmentation and image-level class probabilities, then each
    lesion's measurements and, on the frames to explain, the configured saliency maps and their
    agreement with the mask. The maps are kept in ``maps_dir`` for the DICOM writers.

    Frames go through in batches of the model's batch size, and a batch's full-size maps are
    written and dropped before the next: a long clip never holds every frame's probabilities.
    Saliency of the frames a batch settles (``explain_frames`` lesions or all) reuses that
    batch's forward pass, Grad-CAM included; frames chosen only once the whole clip is seen (a
    number N, or a clip without lesions) get a pass of their own at the end."""
    info = decoded.info
    frames = decoded.pixels
    if analyser.settings.max_frames:
        frames = frames[:analyser.settings.max_frames]
    detector = analyser.segmenter.ood if analyser.settings.abstain else None
    times = times or StageTimes()
    setting = analyser.settings.explain_frames
    explain_now = setting in ("lesions", "all")
    spacing = (info.spacing.row_mm, info.spacing.column_mm) if info.spacing else None
    measured: list[_MeasuredFrame] = []
    abstained: list[AbstainedFrame] = []
    records: list[FrameRecord] = []
    explained: dict[int, tuple[dict[str, SaliencyAgreement], dict[str, np.ndarray]]] = {}
    # The model stage (here, or in a Ray actor) explains the frames a batch settles from the
    # batch's own forward pass, Grad-CAM included.
    stage = analyser.stage
    assert stage is not None
    methods = list(analyser.settings.saliency) if analyser.explainer is not None else []
    explain = setting if explain_now and methods else None
    step = stage.step(methods, explain)
    for start in range(0, len(frames), step):
        chunk = [frames[i][..., 0] if frames.shape[-1] == 1 else frames[i]
                 for i in range(start, min(start + step, len(frames)))]
        batch = stage.analyse(chunk, explain=explain, methods=methods,
                              min_lesion_pixels=analyser.settings.min_lesion_pixels,
                              abstain=detector is not None)
        for name, seconds in batch.seconds.items():
            times.add(name, seconds)
        settled: list[tuple[_MeasuredFrame, Prediction]] = []
        for offset, result in enumerate(batch.predictions):
            index = start + offset
            ood_score = float(detector.score(result.latent)[0]) if detector is not None else None
            if detector is not None and ood_score > detector.threshold:
                abstained.append(AbstainedFrame(frame=index, ood_score=round(ood_score, 3),
                                                threshold=round(detector.threshold, 3)))
                continue
            item = _measure(analyser, index, result, chunk[offset], spacing, ood_score, times)
            with times.stage("measurement"):
                records.append(_record(item, result, info.ref.sop_instance_uid))
            settled.append((item, result))
        explained.update(_agreements(
            [(item, batch.maps[item.index - start]) for item, _ in settled
             if item.index - start in batch.maps]))
        for item, result in settled:
            agreements, maps = explained.get(item.index, ({}, {}))
            if maps_dir is not None:
                with times.stage("maps"):
                    item.maps_file = _write_maps(maps_dir, info.ref.sop_instance_uid, item,
                                                 result.probabilities, maps)
            if maps:
                explained[item.index] = (agreements, {})  # on disk now: the agreements stay
        measured.extend(item for item, _ in settled)
        del batch, settled
    later = frames_to_explain(measured, setting, multiframe=info.frames > 1) - explained.keys()
    if later:
        late = _explain(analyser, [item for item in measured if item.index in later], times)
        explained.update(late)
        if maps_dir is not None:
            for item in measured:
                if item.index in late and item.maps_file is not None:
                    with times.stage("maps"):
                        _add_maps(maps_dir.parent / item.maps_file, late[item.index][1])
    predictions = [_prediction(item, explained.get(item.index, ({}, {}))[0])
                   for item in measured]
    update: dict[str, object] = {"predictions": predictions, "abstained": abstained}
    if abstained and not predictions:
        scores = [a.ood_score for a in abstained]
        update["not_analysed"] = (
            f"unlike the model's training images: all {len(abstained)} frame(s) abstained "
            f"(scores {min(scores):.1f} to {max(scores):.1f} > threshold "
            f"{abstained[0].threshold:.1f})")
    if abstained:
        log.info("frames unlike the training images: no finding reported", extra=kv(
            sop=info.ref.sop_instance_uid, abstained=len(abstained), analysed=len(predictions)))
    return info.model_copy(update=update), records


def _measure(analyser: Analyser, index: int, result: Prediction, frame: np.ndarray,
             spacing: tuple[float, float] | None, ood_score: float | None,
             times: StageTimes) -> _MeasuredFrame:
    """One frame's lesions, measured (and placed in the anatomy when a label map is set)."""
    classes = result.classes  # an argmax over the maps: computed once per frame
    with times.stage("measurement"):
        # Imported here: SimpleITK, SciPy and scikit-image cost 135 MB of resident memory,
        # which the supervisor and listener processes (that import this module's types) need not.
        from radlens.analysis.lesions import find_lesions, measure_regions

        regions = find_lesions(classes, min_pixels=analyser.settings.min_lesion_pixels)
        lesions = measure_regions(frame, regions, result.probabilities, spacing_mm=spacing,
                                  frame=index)
    atlas, anatomy_note = _atlas_for(analyser, classes.shape)
    if atlas is not None:
        lesions = [lesion.model_copy(update={"anatomy": _overlaps(atlas, region)})
                   for lesion, (region, _) in zip(lesions, regions, strict=True)]
    return _MeasuredFrame(index, result.image_probabilities, frame, classes, regions, lesions,
                          atlas, anatomy_note, ood_score)


@dataclass
class _MeasuredFrame:
    """One frame the model passed (not abstained), measured. Its full-size probabilities live
    only as long as its batch; what the later stages need is here."""

    index: int
    image_probabilities: np.ndarray  # (3,) normal, benign, malignant
    pixels: np.ndarray
    classes: np.ndarray  # (H, W) uint8: 0 background, 1 benign, 2 malignant
    regions: list[tuple[np.ndarray, int]]
    lesions: list[LesionMeasurements]
    atlas: LabelMap | None
    anatomy_note: str | None
    ood_score: float | None
    maps_file: str | None = None

    @property
    def suspicion(self) -> float:
        """The stronger lesion class's image-level probability."""
        return float(max(self.image_probabilities[1:]))


def frames_to_explain(frames: list[_MeasuredFrame], setting: str | int, *,
                      multiframe: bool) -> set[int]:
    """Which frames get saliency (``model.explain_frames``): ``lesions``, the frames with a
    lesion (or, on a clip with none, its most suspicious frame, so every clip shows where the
    model looked); ``all``; or a number N, the N most suspicious frames, lesions first."""
    if setting == "all":
        return {f.index for f in frames}
    ranked = sorted(frames, key=lambda f: (not f.lesions, -f.suspicion, f.index))
    if isinstance(setting, int):
        return {f.index for f in ranked[:setting]}
    chosen = {f.index for f in frames if f.lesions}
    if not chosen and multiframe and ranked:
        chosen.add(ranked[0].index)
    return chosen


def _explain(analyser: Analyser, items: list[_MeasuredFrame], times: StageTimes
             ) -> dict[int, tuple[dict[str, SaliencyAgreement], dict[str, np.ndarray]]]:
    """The configured saliency of frames chosen once the whole clip was seen, from passes of
    their own (a batch at a time), with each map's agreement with its frame's mask."""
    if not items or analyser.explainer is None or not analyser.settings.saliency:
        return {}
    assert analyser.stage is not None
    out = {}
    step = analyser.segmenter.batch_size  # one batch of maps in memory at a time
    for start in range(0, len(items), step):
        chunk = items[start:start + step]
        with times.stage("saliency"):
            maps = analyser.stage.explain([item.pixels for item in chunk],
                                          list(analyser.settings.saliency))
        out.update(_agreements(list(zip(chunk, maps, strict=True))))
        release_freed_memory()  # a backward pass's activations, before the next batch
    return out


def _agreements(explained: list[tuple[_MeasuredFrame, list[SaliencyMap]]]
                ) -> dict[int, tuple[dict[str, SaliencyAgreement], dict[str, np.ndarray]]]:
    """Each frame's maps (float16, for the maps file) and their agreement with its mask."""
    from radlens.models.saliency import agreement

    out = {}
    for item, maps_of_frame in explained:
        agreements, maps = {}, {}
        mask = item.classes > 0
        for saliency in maps_of_frame:
            measured = agreement(saliency.map, mask)
            hot = saliency.map >= measured.threshold
            agreements[saliency.method] = SaliencyAgreement(
                dice=measured.dice, mass_inside=min(measured.mass_inside, 1.0),
                anatomy=_overlaps(item.atlas, hot) if item.atlas is not None else [])
            maps[f"saliency_{saliency.method}"] = saliency.map.astype(np.float16)
        out[item.index] = (agreements, maps)
    return out


def _prediction(item: _MeasuredFrame, agreements: dict[str, SaliencyAgreement]
                ) -> FramePrediction:
    classes = item.classes
    normal, benign, malignant = (float(p) for p in item.image_probabilities)
    return FramePrediction(
        frame=item.index,
        class_probabilities=ClassProbabilities(normal=normal, benign=benign,
                                               malignant=malignant),
        predicted_class=_predicted_class(item.image_probabilities),
        lesion_pixels={"benign": int((classes == 1).sum()),
                       "malignant": int((classes == 2).sum())},
        lesions=item.lesions,
        saliency=agreements,
        anatomy_note=item.anatomy_note,
        maps_file=item.maps_file,
        ood_score=round(item.ood_score, 3) if item.ood_score is not None else None,
    )


def _predicted_class(image_probabilities: np.ndarray) -> str:
    return ("normal", "benign", "malignant")[int(np.argmax(image_probabilities))]


def _record(item: _MeasuredFrame, result: Prediction, sop_uid: str) -> FrameRecord:
    """The frame's row for the analyses in the state database (cohort over the agent's data)."""
    normal, benign, malignant = (float(p) for p in result.image_probabilities)
    return FrameRecord(
        sop_uid, item.index, _predicted_class(result.image_probabilities),
        (normal, benign, malignant), result.latent,
        [LesionRecord(lesion.index, lesion.lesion_class, lesion.probability,
                      result.region_latent(region), lesion.model_dump(mode="json"))
         for lesion, (region, _) in zip(item.lesions, item.regions, strict=True)])


def _atlas_for(analyser: Analyser, shape: tuple[int, ...]) -> tuple[LabelMap | None,
                                                                      str | None]:
    """The label map when one is configured and lies on this frame's grid."""
    atlas = analyser.anatomy
    if atlas is None:
        return None, None
    if atlas.labels.shape != tuple(shape):
        return None, (f"label map grid {atlas.labels.shape} differs from the image's "
                      f"{tuple(shape)}: anatomy not mapped")
    return atlas, None


def _overlaps(atlas: LabelMap, mask: np.ndarray) -> list[AnatomyOverlap]:
    return [AnatomyOverlap(label=o.label, name=o.name, pixels=o.pixels,
                           fraction_of_mask=min(o.fraction_of_mask, 1.0))
            for o in atlas.overlaps(mask)]


def lesion_labels(shape: tuple[int, ...], regions: list[tuple[np.ndarray, int]]) -> np.ndarray:
    """The measured lesions as one label image: 0 background, k the lesion of index k (largest
    first, as in the findings). This is the mask the SEG and the SR contours carry; components
    under the minimum size are not lesions and are left out."""
    labels = np.zeros(shape, dtype=np.uint16)
    for index, (region, _) in enumerate(regions, start=1):
        labels[region] = index
    return labels


def _write_maps(maps_dir: Path, sop_uid: str, item: _MeasuredFrame,
                probabilities: np.ndarray, saliency: dict[str, np.ndarray]) -> str:
    """Class map, lesion labels, probabilities and saliency maps of one frame, as an npz.

    Whole or absent after a crash (temp file and rename), but not fsync'ed: the maps are the
    job's working set, derived from the spooled images, and a job is done only after the
    writers that read them; 240 fsyncs would cost a 120-frame clip seconds."""
    maps_dir.mkdir(parents=True, exist_ok=True)
    arrays = {"classes": item.classes.astype(np.uint8),
              "lesions": lesion_labels(item.classes.shape, item.regions),
              "probabilities": probabilities.astype(np.float16), **saliency}
    name = f"{sop_uid}_f{item.index:04d}.npz"
    write_durably(maps_dir / name, npz_bytes(arrays), fsync=False)
    return f"{MAPS_DIR}/{name}"


def _add_maps(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Add arrays to a frame's npz (saliency computed after its batch was written), without
    recompressing what it holds."""
    write_durably(path, npz_bytes(arrays, path.read_bytes()), fsync=False)


def findings_for(study: StudyInput, outcome: StudyOutcome,
                 model: ModelRef | None = None) -> StudyFindings:
    """Last stage before the writers: the study's findings as one validated object."""
    return StudyFindings(
        study_instance_uid=study.study_instance_uid,
        job_id=study.job_id,
        revision=study.revision,
        radlens_version=__version__,
        model=model,
        images=outcome.images,
        skipped=outcome.skipped,
        breast_density=BreastDensity.of([image.density for image in outcome.images
                                         if image.density is not None]),
    )


def write_findings(findings: StudyFindings, results_root: Path, *, fsync: bool = True) -> Path:
    folder = results_root / findings.study_instance_uid
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / FINDINGS_FILE
    write_durably(path, findings.model_dump_json(indent=2).encode(), fsync=fsync)
    return path


def _image(instance: JobInstance, analyser: Analyser | None, maps_dir: Path,
           job_id: int, times: StageTimes) -> tuple[ImageInfo, list[FrameRecord]]:
    """One object through routing, decoding and the model. Raises UnsupportedImageError for an
    object without usable pixels; an image the router keeps from the model is described from
    its header alone, and one whose analysis fails says why instead of costing the study."""
    with times.stage("decode"):
        ds = pixels.read_dataset(instance.path)
    if analyser is None:
        with times.stage("decode"):
            return pixels.decode_dataset(ds).info, []
    described = pixels.describe(ds)
    decision = analyser.router.route(ImageFacts.from_dataset(ds), instance.calling_aet)
    if not decision.analyse:
        log.info("image not analysed", extra=kv(job=job_id, sop=instance.sop_instance_uid,
                                                reason=decision.reason))
        return described.model_copy(update={"not_analysed": decision.reason,
                                            "route": decision.reason}), []
    with times.stage("decode"):
        decoded = pixels.decode_dataset(ds, info=described)
    try:
        if decision.model == DENSITY_MODEL:
            assert analyser.density is not None  # the router knows only the loaded models
            with times.stage("density"):
                info = analyser.density.analyse(decoded, ds, maps_dir)
            return info.model_copy(update={"route": decision.reason}), []
        info, records = analyse_image(decoded, analyser, maps_dir, times)
    except ComputeUnavailableError:
        raise  # nothing wrong with the image: the job runs again
    except Exception as exc:
        log.exception("analysis failed", extra=kv(job=job_id, sop=instance.sop_instance_uid))
        reason = f"the analysis failed (logged): {type(exc).__name__}: {exc}"[:500]
        return decoded.info.model_copy(update={"not_analysed": reason,
                                               "route": decision.reason}), []
    return info.model_copy(update={"route": decision.reason}), records


def run_study(study: StudyInput, results_root: Path, *, analyser: Analyser | None = None,
              fsync: bool = True) -> StudyResult:
    """Run every stage over one study and write its findings; an image that cannot be used is
    skipped with its reason, never a failure of the study."""
    outcome = StudyOutcome()
    times = StageTimes()
    maps_dir = results_root / study.study_instance_uid / MAPS_DIR
    for instance in study.instances:
        ref = ImageRef(study_instance_uid=study.study_instance_uid,
                       series_instance_uid=instance.series_instance_uid,
                       sop_instance_uid=instance.sop_instance_uid,
                       sop_class_uid=instance.sop_class_uid)
        try:
            info, records = _image(instance, analyser, maps_dir, study.job_id, times)
        except ComputeUnavailableError:
            raise
        except UnsupportedImageError as exc:
            outcome.skipped.append(SkippedObject(ref=ref, reason=str(exc)))
            log.info("object skipped", extra=kv(job=study.job_id, sop=ref.sop_instance_uid,
                                                reason=str(exc)))
            continue
        except Exception as exc:  # a bug must cost this object, never the study
            log.exception("object failed", extra=kv(job=study.job_id, sop=ref.sop_instance_uid))
            outcome.skipped.append(SkippedObject(ref=ref, reason=(
                f"unexpected error (logged): {type(exc).__name__}: {exc}")[:500]))
            continue
        outcome.records.extend(records)
        outcome.images.append(info)
    with times.stage("findings"):
        findings = findings_for(study, outcome, analyser.model_ref if analyser else None)
        path = write_findings(findings, results_root, fsync=fsync)
    log.info("findings written", extra=kv(job=study.job_id, study=study.study_instance_uid,
                                          images=len(outcome.images),
                                          skipped=len(outcome.skipped), path=str(path)))
    return StudyResult(findings, outcome.records, times)
