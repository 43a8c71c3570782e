"""The lesion model in a worker: every frame of a breast ultrasound image through segmentation
and classification (``infer``, here or on Ray actors: ``compute``), a per-frame
out-of-distribution score that makes the model abstain on frames unlike its training images,
lesion measurement (``analysis.lesions``) and saliency (``saliency``), the maps kept on disk for
the writers.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from radlens.agent.analyses import FrameRecord, LesionRecord
from radlens.agent.maps import MAPS_DIR, npz_bytes
from radlens.config import ModelSettings
from radlens.dicom_io.spool import write_durably
from radlens.findings import (
    AbstainedFrame,
    AnatomyOverlap,
    ClassProbabilities,
    DecodedImage,
    FramePrediction,
    FrameReadings,
    ImageInfo,
    LesionMeasurements,
    ModelRef,
    SaliencyAgreement,
)
from radlens.logs import kv
from radlens.memory import release_freed_memory
from radlens.tasks.base import ImageInput, LoadedTask, Task, TaskResult
from radlens.timing import StageTimes

if TYPE_CHECKING:  # torch stays out of the agent's import path until a model is loaded
    from radlens.analysis.nifti import LabelMap
    from radlens.tasks.breast_us.compute import LocalModelStage, RayModelStage
    from radlens.tasks.breast_us.infer import Prediction, Segmenter
    from radlens.tasks.breast_us.saliency import SaliencyExplainer, SaliencyMap

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Analyser(LoadedTask):
    """The lesion model in a worker: a loaded segmenter, the settings it runs under, where it
    runs (here or on Ray actors), its explainer and the optional anatomy label map."""

    segmenter: Segmenter
    settings: ModelSettings
    explainer: SaliencyExplainer | None = None
    anatomy: LabelMap | None = None
    # Where inference and saliency run (radlens.tasks.breast_us.compute); None: in this process.
    stage: LocalModelStage | RayModelStage | None = None

    def __post_init__(self) -> None:
        if self.stage is None:
            from radlens.tasks.breast_us.compute import LocalModelStage

            object.__setattr__(self, "stage", LocalModelStage(self.segmenter, self.explainer))

    @property
    def task(self) -> Task:  # type: ignore[override]
        from radlens.tasks.breast_us import TASK

        return TASK

    @property
    def card(self) -> dict[str, Any]:  # type: ignore[override]
        return self.segmenter.card

    @property
    def model_ref(self) -> ModelRef:
        return ModelRef(name=self.segmenter.name, version=self.segmenter.version,
                        architecture=str(self.segmenter.card["architecture"]),
                        training_data=self.segmenter.card.get("training_data"))

    @property
    def ood_threshold(self) -> float | None:
        return self.segmenter.ood.threshold if self.segmenter.ood is not None else None

    def analyse_image(self, image: ImageInput, maps_dir: Path | None,
                      times: StageTimes) -> TaskResult:
        info, records = analyse_image(image.decoded, self, maps_dir, times)
        return TaskResult([info], records)


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
    update: dict[str, object] = {"abstained": abstained}
    if predictions:
        update["analyses"] = [*info.analyses, FrameReadings(
            task=analyser.task.name, model=analyser.model_ref, frames=predictions)]
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
    from radlens.tasks.breast_us.saliency import agreement

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
