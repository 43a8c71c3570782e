"""A label-map task's part of the TID 1500 report: a measurement group (TID 1501) per label
found, with its area (an image) or volume (a series) and a reference to its SEG segment."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import highdicom as hd
from pydicom.dataset import Dataset
from pydicom.sr.coding import Code
from pydicom.uid import generate_uid

from radlens.dicom_io import codes

if TYPE_CHECKING:
    from radlens.dicom_io.writers.seg import WrittenSegmentation
    from radlens.tasks.base import AnalysedSource
    from radlens.tasks.labelmap import LabelMapReading, LabelMapTask



def label_groups(task: LabelMapTask, sources: list[AnalysedSource], reading: LabelMapReading,
                 segmentation: WrittenSegmentation | None) -> list[Dataset]:
    """One group per label the reading found."""
    from radlens.dicom_io.writers.sr import frame_outline

    definitions = {d.value: d for d in task.label_definitions()}
    algorithm = hd.sr.AlgorithmIdentification(name=reading.model.name,
                                               version=reading.model.version)
    groups = []
    for stat in reading.labels:
        definition = definitions.get(stat.label)
        finding = (Code(definition.code.value, definition.code.scheme, definition.code.meaning)
                   if definition is not None and definition.code is not None else codes.TISSUE)
        # The label's extent on its image: OHIF needs image coordinates on every group of an
        # SR to load any of it (a volume's groups reference its slices instead).
        outline = None
        if len(sources) == 1:
            info = sources[0].info
            outline = [hd.sr.CoordinatesForMeasurement(
                graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
                graphic_data=frame_outline(info.rows, info.columns),
                source_image=hd.sr.SourceImageForRegion(
                    referenced_sop_class_uid=info.ref.sop_class_uid,
                    referenced_sop_instance_uid=info.ref.sop_instance_uid))]
        measurements: list[Any] = []
        if stat.volume_ml is not None:
            measurements.append(hd.sr.Measurement(codes.VOLUME, stat.volume_ml, codes.UCUM_ML))
        elif stat.area_mm2 is not None:
            measurements.append(hd.sr.Measurement(codes.AREA, stat.area_mm2, codes.UCUM_MM2,
                                                  referenced_coordinates=outline))
        else:
            measurements.append(hd.sr.Measurement(codes.AREA, float(stat.pixels),
                                                  codes.UCUM_SQUARE_PIXELS,
                                                  referenced_coordinates=outline))
        group = hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(
                uid=generate_uid(),
                identifier=f"{stat.name} {sources[0].info.ref.sop_instance_uid[-12:]}"[:64]),
            finding_type=finding,
            algorithm_id=algorithm,
            measurements=measurements,
            source_images=[hd.sr.SourceImageForMeasurementGroup(
                referenced_sop_class_uid=source.info.ref.sop_class_uid,
                referenced_sop_instance_uid=source.info.ref.sop_instance_uid)
                for source in sources],
        )
        if segmentation is not None and stat.name in segmentation.segment_numbers:
            seg = segmentation.dataset
            group[0].ContentSequence.append(hd.sr.ImageContentItem(
                name=codes.REFERENCED_SEGMENT,
                referenced_sop_class_uid=seg.SOPClassUID,
                referenced_sop_instance_uid=seg.SOPInstanceUID,
                referenced_segment_numbers=[segmentation.segment_numbers[stat.name]],
                relationship_type=hd.sr.RelationshipTypeValues.CONTAINS))
        groups.append(group)
    return groups
