"""DICOM Segmentation (highdicom) of what a task segmented: the SEG written, and which segment
holds what, for the SR's references to it."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.coding import Code
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from radlens.dicom_io import codes
from radlens.dicom_io.writers.common import Equipment, SeriesPlan, geometry_sources, is_multiframe
from radlens.findings import ImageInfo, ModelRef
from radlens.logs import kv

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WrittenSegmentation:
    """A SEG, which segment holds what, and the source images it segments."""

    dataset: hd.seg.Segmentation
    segment_numbers: dict[str, int]  # what a segment holds (a class, a label) -> its number
    source_sop_instance_uids: tuple[str, ...]




# Segment colours for labels 1, 2, ... of a label map (RecommendedDisplayCIELabValue).
LABEL_COLOURS = ((230, 80, 60), (60, 160, 230), (250, 200, 40), (120, 200, 90), (200, 90, 220),
                 (240, 140, 40), (80, 210, 200), (160, 160, 160))


def build_label_map_segmentation(headers: Sequence[Dataset], infos: Sequence[ImageInfo],
                                 labels: np.ndarray, definitions: Sequence[Any], model: ModelRef,
                                 plan: SeriesPlan, instance_number: int) -> WrittenSegmentation:
    """A SEG of a task's label map over its sources: one image (``labels`` shaped (frames,
    rows, columns)) or a volume's slices in order (one plane per slice). A segment per label
    in ``definitions`` (``LabelDefinition``s: value, name, optional code; the code, else SNOMED
    CT Tissue, is the segment's property type), numbered 1.. in their order."""
    equipment = Equipment.for_model(model)
    algorithm = hd.AlgorithmIdentificationSequence(
        name=equipment.algorithm_name, version=equipment.algorithm_version,
        family=codes.ARTIFICIAL_INTELLIGENCE)
    descriptions, planes = [], []
    for number, definition in enumerate(definitions, start=1):
        code = (Code(definition.code.value, definition.code.scheme, definition.code.meaning)
                if definition.code is not None else codes.TISSUE)
        descriptions.append(hd.seg.SegmentDescription(
            segment_number=number, segment_label=definition.name[:64],
            segmented_property_category=codes.TISSUE, segmented_property_type=code,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm, tracking_uid=generate_uid(),
            tracking_id=f"{model.name} {definition.name}"[:64],
            display_color=hd.color.CIELabColor.from_rgb(
                *LABEL_COLOURS[(number - 1) % len(LABEL_COLOURS)])))
        planes.append(labels == definition.value)
    pixel_array = np.stack(planes, axis=-1).astype(np.uint8)  # (planes, rows, columns, segments)
    if len(headers) == 1 and not is_multiframe(headers[0]):
        pixel_array = pixel_array[:1]
    spacing = infos[0].spacing
    sources, pixel_measures = geometry_sources(
        list(headers), (spacing.row_mm, spacing.column_mm) if spacing else None)
    seg = hd.seg.Segmentation(
        source_images=sources,
        pixel_array=pixel_array,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=plan.series_instance_uid,
        series_number=plan.series_number,
        sop_instance_uid=generate_uid(),
        instance_number=instance_number,
        manufacturer=equipment.manufacturer,
        manufacturer_model_name=equipment.model_name,
        software_versions=equipment.software_versions,
        device_serial_number=equipment.device_serial_number,
        content_description=f"{model.name} segmentation"[:64],
        content_label="LABELS",
        transfer_syntax_uid=ExplicitVRLittleEndian,
        pixel_measures=pixel_measures,
        omit_empty_frames=True,
    )
    seg.SeriesDescription = plan.description
    log.info("SEG built", extra=kv(sop=seg.SOPInstanceUID, segments=len(descriptions),
                                   model=model.name))
    return WrittenSegmentation(seg, {d.name: n for n, d in enumerate(definitions, start=1)},
                               tuple(info.ref.sop_instance_uid for info in infos))
