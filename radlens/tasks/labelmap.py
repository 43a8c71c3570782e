"""Shared machinery for tasks whose model answers with a label map: a site's own segmentation
model, a MONAI bundle.

Such a task's reading of an image (or of a series read as a volume) is the label map itself,
kept in the study's maps folder, and per label its name, its pixel count and its area (2-D) or
volume (a series), in physical units when the spacing is known. From it the writers get a SEG
with a segment per label found (highdicom), an SR measurement group per label with its area or
volume and a reference to its segment, a PDF table, narrative lines with the facts an LLM may
use, and a note saying whether the model has an out-of-distribution check. A subclass states
its labels and loads its model (``load``); its ``LoadedTask`` calls ``label_map_reading`` with
the label map it made.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from radlens.findings import ImageInfo, ModelRef, StudyFindings, TaskFinding
from radlens.logs import kv
from radlens.tasks.base import (
    AnalysedSource,
    NarrativePart,
    OutputContext,
    PdfTable,
    SrContent,
    Task,
)
from radlens.tasks.labels import LabelDefinition

log = logging.getLogger(__name__)

LABELS_ARRAY = "labels"  # the label map's name in its npz


class LabelStat(BaseModel):
    """What one label covers in one image (all its frames) or one volume."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    label: int = Field(ge=1)
    name: str
    pixels: int = Field(ge=0, description="pixels (voxels, for a volume) with this label")
    area_mm2: float | None = Field(default=None, description="2-D: pixels times pixel area; "
                                   "None when the spacing is unknown or for a volume")
    volume_ml: float | None = Field(default=None, description="a volume: voxels times voxel "
                                    "volume, in millilitres")


class LabelMapReading(TaskFinding):
    """A label-map task's reading of one image, or of its slice of a volume (``volume``)."""

    model_config = ConfigDict(frozen=True, extra="allow")

    kind: Literal["label_map"] = "label_map"
    labels: list[LabelStat] = Field(default_factory=list, description="the labels found")
    maps_file: str | None = Field(default=None, description="npz with the label map "
                                  "(frames, rows, columns), relative to the study's results")
    volume: str | None = Field(default=None, description="the Series Instance UID of the "
                               "volume this image is a slice of; the labels are the volume's")
    ood_check: bool = Field(default=False, description="whether the model has an "
                            "out-of-distribution check")


def write_label_map(maps_dir: Path, name: str, labels: np.ndarray,
                    sources: Sequence[str] = ()) -> str:
    """The label map (frames or slices, rows, columns) as an npz in the study's maps folder,
    with the SOP Instance UIDs of a volume's slices in its order (``sources``); returns its
    path relative to the study's results (what findings.json stores)."""
    from radlens.agent.maps import MAPS_DIR, npz_bytes
    from radlens.dicom_io.spool import write_durably

    maps_dir.mkdir(parents=True, exist_ok=True)
    dtype = np.uint8 if int(labels.max(initial=0)) < 256 else np.uint16
    arrays = {LABELS_ARRAY: labels.astype(dtype)}
    if sources:
        arrays["sources"] = np.array(list(sources), dtype="U64")
    write_durably(maps_dir / f"{name}.npz", npz_bytes(arrays), fsync=False)
    return f"{MAPS_DIR}/{name}.npz"


def label_stats(labels: np.ndarray, definitions: Sequence[LabelDefinition], *,
                pixel_mm: tuple[float, float] | None = None,
                voxel_mm: tuple[float, float, float] | None = None) -> list[LabelStat]:
    """Per defined label present: its pixels, and its area (``pixel_mm``: row and column
    spacing) or volume (``voxel_mm``)."""
    counts = np.bincount(labels.ravel().astype(np.int64))
    stats = []
    for definition in definitions:
        pixels = int(counts[definition.value]) if definition.value < len(counts) else 0
        if not pixels:
            continue
        area = (round(pixels * pixel_mm[0] * pixel_mm[1], 2)
                if pixel_mm is not None and voxel_mm is None else None)
        volume = (round(pixels * float(np.prod(voxel_mm)) / 1000.0, 3)
                  if voxel_mm is not None else None)
        stats.append(LabelStat(label=definition.value, name=definition.name, pixels=pixels,
                               area_mm2=area, volume_ml=volume))
    return stats


class LabelMapTask(Task):
    """A task whose readings are label maps; subclasses set ``name``, ``title``, ``labels`` (or
    override ``label_definitions``) and implement ``load``."""

    finding_type = LabelMapReading
    segments = True
    labels: ClassVar[tuple[LabelDefinition, ...]] = ()
    has_ood_check: ClassVar[bool] = False

    def label_definitions(self) -> tuple[LabelDefinition, ...]:
        return self.labels

    # ---- findings ------------------------------------------------------------------------
    def status_counts(self, findings: StudyFindings) -> dict[str, int]:
        counts: dict[str, int] = defaultdict(int)
        for info in findings.images:
            for reading in self.readings(info):
                for stat in reading.labels:
                    counts[f"{self.name}: images with {stat.name}"] += 1
        return dict(counts)

    def _read(self, findings: StudyFindings) -> list[tuple[int, ImageInfo, LabelMapReading]]:
        return [(number, info, reading)
                for number, info in enumerate(findings.images, start=1)
                for reading in self.readings(info)]

    # ---- outputs -------------------------------------------------------------------------
    def notes(self, findings: StudyFindings) -> list[str]:
        readings = self._read(findings)
        if not readings or all(r.ood_check for _, _, r in readings):
            return []
        model = readings[0][2].model
        return [f"{self.name} ({model.name} {model.version}) has no out-of-distribution "
                "check: it states what it found on every image routing gave it, however "
                "unlike its training images."]

    def segmentation_note(self, findings: StudyFindings) -> str | None:
        readings = self._read(findings)
        if readings and not any(reading.labels for _, _, reading in readings):
            return f"{self.name} found none of its labels, so it wrote no segmentation (SEG)."
        return None

    def _label_maps(self, context: OutputContext
                    ) -> list[tuple[list[AnalysedSource], np.ndarray, LabelMapReading]]:
        """Each SEG's sources (one image, or a volume's slices in order), its label map and
        the reading behind it."""
        key = f"{self.name}.maps"
        if key in context.memo:
            return list(context.memo[key])
        images = context.analysed_by(self.name)
        out = []
        volumes: dict[str, list[tuple[AnalysedSource, LabelMapReading]]] = defaultdict(list)
        for image in images:
            for reading in self.readings(image.info):
                if reading.volume is not None:
                    volumes[reading.volume].append((image, reading))
                elif reading.maps_file is not None and reading.labels:
                    with np.load(context.study_results / reading.maps_file) as stored:
                        out.append(([image], stored[LABELS_ARRAY], reading))
        for members in volumes.values():
            reading = members[0][1]
            if reading.maps_file is None or not reading.labels:
                continue
            with np.load(context.study_results / reading.maps_file) as stored:
                labels = stored[LABELS_ARRAY]  # (slices, rows, columns) in the volume's order
            order = {uid: n for n, uid in enumerate(stored_order(context, reading))}
            members.sort(key=lambda m: order.get(m[0].info.ref.sop_instance_uid, len(order)))
            out.append(([image for image, _ in members], labels, reading))
        context.memo[key] = out
        return list(out)

    def segmentations(self, context: OutputContext, equipment: Any,
                      plan: Any) -> list[Any]:
        from radlens.dicom_io.writers.seg import build_label_map_segmentation

        written = []
        for sources, labels, reading in self._label_maps(context):
            present = [d for d in self.label_definitions()
                       if any(s.label == d.value for s in reading.labels)]
            written.append(build_label_map_segmentation(
                [source.header for source in sources], [source.info for source in sources],
                labels, present, reading.model, plan, len(written) + 1))
        return written

    def sr_content(self, context: OutputContext, segmentations: Sequence[Any] = ()
                   ) -> SrContent:
        from radlens.tasks.labelmap_sr import label_groups

        maps = self._label_maps(context)
        images = context.analysed_by(self.name)
        if not images:
            return SrContent()
        segment_of = {seg.source_sop_instance_uids[0]: seg for seg in segmentations}
        groups = []
        for sources, _, reading in maps:
            groups += label_groups(self, sources, reading,
                                   segment_of.get(sources[0].info.ref.sop_instance_uid))
        return SrContent(groups=groups, referenced=[image.header for image in images])

    def pdf_table(self, findings: StudyFindings) -> PdfTable | None:
        readings = self._read(findings)
        if not readings:
            return None
        rows = [[str(number), stat.name, str(stat.pixels),
                 f"{stat.area_mm2:.1f}" if stat.area_mm2 is not None else "-",
                 f"{stat.volume_ml:.2f}" if stat.volume_ml is not None else "-"]
                for number, _, reading in readings for stat in reading.labels
                if reading.volume is None or number == min(
                    n for n, _, r in readings if r.volume == reading.volume)]
        return PdfTable(title=f"{self.title} ({len(rows)} label(s) found)",
                        columns=("image", "label", "pixels", "area mm²", "volume ml"),
                        rows=rows, empty=f"{self.name} found none of its labels.",
                        footnote="Areas and volumes of the model's label map: an AI "
                                 "measurement, not a reader's.")

    # ---- narrative -----------------------------------------------------------------------
    def narrative(self, findings: StudyFindings) -> NarrativePart | None:
        readings = self._read(findings)
        if not readings:
            return None
        model = readings[0][2].model
        lines = [f"{self.title}: {len(readings)} image(s) read by {model.name} "
                 f"{model.version}."]
        seen: set[str] = set()
        for number, _, reading in readings:
            if reading.volume is not None:
                if reading.volume in seen:
                    continue
                seen.add(reading.volume)
            for stat in reading.labels:
                size = (f"{stat.volume_ml:.2f} ml" if stat.volume_ml is not None else
                        f"{stat.area_mm2:.1f} mm²" if stat.area_mm2 is not None else
                        f"{stat.pixels} pixels")
                where = "volume" if reading.volume is not None else f"image {number}"
                lines.append(f"{stat.name.capitalize()} in {where}: {size} (AI segmentation).")
        if not any(reading.labels for _, _, reading in readings):
            lines.append(f"None of its labels ({', '.join(d.name for d in self.labels)}) "
                         "was found.")
        return NarrativePart(lines=lines, limitations=(
            "Limitations: an automated segmentation without clinical context"
            + ("" if self.has_ood_check else " and without an out-of-distribution check")
            + ". Not for diagnostic use: to be reviewed by a qualified reader."))

    def facts(self, findings: StudyFindings) -> BaseModel | None:
        readings = self._read(findings)
        if not readings:
            return None
        return LabelMapFacts(labels=[
            LabelFacts(image=number, name=stat.name, pixels=stat.pixels,
                       area_mm2=stat.area_mm2, volume_ml=stat.volume_ml)
            for number, _, reading in readings for stat in reading.labels])

    def grounding_numbers(self, facts: Mapping[str, Any]) -> set[float]:
        values: set[float] = set()
        stated = LabelMapFacts.model_validate(facts)
        for label in stated.labels:
            for value in (label.image, label.pixels, label.area_mm2, label.volume_ml):
                if value is not None:
                    values |= {round(float(value), d) for d in (0, 1, 2, 3)}
        values.add(float(len(stated.labels)))
        return values


class LabelFacts(BaseModel):
    image: int
    name: str
    pixels: int
    area_mm2: float | None
    volume_ml: float | None


class LabelMapFacts(BaseModel):
    """Each label found, by image number, with its size."""

    labels: list[LabelFacts]


def stored_order(context: OutputContext, reading: LabelMapReading) -> list[str]:
    """The SOP Instance UIDs of a volume's slices in the order of its label map."""
    assert reading.maps_file is not None
    with np.load(context.study_results / reading.maps_file) as stored:
        if "sources" in stored.files:
            return [str(uid) for uid in stored["sources"]]
    return []


def log_reading(task: str, info: ImageInfo, stats: list[LabelStat], model: ModelRef) -> None:
    log.info("label map read", extra=kv(task=task, sop=info.ref.sop_instance_uid,
                                        model=model.name,
                                        labels=",".join(s.name for s in stats) or "none"))
