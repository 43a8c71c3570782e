"""The rejection note that retracts a superseded revision (IHE IOCM): a Key Object Selection
document (highdicom) whose title is "Rejected for Quality Reasons" (DCM 113001) and which lists
every object of the earlier revision. A PACS that supports IOCM hides or deletes them; one that
does not keeps the note beside them, where a reader sees which objects were superseded.
"""

from __future__ import annotations

import logging
from pathlib import Path

import highdicom as hd
import pydicom
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import KeyObjectSelectionDocumentStorage, generate_uid

from radlens.dicom_io.writers.common import Equipment, SeriesPlan
from radlens.logs import kv

log = logging.getLogger(__name__)

KEY_OBJECT_SELECTION = str(KeyObjectSelectionDocumentStorage)


def superseded_objects(folder: Path) -> list[Dataset]:
    """The headers of the DICOM objects of an earlier revision's folder (none if it is gone,
    e.g. removed by retention); an earlier rejection note is not itself rejected."""
    if not folder.is_dir():
        return []
    headers = []
    for path in sorted(folder.glob("*.dcm")):
        try:
            header = pydicom.dcmread(path, stop_before_pixels=True)
        except Exception as exc:  # a file that cannot be read cannot be referenced either
            log.warning("superseded object unreadable; not listed in the rejection note",
                        extra=kv(path=str(path), error=str(exc)))
            continue
        if str(header.SOPClassUID) != KEY_OBJECT_SELECTION:
            headers.append(header)
    return headers


def build_rejection_note(superseded: list[Dataset], equipment: Equipment, plan: SeriesPlan,
                         *, revision: int) -> hd.ko.KeyObjectSelectionDocument:
    """The KOS rejecting ``superseded`` (revision ``revision - 1``), in their study."""
    content = hd.ko.KeyObjectSelection(
        document_title=codes.DCM.RejectedForQualityReasons,
        referenced_objects=superseded,
        observer_device_context=hd.sr.ObserverContext(
            observer_type=codes.DCM.Device,
            observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
                uid=generate_uid(entropy_srcs=[equipment.model_name]),
                name=equipment.model_name, manufacturer_name=equipment.manufacturer)),
        description=(f"Superseded by revision {revision} of this study's radlens results: "
                     f"these {len(superseded)} objects of revision {revision - 1} are "
                     "withdrawn.")[:1024],
    )
    return hd.ko.KeyObjectSelectionDocument(
        evidence=superseded, content=content,
        series_instance_uid=plan.series_instance_uid, series_number=plan.series_number,
        sop_instance_uid=generate_uid(), instance_number=1,
        manufacturer=equipment.manufacturer)
