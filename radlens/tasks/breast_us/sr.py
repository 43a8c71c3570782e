"""The lesion task's part of the TID 1500 report.

Per lesion a measurement group (TID 1501) with a tracking identifier and UID, its area inferred
from its contour (a closed SCOORD polyline on the source image), its long and short diameters as
length measurements inferred from their two-point SCOORD lines (the image coordinates OHIF
draws; TID 1410's planar ROI group allows no SCOORD on its measurements), the other
measurements in UCUM units, the predicted class and a BI-RADS-style category worded as an AI
suggestion, and a reference to its SEG segment. The segment is referenced whole (segment number
without frame numbers): highdicom's ``ReferencedSegmentationFrame`` puts both in one item,
which the SR IOD forbids. Per analysed frame a group with its class probabilities and saliency
agreement.
"""

from __future__ import annotations

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes as dcm_codes
from pydicom.sr.coding import Code
from pydicom.uid import generate_uid
from skimage import measure

from radlens.dicom_io import codes as common
from radlens.dicom_io.writers.seg import WrittenSegmentation
from radlens.dicom_io.writers.sr import frame_outline
from radlens.findings import LesionMeasurements
from radlens.reporting.narrative import Category
from radlens.tasks.breast_us import codes as task_codes
from radlens.tasks.breast_us.analysed import AnalysedImage

# A lesion's tracking identifier starts with the Cornerstone3D tool convention that OHIF's own
# SR export writes: OHIF then rehydrates the group (long and short axis with their lines) as a
# bidirectional measurement and lists it in its measurement panel. The lesion's name follows.
VIEWER_BIDIRECTIONAL = "Cornerstone3DTools@^0.1.0:Bidirectional"
MAX_CONTOUR_POINTS = 256


def lesion_contour(mask: np.ndarray) -> np.ndarray:
    """Closed outline of a mask as (column, row) image coordinates: pixel centres sit at .5,
    as the DICOM image coordinate system puts (0, 0) at the first pixel's outer corner."""
    padded = np.pad(mask.astype(np.float32), 1)
    contours = measure.find_contours(padded, 0.5)
    outline = max(contours, key=len) - 1.0  # (row, column), undo the padding
    outline = measure.approximate_polygon(outline, tolerance=0.5)
    if len(outline) > MAX_CONTOUR_POINTS:
        step = int(np.ceil(len(outline) / MAX_CONTOUR_POINTS))
        outline = np.vstack([outline[:-1:step], outline[:1]])
    if not np.allclose(outline[0], outline[-1]):
        outline = np.vstack([outline, outline[:1]])
    return np.stack([outline[:, 1] + 0.5, outline[:, 0] + 0.5], axis=1).astype(np.float32)


def _line(points: tuple[tuple[float, float], tuple[float, float]]) -> np.ndarray:
    """Two (row, column) end points as (column, row) image coordinates."""
    return np.array([[c + 0.5, r + 0.5] for r, c in points], dtype=np.float32)


def _num(name: Code, value: float | None, unit: Code, source: hd.sr.SourceImageForRegion
         | None = None, line: np.ndarray | None = None) -> hd.sr.Measurement | None:
    if value is None or not np.isfinite(value):
        return None
    coordinates = None
    if line is not None and source is not None:
        coordinates = [hd.sr.CoordinatesForMeasurement(
            graphic_type=hd.sr.GraphicTypeValues.POLYLINE, graphic_data=line,
            source_image=source)]
    return hd.sr.Measurement(name=name, value=round(float(value), 4), unit=unit,
                             referenced_coordinates=coordinates)


def lesion_group(image: AnalysedImage, lesion: LesionMeasurements, number: int,
                  segmentation: WrittenSegmentation | None, algorithm: hd.sr.AlgorithmIdentification
                  ) -> Dataset:
    frame_numbers = [lesion.frame + 1] if image.info.frames > 1 else None
    source = hd.sr.SourceImageForRegion(
        referenced_sop_class_uid=image.info.ref.sop_class_uid,
        referenced_sop_instance_uid=image.sop_instance_uid,
        referenced_frame_numbers=frame_numbers)
    contour = lesion_contour(image.frames[lesion.frame].lesions == lesion.index)
    mm = lesion.longest_diameter_mm is not None
    length_unit = common.UCUM_MM if mm else common.UCUM_PIXELS
    measurements = [m for m in (
        _num(common.LONG_AXIS, lesion.longest_diameter_mm if mm else lesion.longest_diameter_px,
             length_unit, source, _line(lesion.long_axis_px)),
        _num(common.SHORT_AXIS, lesion.perpendicular_diameter_mm if mm
             else lesion.perpendicular_diameter_px, length_unit, source,
             _line(lesion.short_axis_px)),
        _num(common.AREA, lesion.area_mm2 if mm else float(lesion.area_px),
             common.UCUM_MM2 if mm else common.UCUM_SQUARE_PIXELS, source, contour),
        _num(common.PERIMETER, lesion.perimeter_mm if mm else lesion.perimeter_px, length_unit),
        _num(common.COMPACTNESS, lesion.compactness, common.UCUM_NO_UNITS),
        _num(common.EDGE_SHARPNESS, lesion.edge_sharpness, common.UCUM_GREY_PER_PIXEL),
        _num(common.ASYMMETRY, lesion.asymmetry, common.UCUM_NO_UNITS),
        _num(common.BORDER_IRREGULARITY, lesion.border_irregularity, common.UCUM_NO_UNITS),
        _num(common.ELONGATION, lesion.elongation, common.UCUM_NO_UNITS),
        _num(common.MEAN_INTENSITY, float(np.mean(lesion.intensity_mean)), common.UCUM_GREY),
        _num(common.INTENSITY_SD, float(np.mean(lesion.intensity_std)), common.UCUM_GREY),
        _num(common.CLASS_PROBABILITY, lesion.probability, common.UCUM_NO_UNITS),
    ) if m is not None]
    evaluations = [
        hd.sr.QualitativeEvaluation(task_codes.PREDICTED_CLASS,
                                    task_codes.LESION_TYPES[lesion.lesion_class]),
        hd.sr.QualitativeEvaluation(task_codes.AI_CATEGORY_SUGGESTION,
                                    category_code(Category.for_lesion(lesion))),
    ]
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=generate_uid(), identifier=f"{VIEWER_BIDIRECTIONAL}:Lesion {number}"),
        finding_type=common.LESION,
        algorithm_id=algorithm,
        finding_sites=[hd.sr.FindingSite(task_codes.BREAST)],
        measurements=measurements,
        qualitative_evaluations=evaluations,
        source_images=[hd.sr.SourceImageForMeasurementGroup(
            referenced_sop_class_uid=image.info.ref.sop_class_uid,
            referenced_sop_instance_uid=image.sop_instance_uid,
            referenced_frame_numbers=frame_numbers)],
    )
    container = group[0]
    if segmentation is not None:
        seg = segmentation.dataset
        reference = hd.sr.ImageContentItem(
            name=common.REFERENCED_SEGMENT,
            referenced_sop_class_uid=seg.SOPClassUID,
            referenced_sop_instance_uid=seg.SOPInstanceUID,
            referenced_segment_numbers=[segmentation.segment_numbers[lesion.lesion_class]],
            relationship_type=hd.sr.RelationshipTypeValues.CONTAINS)
        container.ContentSequence.append(reference)
    return group


def image_groups(image: AnalysedImage, algorithm: hd.sr.AlgorithmIdentification
                 ) -> list[Dataset]:
    groups = []
    for frame_number, frame in sorted(image.frames.items()):
        prediction = frame.prediction
        probabilities = prediction.class_probabilities
        frame_numbers = [frame_number + 1] if image.info.frames > 1 else None
        source = hd.sr.SourceImageForRegion(
            referenced_sop_class_uid=image.info.ref.sop_class_uid,
            referenced_sop_instance_uid=image.sop_instance_uid,
            referenced_frame_numbers=frame_numbers)
        # The probabilities concern the whole frame: their SCOORD is the frame's outline. OHIF
        # needs image coordinates on every group of an SR to load any of it.
        measurements = [
            hd.sr.Measurement(task_codes.NORMAL_PROBABILITY, round(probabilities.normal, 4),
                              common.UCUM_NO_UNITS, referenced_coordinates=[
                                  hd.sr.CoordinatesForMeasurement(
                                      graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
                                      graphic_data=frame_outline(image.info.rows,
                                                                  image.info.columns),
                                      source_image=source)]),
            hd.sr.Measurement(task_codes.BENIGN_PROBABILITY, round(probabilities.benign, 4),
                              common.UCUM_NO_UNITS),
            hd.sr.Measurement(task_codes.MALIGNANT_PROBABILITY, round(probabilities.malignant, 4),
                              common.UCUM_NO_UNITS),
        ]
        if prediction.ood_score is not None:
            measurements.append(hd.sr.Measurement(
                common.OOD_SCORE, round(prediction.ood_score, 3), common.UCUM_NO_UNITS))
        for method, agreement in sorted(prediction.saliency.items()):
            measurements.append(hd.sr.Measurement(
                common.SALIENCY_DICE, round(agreement.dice, 4), common.UCUM_NO_UNITS,
                method=common.SALIENCY_METHODS[method]))
            measurements.append(hd.sr.Measurement(
                common.SALIENCY_MASS_INSIDE, round(agreement.mass_inside, 4),
                common.UCUM_NO_UNITS,
                method=common.SALIENCY_METHODS[method]))
        finding = (dcm_codes.SCT.BreastNormal if prediction.predicted_class == "normal"
                   else task_codes.LESION_TYPES[prediction.predicted_class])
        groups.append(hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(
                uid=generate_uid(), identifier=f"Image {image.info.ref.sop_instance_uid[-12:]}"
                f" frame {frame_number + 1}"),
            algorithm_id=algorithm,
            measurements=measurements,
            qualitative_evaluations=[hd.sr.QualitativeEvaluation(task_codes.PREDICTED_CLASS,
                                                                 finding)],
            source_images=[hd.sr.SourceImageForMeasurementGroup(
                referenced_sop_class_uid=image.info.ref.sop_class_uid,
                referenced_sop_instance_uid=image.sop_instance_uid,
                referenced_frame_numbers=frame_numbers)],
        ))
    return groups


def category_code(category: Category) -> Code:
    return Code(f"RADL10{category.value}", "99RADLENS",
                f"Category {category.value} ({category.meaning}), AI suggestion"[:64])
