"""DICOM Segmentation of the measured lesions (highdicom), one segment per lesion class.

One SEG per source series (per image for multi-frame sources, which highdicom takes one at a
time), in the source study and a new series. Images without patient geometry (2-D ultrasound)
get nominal plane geometry and pixel measures from their physical spacing, which OHIF needs to
display the SEG (see ``common.with_nominal_geometry``). No lesion, no SEG: the SR says so.
"""

from __future__ import annotations

import logging
from collections import defaultdict

import highdicom as hd
import numpy as np
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from radlens.dicom_io import codes as common
from radlens.dicom_io.writers.common import (
    Equipment,
    SeriesPlan,
    geometry_sources,
    is_multiframe,
)
from radlens.dicom_io.writers.seg import WrittenSegmentation
from radlens.logs import kv
from radlens.tasks.breast_us import codes as task_codes
from radlens.tasks.breast_us.analysed import AnalysedImage

log = logging.getLogger(__name__)

# RecommendedDisplayCIELabValue of each segment, in the masks' own colours (red malignant, green
# benign): readers that follow it (3D Slicer through dcmqi, OHIF) draw them alike.
SEGMENT_COLOURS: dict[str, tuple[int, int, int]] = {"malignant": (220, 30, 30),
                                                    "benign": (30, 190, 60)}
DEFAULT_SEGMENT_COLOUR = (240, 200, 40)

def build_segmentations(images: list[AnalysedImage], equipment: Equipment,
                        plan: SeriesPlan) -> list[WrittenSegmentation]:
    """Every SEG of a study's analysed images; an empty list when no lesion was found."""
    groups: dict[str, list[AnalysedImage]] = defaultdict(list)
    for image in images:
        if image.lesions:
            groups[image.series_instance_uid].append(image)
    written: list[WrittenSegmentation] = []
    for series in groups.values():
        series.sort(key=lambda image: int(image.header.get("InstanceNumber", 0) or 0))
        batches = ([[image] for image in series] if any(is_multiframe(i.header) for i in series)
                   else [series])
        for batch in batches:
            written.append(_segmentation(batch, equipment, plan, len(written) + 1))
    return written


def _segmentation(images: list[AnalysedImage], equipment: Equipment, plan: SeriesPlan,
                  instance_number: int) -> WrittenSegmentation:
    classes = sorted({lesion.lesion_class for image in images for lesion in image.lesions},
                     key=lambda name: task_codes.LESION_CLASS_VALUE[name])
    segment_numbers = {name: number for number, name in enumerate(classes, start=1)}
    algorithm = hd.AlgorithmIdentificationSequence(
        name=equipment.algorithm_name, version=equipment.algorithm_version,
        family=common.ARTIFICIAL_INTELLIGENCE)
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=number, segment_label=f"{name} lesion",
            segmented_property_category=common.MORPHOLOGICALLY_ALTERED_STRUCTURE,
            segmented_property_type=task_codes.LESION_TYPES[name],
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm, tracking_uid=generate_uid(),
            tracking_id=f"radlens {name} lesions",
            display_color=hd.color.CIELabColor.from_rgb(
                *SEGMENT_COLOURS.get(name, DEFAULT_SEGMENT_COLOUR)))
        for name, number in segment_numbers.items()]
    planes = []
    for image in images:
        for frame in range(image.info.frames):
            planes.append(np.stack([image.mask(frame, name) for name in classes], axis=-1))
    pixel_array = np.stack(planes).astype(np.uint8)  # (planes, rows, columns, segments)

    spacing = images[0].info.spacing
    if spacing is None:
        log.warning("no physical spacing: SEG pixel measures are nominal 1 mm",
                    extra=kv(sop=images[0].sop_instance_uid))
    headers, pixel_measures = geometry_sources(
        [image.header for image in images],
        (spacing.row_mm, spacing.column_mm) if spacing else None)
    seg = hd.seg.Segmentation(
        source_images=headers,
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
        content_description="radlens lesions",
        content_label="LESIONS",
        transfer_syntax_uid=ExplicitVRLittleEndian,
        pixel_measures=pixel_measures,
        omit_empty_frames=True,
    )
    seg.SeriesDescription = plan.description
    log.info("SEG built", extra=kv(sop=seg.SOPInstanceUID, frames=int(seg.NumberOfFrames),
                                   segments=len(descriptions)))
    return WrittenSegmentation(seg, segment_numbers,
                               tuple(image.sop_instance_uid for image in images))
