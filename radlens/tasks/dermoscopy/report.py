"""What the dermoscopy task adds to a study's answer, so far: a SEG of each photograph's
refined lesion, and a TID 1500 measurement group per photograph with the ABC(D) values (each
with its units and its severity level), the melanoma probability, the assessment, the
retrieved descriptors as qualitative evaluations, the attention on the lesion and the OOD
score. The overlay, the PDF section, the narrative and its grounding come next.

Each feature's severity level is a measurement of its own (1 to 5) beside the feature's
value, its concept naming the feature it grades. A
photograph without Pixel Spacing states B per pixel and no diameter: nothing is guessed.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np

from radlens.findings import StudyFindings
from radlens.tasks.base import AnalysedSource, OutputContext, SrContent
from radlens.tasks.dermoscopy import codes
from radlens.tasks.dermoscopy.findings import TASK_NAME, DermoscopyReading

log = logging.getLogger(__name__)

SEGMENT = "skin lesion"
SEGMENT_COLOUR = (250, 170, 30)


def readings_of(findings: StudyFindings) -> list[tuple[int, Any, DermoscopyReading]]:
    """(image number in the study's findings, image, reading) of every photograph read."""
    from radlens.tasks.dermoscopy import TASK

    return [(number, info, reading)
            for number, info in enumerate(findings.images, start=1)
            for reading in TASK.readings(info)]


# ---- SEG ---------------------------------------------------------------------------------

def segmentations(context: OutputContext, equipment: Any, plan: Any) -> list[Any]:
    """One SEG per photograph read (its refined lesion as one segment), built with highdicom
    on the photograph's grid; a photograph whose mask is lost is left out and logged."""
    from radlens.tasks.dermoscopy import TASK

    written = []
    for image in context.analysed_by(TASK_NAME):
        for reading in TASK.readings(image.info):
            if reading.maps_file is None or reading.lesion_pixels == 0:
                continue
            try:
                with np.load(context.study_results / reading.maps_file) as stored:
                    mask = stored["lesion_mask"].astype(bool)
            except (OSError, KeyError, ValueError) as exc:
                log.warning("dermoscopy lesion mask not readable: no SEG for the image",
                            extra={"sop": image.info.ref.sop_instance_uid, "error": str(exc)})
                continue
            written.append(_segmentation(image, mask, equipment, plan, len(written) + 1))
    return written


def _segmentation(image: AnalysedSource, mask: np.ndarray, equipment: Any, plan: Any,
                  instance_number: int) -> Any:
    import highdicom as hd
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    from radlens.dicom_io import codes as common
    from radlens.dicom_io.writers.common import geometry_sources
    from radlens.dicom_io.writers.seg import WrittenSegmentation

    algorithm = hd.AlgorithmIdentificationSequence(
        name=equipment.algorithm_name, version=equipment.algorithm_version,
        family=common.ARTIFICIAL_INTELLIGENCE)
    description = hd.seg.SegmentDescription(
        segment_number=1, segment_label=SEGMENT,
        segmented_property_category=common.MORPHOLOGICALLY_ALTERED_STRUCTURE,
        segmented_property_type=codes.SKIN_LESION,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm, tracking_uid=generate_uid(),
        tracking_id="radlens skin lesion",
        display_color=hd.color.CIELabColor.from_rgb(*SEGMENT_COLOUR))
    spacing = image.info.spacing
    headers, pixel_measures = geometry_sources(
        [image.header], (spacing.row_mm, spacing.column_mm) if spacing else None)
    seg = hd.seg.Segmentation(
        source_images=headers, pixel_array=mask[None, :, :, None].astype(np.uint8),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[description],
        series_instance_uid=plan.series_instance_uid, series_number=plan.series_number,
        sop_instance_uid=generate_uid(), instance_number=instance_number,
        manufacturer=equipment.manufacturer, manufacturer_model_name=equipment.model_name,
        software_versions=equipment.software_versions,
        device_serial_number=equipment.device_serial_number,
        content_description="radlens skin lesion", content_label="LESION",
        transfer_syntax_uid=ExplicitVRLittleEndian, pixel_measures=pixel_measures,
        omit_empty_frames=True)
    seg.SeriesDescription = plan.description
    return WrittenSegmentation(seg, {SEGMENT: 1}, (image.info.ref.sop_instance_uid,))


# ---- SR ----------------------------------------------------------------------------------

def sr_content(context: OutputContext, segmentations: Sequence[Any] = ()) -> SrContent:
    from radlens.tasks.dermoscopy import TASK

    images = context.analysed_by(TASK_NAME)
    if not images:
        return SrContent()
    by_source = {uid: seg for seg in segmentations for uid in seg.source_sop_instance_uids}
    groups = [_group(image, reading, by_source.get(image.info.ref.sop_instance_uid))
              for image in images for reading in TASK.readings(image.info)]
    return SrContent(groups=groups, procedures=[codes.DERMOSCOPIC_PHOTOGRAPHY],
                     referenced=[image.header for image in images])


def _site(image: AnalysedSource, reading: DermoscopyReading) -> Any:
    """The finding site: the photograph's anatomic region as its header codes it, with the
    side; the skin when the header names none."""
    import highdicom as hd
    from pydicom.sr.coding import Code

    from radlens.dicom_io import codes as common

    site = codes.SKIN
    regions = image.header.get("AnatomicRegionSequence")
    if regions:
        item = regions[0]
        try:
            site = Code(str(item.CodeValue), str(item.CodingSchemeDesignator),
                        str(item.CodeMeaning))
        except AttributeError:
            pass
    return hd.sr.FindingSite(site, laterality=common.SIDES.get(reading.laterality or ""))


def _group(image: AnalysedSource, reading: DermoscopyReading, segmentation: Any) -> Any:
    import highdicom as hd
    from pydicom.uid import generate_uid

    from radlens.dicom_io import codes as common
    from radlens.dicom_io.writers.sr import whole_image

    no_units = common.UCUM_NO_UNITS
    outline = whole_image(image.info)
    measurements = [hd.sr.Measurement(codes.MELANOMA_PROBABILITY,
                                      round(reading.melanoma_probability, 4), no_units,
                                      referenced_coordinates=outline)]

    def level(feature: str, value: int | None) -> None:
        if value is not None:
            measurements.append(hd.sr.Measurement(codes.LEVELS[feature], value, no_units))

    m = reading.measurements
    if m is not None:
        measurements += [hd.sr.Measurement(common.ASYMMETRY, m.asymmetry, no_units)]
        level("asymmetry", m.levels.get("asymmetry"))
        if m.border_per_mm is not None:
            measurements.append(hd.sr.Measurement(codes.BORDER_CURVATURE, m.border_per_mm,
                                                  codes.UCUM_PER_MM))
        else:
            measurements.append(hd.sr.Measurement(codes.BORDER_CURVATURE, m.border_per_pixel,
                                                  codes.UCUM_PER_PIXEL))
        measurements.append(hd.sr.Measurement(codes.BORDER_TURNS, m.border_turns, no_units))
        level("border", m.levels.get("border"))
        measurements += [hd.sr.Measurement(codes.HUE_SD, m.hue_sd, no_units),
                         hd.sr.Measurement(codes.SATURATION_SD, m.saturation_sd, no_units),
                         hd.sr.Measurement(codes.VALUE_SD, m.value_sd, no_units)]
        level("colour", m.levels.get("colour"))
        if m.diameter_mm is not None:
            measurements.append(hd.sr.Measurement(codes.DIAMETER, m.diameter_mm,
                                                  common.UCUM_MM))
            level("diameter_mm", m.levels.get("diameter_mm"))
        if m.area_mm2 is not None:
            measurements.append(hd.sr.Measurement(common.AREA, m.area_mm2, common.UCUM_MM2))
    if reading.attention_on_lesion is not None:
        measurements.append(hd.sr.Measurement(
            codes.ATTENTION_ON_LESION, reading.attention_on_lesion, no_units,
            method=common.SALIENCY_METHODS["gradcam"]))
    if reading.alignment is not None:
        measurements.append(hd.sr.Measurement(codes.ALIGNMENT, reading.alignment, no_units))
    if reading.ood_score is not None:
        measurements.append(hd.sr.Measurement(common.OOD_SCORE, reading.ood_score, no_units))
    evaluations = [hd.sr.QualitativeEvaluation(
        codes.ASSESSMENT, codes.MALIGNANT_MELANOMA if reading.assessment == "melanoma"
        else codes.NEVUS)]
    evaluations += [hd.sr.QualitativeEvaluation(codes.DERMOSCOPIC_FEATURE,
                                                codes.DESCRIPTOR_CODES[d.name])
                    for d in reading.descriptors if d.name in codes.DESCRIPTOR_CODES]
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=generate_uid(), identifier=f"Skin lesion "
            f"{reading.lesion_id or image.info.ref.sop_instance_uid[-12:]}"),
        finding_type=codes.SKIN_LESION,
        algorithm_id=hd.sr.AlgorithmIdentification(name=reading.model.name,
                                                   version=reading.model.version),
        finding_sites=[_site(image, reading)],
        measurements=measurements, qualitative_evaluations=evaluations,
        source_images=[hd.sr.SourceImageForMeasurementGroup(
            referenced_sop_class_uid=image.info.ref.sop_class_uid,
            referenced_sop_instance_uid=image.info.ref.sop_instance_uid)])
    if segmentation is not None:
        seg = segmentation.dataset
        group[0].ContentSequence.append(hd.sr.ImageContentItem(
            name=common.REFERENCED_SEGMENT, referenced_sop_class_uid=seg.SOPClassUID,
            referenced_sop_instance_uid=seg.SOPInstanceUID,
            referenced_segment_numbers=[1],
            relationship_type=hd.sr.RelationshipTypeValues.CONTAINS))
    return group
