"""TID 1500 measurement report (Comprehensive 3D SR, highdicom) of a study's findings.

Per analysed image a group with its class probabilities and saliency agreement; per lesion a
measurement group (TID 1501) with a tracking identifier and UID, its area inferred from its
contour (a closed SCOORD polyline on the source image), its long and short diameters as length
measurements inferred from their two-point SCOORD lines (the image coordinates OHIF draws; TID
1410's planar ROI group allows no SCOORD on its measurements), the other measurements in UCUM
units, the predicted class and a BI-RADS-style category worded as an AI suggestion, and a
reference to its SEG segment. The
segment is referenced whole (segment number without frame numbers): highdicom's
``ReferencedSegmentationFrame`` puts both in one item, which the SR IOD forbids. The narrative,
its author and a not-for-diagnostic-use statement close the report.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import highdicom as hd
import numpy as np
from highdicom.sr.templates import DEFAULT_LANGUAGE
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes as dcm_codes
from pydicom.sr.coding import Code
from pydicom.uid import generate_uid
from skimage import measure

from radlens.dicom_io import codes
from radlens.dicom_io.writers.analysed import AnalysedImage
from radlens.dicom_io.writers.common import NOT_FOR_DIAGNOSTIC_USE, Equipment, SeriesPlan
from radlens.dicom_io.writers.seg import WrittenSegmentation
from radlens.findings import BreastDensity, DensityPrediction, ImageInfo, LesionMeasurements
from radlens.logs import kv
from radlens.reporting.narrative import Category, Narrative

log = logging.getLogger(__name__)

DEVICE_UID_ROOT = "radlens device"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
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


def _frame_outline(rows: int, columns: int) -> np.ndarray:
    """The frame's border through the outer pixel centres, closed, as (column, row)."""
    corners = [(0.5, 0.5), (columns - 0.5, 0.5), (columns - 0.5, rows - 0.5),
               (0.5, rows - 0.5), (0.5, 0.5)]
    return np.array(corners, dtype=np.float32)


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


def _lesion_group(image: AnalysedImage, lesion: LesionMeasurements, number: int,
                  segmentation: WrittenSegmentation | None, algorithm: hd.sr.AlgorithmIdentification
                  ) -> Dataset:
    frame_numbers = [lesion.frame + 1] if image.info.frames > 1 else None
    source = hd.sr.SourceImageForRegion(
        referenced_sop_class_uid=image.info.ref.sop_class_uid,
        referenced_sop_instance_uid=image.sop_instance_uid,
        referenced_frame_numbers=frame_numbers)
    contour = lesion_contour(image.frames[lesion.frame].lesions == lesion.index)
    mm = lesion.longest_diameter_mm is not None
    length_unit = codes.UCUM_MM if mm else codes.UCUM_PIXELS
    measurements = [m for m in (
        _num(codes.LONG_AXIS, lesion.longest_diameter_mm if mm else lesion.longest_diameter_px,
             length_unit, source, _line(lesion.long_axis_px)),
        _num(codes.SHORT_AXIS, lesion.perpendicular_diameter_mm if mm
             else lesion.perpendicular_diameter_px, length_unit, source,
             _line(lesion.short_axis_px)),
        _num(codes.AREA, lesion.area_mm2 if mm else float(lesion.area_px),
             codes.UCUM_MM2 if mm else codes.UCUM_SQUARE_PIXELS, source, contour),
        _num(codes.PERIMETER, lesion.perimeter_mm if mm else lesion.perimeter_px, length_unit),
        _num(codes.COMPACTNESS, lesion.compactness, codes.UCUM_NO_UNITS),
        _num(codes.EDGE_SHARPNESS, lesion.edge_sharpness, codes.UCUM_GREY_PER_PIXEL),
        _num(codes.ASYMMETRY, lesion.asymmetry, codes.UCUM_NO_UNITS),
        _num(codes.BORDER_IRREGULARITY, lesion.border_irregularity, codes.UCUM_NO_UNITS),
        _num(codes.ELONGATION, lesion.elongation, codes.UCUM_NO_UNITS),
        _num(codes.MEAN_INTENSITY, float(np.mean(lesion.intensity_mean)), codes.UCUM_GREY),
        _num(codes.INTENSITY_SD, float(np.mean(lesion.intensity_std)), codes.UCUM_GREY),
        _num(codes.CLASS_PROBABILITY, lesion.probability, codes.UCUM_NO_UNITS),
    ) if m is not None]
    evaluations = [
        hd.sr.QualitativeEvaluation(codes.PREDICTED_CLASS, codes.LESION_TYPES[lesion.lesion_class]),
        hd.sr.QualitativeEvaluation(codes.AI_CATEGORY_SUGGESTION,
                                    _category_code(Category.for_lesion(lesion))),
    ]
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=generate_uid(), identifier=f"{VIEWER_BIDIRECTIONAL}:Lesion {number}"),
        finding_type=codes.LESION,
        algorithm_id=algorithm,
        finding_sites=[hd.sr.FindingSite(codes.BREAST)],
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
            name=codes.REFERENCED_SEGMENT,
            referenced_sop_class_uid=seg.SOPClassUID,
            referenced_sop_instance_uid=seg.SOPInstanceUID,
            referenced_segment_numbers=[segmentation.segment_numbers[lesion.lesion_class]],
            relationship_type=hd.sr.RelationshipTypeValues.CONTAINS)
        container.ContentSequence.append(reference)
    return group


def _image_group(image: AnalysedImage, algorithm: hd.sr.AlgorithmIdentification
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
            hd.sr.Measurement(codes.NORMAL_PROBABILITY, round(probabilities.normal, 4),
                              codes.UCUM_NO_UNITS, referenced_coordinates=[
                                  hd.sr.CoordinatesForMeasurement(
                                      graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
                                      graphic_data=_frame_outline(image.info.rows,
                                                                  image.info.columns),
                                      source_image=source)]),
            hd.sr.Measurement(codes.BENIGN_PROBABILITY, round(probabilities.benign, 4),
                              codes.UCUM_NO_UNITS),
            hd.sr.Measurement(codes.MALIGNANT_PROBABILITY, round(probabilities.malignant, 4),
                              codes.UCUM_NO_UNITS),
        ]
        if prediction.ood_score is not None:
            measurements.append(hd.sr.Measurement(
                codes.OOD_SCORE, round(prediction.ood_score, 3), codes.UCUM_NO_UNITS))
        for method, agreement in sorted(prediction.saliency.items()):
            measurements.append(hd.sr.Measurement(
                codes.SALIENCY_DICE, round(agreement.dice, 4), codes.UCUM_NO_UNITS,
                method=codes.SALIENCY_METHODS[method]))
            measurements.append(hd.sr.Measurement(
                codes.SALIENCY_MASS_INSIDE, round(agreement.mass_inside, 4),
                codes.UCUM_NO_UNITS,
                method=codes.SALIENCY_METHODS[method]))
        finding = (dcm_codes.SCT.BreastNormal if prediction.predicted_class == "normal"
                   else codes.LESION_TYPES[prediction.predicted_class])
        groups.append(hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(
                uid=generate_uid(), identifier=f"Image {image.info.ref.sop_instance_uid[-12:]}"
                f" frame {frame_number + 1}"),
            algorithm_id=algorithm,
            measurements=measurements,
            qualitative_evaluations=[hd.sr.QualitativeEvaluation(codes.PREDICTED_CLASS,
                                                                 finding)],
            source_images=[hd.sr.SourceImageForMeasurementGroup(
                referenced_sop_class_uid=image.info.ref.sop_class_uid,
                referenced_sop_instance_uid=image.sop_instance_uid,
                referenced_frame_numbers=frame_numbers)],
        ))
    return groups




@dataclass(frozen=True)
class DensityImage:
    """A mammogram the density model read, with its source header."""

    info: ImageInfo
    header: Dataset

    @property
    def reading(self) -> DensityPrediction:
        assert self.info.density is not None
        return self.info.density


def _density_group(image: DensityImage) -> Dataset:
    """One mammogram's breast composition (CID 6000) with its view and laterality, the
    probabilities behind it and where Grad-CAM put its attention."""
    reading = image.reading
    source = hd.sr.SourceImageForRegion(
        referenced_sop_class_uid=image.info.ref.sop_class_uid,
        referenced_sop_instance_uid=image.info.ref.sop_instance_uid)
    outline = [hd.sr.CoordinatesForMeasurement(
        graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
        graphic_data=_frame_outline(image.info.rows, image.info.columns), source_image=source)]
    measurements = [
        hd.sr.Measurement(codes.DENSITY_PROBABILITY[category], round(probability, 4),
                          codes.UCUM_NO_UNITS,
                          referenced_coordinates=outline if number == 0 else None)
        for number, (category, probability) in enumerate(sorted(reading.probabilities.items()))]
    shares = reading.attention
    measurements += [
        hd.sr.Measurement(codes.ATTENTION_ON_TISSUE, round(shares.tissue, 4), codes.UCUM_NO_UNITS,
                          method=codes.SALIENCY_METHODS["gradcam"]),
        hd.sr.Measurement(codes.ATTENTION_ON_ARTIFACTS, round(shares.artifacts, 4),
                          codes.UCUM_NO_UNITS),
        hd.sr.Measurement(codes.ATTENTION_OUTSIDE, round(shares.outside, 4), codes.UCUM_NO_UNITS),
    ]
    if reading.ood_score is not None:
        measurements.append(hd.sr.Measurement(codes.OOD_SCORE, round(reading.ood_score, 3),
                                              codes.UCUM_NO_UNITS))
    evaluations = [hd.sr.QualitativeEvaluation(
        codes.BREAST_COMPOSITION, codes.BREAST_COMPOSITION_VALUES[reading.category])]
    if reading.view in codes.VIEWS:
        evaluations.append(hd.sr.QualitativeEvaluation(codes.IMAGE_VIEW,
                                                       codes.VIEWS[reading.view]))
    if reading.laterality is not None:
        evaluations.append(hd.sr.QualitativeEvaluation(codes.IMAGE_LATERALITY,
                                                       codes.SIDES[reading.laterality]))
    if reading.attention_on_artifact:
        evaluations.append(hd.sr.QualitativeEvaluation(codes.ATTENTION_WARNING,
                                                       codes.ATTENTION_ON_ARTIFACT))
    side = f"{reading.laterality or ''}{reading.view or ''}" or "view"
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=generate_uid(), identifier=f"Breast composition {side} "
            f"{image.info.ref.sop_instance_uid[-12:]}"),
        finding_type=codes.BREAST_COMPOSITION,
        algorithm_id=hd.sr.AlgorithmIdentification(name=reading.model.name,
                                                   version=reading.model.version),
        finding_sites=[hd.sr.FindingSite(
            codes.BREAST, laterality=codes.SIDES.get(reading.laterality or ""))],
        measurements=measurements,
        qualitative_evaluations=evaluations,
        source_images=[hd.sr.SourceImageForMeasurementGroup(
            referenced_sop_class_uid=image.info.ref.sop_class_uid,
            referenced_sop_instance_uid=image.info.ref.sop_instance_uid)],
    )


def _breast_composition_items(summary: BreastDensity) -> list[hd.sr.CodeContentItem]:
    """Per breast and for the study (the denser breast): TID 1500's qualitative evaluations."""
    items = []
    for side, category in (("R", summary.right), ("L", summary.left), (None, summary.study)):
        if category is None:
            continue
        item = hd.sr.CodeContentItem(name=codes.BREAST_COMPOSITION,
                                     value=codes.BREAST_COMPOSITION_VALUES[category],
                                     relationship_type=hd.sr.RelationshipTypeValues.CONTAINS)
        if side is not None:
            item.ContentSequence = hd.sr.ContentSequence([hd.sr.CodeContentItem(
                name=codes.LATERALITY, value=codes.SIDES[side],
                relationship_type=hd.sr.RelationshipTypeValues.HAS_CONCEPT_MOD)])
        items.append(item)
    return items


def build_report(images: Sequence[AnalysedImage], segmentations: Sequence[WrittenSegmentation],
                 narrative: Narrative, equipment: Equipment, plan: SeriesPlan, *,
                 notes: Sequence[str] = (), evidence: Sequence[Dataset] = (),
                 failed: bool = False, density: Sequence[DensityImage] = (),
                 breast_density: BreastDensity | None = None) -> hd.sr.Comprehensive3DSR:
    """The study's TID 1500 report. ``notes``: plain statements for the reader (images not
    analysed, no lesion and so no SEG). ``evidence``: headers of the study's other objects
    (received, not analysed) that the report accounts for. With no analysed image the report
    carries TID 1500's qualitative evaluations instead of its imaging measurements, saying that
    nothing was analysed (or, with ``failed``, that the analysis failed). ``density``: the
    mammograms the density model read, a group each; ``breast_density`` adds each breast's and
    the study's composition as the report's qualitative evaluations."""
    algorithm = hd.sr.AlgorithmIdentification(name=equipment.algorithm_name,
                                               version=equipment.algorithm_version)
    segment_of = {sop: seg for seg in segmentations for sop in seg.source_sop_instance_uids}
    # Lesion groups first: OHIF's SR viewport opens on the first group, and only groups with
    # image coordinates (the lesions') can be drawn.
    groups: list[Dataset] = []
    number = 0
    for image in images:
        for lesion in image.lesions:
            number += 1
            groups.append(_lesion_group(image, lesion, number,
                                        segment_of.get(image.sop_instance_uid), algorithm))
    for image in images:
        groups.extend(_image_group(image, algorithm))
    groups.extend(_density_group(image) for image in density)
    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=generate_uid(entropy_srcs=[DEVICE_UID_ROOT]), name="radlens",
        manufacturer_name=equipment.manufacturer, model_name=equipment.model_name,
        serial_number=equipment.device_serial_number)
    context = hd.sr.ObservationContext(observer_device_context=hd.sr.ObserverContext(
        observer_type=dcm_codes.DCM.Device, observer_identifying_attributes=device))
    if groups:
        procedures = ([codes.ULTRASONOGRAPHY_OF_BREAST] if images or not density else []) + (
            [codes.MAMMOGRAPHY] if density else [])
        report = hd.sr.MeasurementReport(
            observation_context=context,
            procedure_reported=procedures,
            imaging_measurements=groups,
            title=dcm_codes.cid7021.ImagingMeasurementReport,
        )
        root = report[0]
        if breast_density is not None and density:
            evaluations = hd.sr.ContainerContentItem(
                name=codes.QUALITATIVE_EVALUATIONS,
                relationship_type=hd.sr.RelationshipTypeValues.CONTAINS)
            evaluations.ContentSequence = hd.sr.ContentSequence(
                _breast_composition_items(breast_density))
            root.ContentSequence.append(evaluations)
    else:
        root = _report_without_measurements(
            context, codes.ANALYSIS_FAILED if failed else codes.NO_IMAGE_ANALYSED)
    contains = hd.sr.RelationshipTypeValues.CONTAINS
    text_items = [hd.sr.TextContentItem(codes.NARRATIVE, narrative.text[:_UT_LIMIT], contains),
                  hd.sr.TextContentItem(codes.NARRATIVE_AUTHOR, narrative.author_line,
                                        contains)]
    text_items += [hd.sr.TextContentItem(codes.REPORT_NOTE, note[:_UT_LIMIT], contains)
                   for note in notes]
    text_items.append(hd.sr.TextContentItem(codes.NOT_FOR_DIAGNOSTIC_USE,
                                            NOT_FOR_DIAGNOSTIC_USE, contains))
    root.ContentSequence.extend(text_items)
    analysed = {image.sop_instance_uid for image in images} | {
        image.info.ref.sop_instance_uid for image in density}
    others = [h for h in evidence if str(h.SOPInstanceUID) not in analysed]
    ordered, stand_ins = _evidence_order([image.header for image in images]
                                         + [image.header for image in density]
                                         + [seg.dataset for seg in segmentations] + others)
    # The content references only the analysed images and their SEGs, all of them in the
    # evidence by construction: the constructor, which sees only the root, need not search it.
    sr = hd.sr.Comprehensive3DSR(
        evidence=ordered,
        content=_childless(root),
        series_instance_uid=plan.series_instance_uid,
        series_number=plan.series_number,
        sop_instance_uid=generate_uid(),
        instance_number=1,
        manufacturer=equipment.manufacturer,
        is_complete=True,
        is_final=False,
        is_verified=False,
    )
    sr.ContentSequence = root.ContentSequence
    _restore_evidence_classes(sr, stand_ins)
    sr.SeriesDescription = plan.description
    sr.SpecificCharacterSet = "ISO_IR 192"  # UTF-8: narratives say mm², names may be anything
    sr.ManufacturerModelName = equipment.model_name
    sr.SoftwareVersions = equipment.software_versions
    log.info("SR built", extra=kv(sop=sr.SOPInstanceUID, lesions=number,
                                  author=narrative.author))
    return sr


_UT_LIMIT = 10_000


def _childless(root: Dataset) -> Dataset:
    """The root container without its tree, for the document's constructor.

    highdicom's SR constructor deep-copies the whole content tree and parses it back into
    content items to validate it: on a 30-frame clip with a lesion per frame that is most of
    the SR's time, and it grows with the tree. Our tree is built from highdicom's own typed
    items, validated when each was made, so the document is built around the root and the tree
    attached afterwards; the dataset written is the same.
    """
    shell = Dataset()
    for element in root:
        if element.keyword != "ContentSequence":
            shell.add(copy.deepcopy(element))
    shell.ContentSequence = []
    return shell


def _evidence_order(evidence: list[Dataset]) -> tuple[list[Dataset], dict[str, str]]:
    """highdicom copies the patient and study modules from the first evidence item, looked up
    by its SOP class: put an item of a class it knows first. When it knows none (a study of
    retired SOP classes only), the first item goes in as a Secondary Capture stand-in whose
    real class is restored in the evidence afterwards (``_restore_evidence_classes``)."""
    from highdicom._standard_utils import get_sop_class_iod_map  # private: no public twin

    known = get_sop_class_iod_map()
    ordered = sorted(evidence, key=lambda ds: str(ds.SOPClassUID) not in known)
    if not ordered or str(ordered[0].SOPClassUID) in known:
        return ordered, {}
    stand_in = copy.deepcopy(ordered[0])
    stand_in.SOPClassUID = SECONDARY_CAPTURE
    return [stand_in, *ordered[1:]], {str(stand_in.SOPInstanceUID): str(ordered[0].SOPClassUID)}


def _restore_evidence_classes(sr: Dataset, stand_ins: dict[str, str]) -> None:
    for study in sr.get("CurrentRequestedProcedureEvidenceSequence", []):
        for series in study.get("ReferencedSeriesSequence", []):
            for item in series.get("ReferencedSOPSequence", []):
                if str(item.ReferencedSOPInstanceUID) in stand_ins:
                    item.ReferencedSOPClassUID = stand_ins[str(item.ReferencedSOPInstanceUID)]


def _report_without_measurements(context: hd.sr.ObservationContext, outcome: Code
                                 ) -> hd.sr.ContainerContentItem:
    """A TID 1500 root whose content is row 10 (qualitative evaluations) instead of row 6: the
    template asks for at least one of rows 6, 8 and 10, and highdicom builds only row 6."""
    root = hd.sr.ContainerContentItem(name=dcm_codes.cid7021.ImagingMeasurementReport,
                                      template_id="1500")
    root.ContentSequence = hd.sr.ContentSequence()
    root.ContentSequence.extend(hd.sr.LanguageOfContentItemAndDescendants(DEFAULT_LANGUAGE))
    root.ContentSequence.extend(context)
    root.ContentSequence.append(hd.sr.CodeContentItem(
        name=dcm_codes.DCM.ProcedureReported, value=codes.IMAGING_PROCEDURE,
        relationship_type=hd.sr.RelationshipTypeValues.HAS_CONCEPT_MOD))
    evaluations = hd.sr.ContainerContentItem(
        name=codes.QUALITATIVE_EVALUATIONS,
        relationship_type=hd.sr.RelationshipTypeValues.CONTAINS)
    evaluations.ContentSequence = hd.sr.ContentSequence([hd.sr.CodeContentItem(
        name=codes.ANALYSIS_OUTCOME, value=outcome,
        relationship_type=hd.sr.RelationshipTypeValues.CONTAINS)])
    root.ContentSequence.append(evaluations)
    return root


def _category_code(category: Category) -> Code:
    return Code(f"RADL10{category.value}", "99RADLENS",
                f"Category {category.value} ({category.meaning}), AI suggestion"[:64])
