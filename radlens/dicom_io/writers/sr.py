"""TID 1500 measurement report (Comprehensive 3D SR, highdicom) of a study's findings.

Each task contributes its measurement groups (TID 1501), qualitative evaluations and the
procedures it reports (``radlens.tasks``); this module assembles them into one document with
the observation context, the evidence of every object the study sent, the narrative, its author,
the processing notes and a not-for-diagnostic-use statement.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence

import highdicom as hd
import numpy as np
from highdicom.sr.templates import DEFAULT_LANGUAGE
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes as dcm_codes
from pydicom.sr.coding import Code
from pydicom.uid import generate_uid

from radlens.dicom_io import codes
from radlens.dicom_io.writers.common import NOT_FOR_DIAGNOSTIC_USE, Equipment, SeriesPlan
from radlens.dicom_io.writers.seg import WrittenSegmentation
from radlens.findings import ImageInfo
from radlens.logs import kv
from radlens.reporting.narrative import Narrative
from radlens.tasks.base import SrContent

log = logging.getLogger(__name__)

DEVICE_UID_ROOT = "radlens device"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"


def frame_outline(rows: int, columns: int) -> np.ndarray:
    """The frame's border through the outer pixel centres, closed, as (column, row)."""
    corners = [(0.5, 0.5), (columns - 0.5, 0.5), (columns - 0.5, rows - 0.5),
               (0.5, rows - 0.5), (0.5, 0.5)]
    return np.array(corners, dtype=np.float32)


def whole_image(info: ImageInfo) -> list[hd.sr.CoordinatesForMeasurement]:
    """The frame outline of a single-frame image as the region a whole-image measurement
    (a probability, a category) was made on."""
    source = hd.sr.SourceImageForRegion(
        referenced_sop_class_uid=info.ref.sop_class_uid,
        referenced_sop_instance_uid=info.ref.sop_instance_uid)
    return [hd.sr.CoordinatesForMeasurement(
        graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
        graphic_data=frame_outline(info.rows, info.columns), source_image=source)]


def build_report(contents: Sequence[SrContent], segmentations: Sequence[WrittenSegmentation],
                 narrative: Narrative, equipment: Equipment, plan: SeriesPlan, *,
                 notes: Sequence[str] = (), evidence: Sequence[Dataset] = (),
                 failed: bool = False) -> hd.sr.Comprehensive3DSR:
    """The study's TID 1500 report, assembled from each task's content (its measurement
    groups, study-level qualitative evaluations and procedures), in the tasks' order: OHIF's SR
    viewport opens on the first group, and the first task puts the groups it can draw first.
    ``notes``: plain statements for the reader (images not analysed, and why an output is
    missing). ``evidence``: headers of the study's other objects (received, not analysed) that
    the report accounts for. With no group the report carries TID 1500's qualitative
    evaluations instead of its imaging measurements, saying that nothing was analysed (or, with
    ``failed``, that the analysis failed)."""
    groups = [group for content in contents for group in content.groups]
    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=generate_uid(entropy_srcs=[DEVICE_UID_ROOT]), name="radlens",
        manufacturer_name=equipment.manufacturer, model_name=equipment.model_name,
        serial_number=equipment.device_serial_number)
    context = hd.sr.ObservationContext(observer_device_context=hd.sr.ObserverContext(
        observer_type=dcm_codes.DCM.Device, observer_identifying_attributes=device))
    if groups:
        procedures = list({(code.value, code.scheme_designator): code for content in contents
                           for code in content.procedures}.values()) or [codes.IMAGING_PROCEDURE]
        report = hd.sr.MeasurementReport(
            observation_context=context,
            procedure_reported=procedures,
            imaging_measurements=groups,
            title=dcm_codes.cid7021.ImagingMeasurementReport,
        )
        root = report[0]
        evaluation_items = [item for content in contents for item in content.evaluations]
        if evaluation_items:
            evaluations = hd.sr.ContainerContentItem(
                name=codes.QUALITATIVE_EVALUATIONS,
                relationship_type=hd.sr.RelationshipTypeValues.CONTAINS)
            evaluations.ContentSequence = hd.sr.ContentSequence(evaluation_items)
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
    referenced = [header for content in contents for header in content.referenced]
    analysed = {str(header.SOPInstanceUID) for header in referenced}
    others = [h for h in evidence if str(h.SOPInstanceUID) not in analysed]
    ordered, stand_ins = _evidence_order(referenced + [seg.dataset for seg in segmentations]
                                         + others)
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
    log.info("SR built", extra=kv(sop=sr.SOPInstanceUID, groups=len(groups),
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
