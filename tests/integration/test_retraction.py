"""A study analysed again withdraws its earlier results the standard way (IHE IOCM): the
destination that got revision 1 receives revision 2 and then a Key Object Selection titled
"Rejected for Quality Reasons" that lists every object of revision 1, valid for dciodvfy."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pydicom
from pydicom.uid import KeyObjectSelectionDocumentStorage, generate_uid

from radlens.tasks.breast_us.dicom import us_dataset
from radlens.tasks.breast_us.phantoms import make_phantom
from tests.helpers import require_tool, storescu, wait_for


def _image(folder: Path, study: str, series: str, number: int) -> Path:
    ds = us_dataset(make_phantom(123, number, label="malignant").image, study_uid=study,
                    series_uid=series, instance_number=number, spacing_cm=0.02,
                    patient_id="IOCM")
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"IM{number}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def _delivered(server) -> bool:
    rows = server.query("SELECT state FROM outbox")
    return bool(rows) and all(r["state"] == "sent" for r in rows)


def test_a_new_revision_withdraws_the_old_one_where_it_went(server_factory, archive, tmp_path):
    server = server_factory(RADLENS_OUTBOX__POLL_INTERVAL_S="0.2",
                            RADLENS_DESTINATIONS=json.dumps([{
                                "name": "archive", "ae_title": "ARCHIVE",
                                "host": "127.0.0.1", "port": archive.port}])).start()
    study, series = generate_uid(), generate_uid()
    assert storescu(server.port, [_image(tmp_path / "in", study, series, 1)]).returncode == 0
    wait_for(lambda: len(server.jobs_done()) == 1 and _delivered(server), 120,
             "revision 1 to be delivered")
    first = {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID
             for p in (server.data_dir / "results" / study / "dicom" / "revision-1").glob("*")}
    assert len(first) >= 4

    # A late instance of the same study: revision 2, and the note withdrawing revision 1.
    assert storescu(server.port, [_image(tmp_path / "in", study, series, 2)]).returncode == 0
    wait_for(lambda: len(server.jobs_done()) == 2 and _delivered(server), 120,
             "revision 2 to be delivered")
    received = [pydicom.dcmread(p) for p in archive.files()]
    (note,) = [ds for ds in received if ds.SOPClassUID == KeyObjectSelectionDocumentStorage]
    title = note.ConceptNameCodeSequence[0]
    assert (title.CodeValue, title.CodingSchemeDesignator) == ("113001", "DCM")
    assert title.CodeMeaning == "Rejected for Quality Reasons"
    listed = {item.ReferencedSOPInstanceUID
              for series_item in note.CurrentRequestedProcedureEvidenceSequence[0]
              .ReferencedSeriesSequence for item in series_item.ReferencedSOPSequence}
    assert listed == first
    assert note.StudyInstanceUID == study
    revision_2 = {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID
                  for p in (server.data_dir / "results" / study / "dicom" / "revision-2")
                  .glob("*")} - {note.SOPInstanceUID}
    assert not listed & revision_2  # the new revision is not withdrawn
    # Sent after the new revision's objects.
    order = server.query("SELECT sop_instance_uid FROM outbox ORDER BY id")
    assert order[-1]["sop_instance_uid"] == note.SOPInstanceUID
    path = next(p for p in archive.files()
                if pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID ==
                note.SOPInstanceUID)
    checked = subprocess.run([require_tool("dciodvfy"), str(path)], capture_output=True,
                             text=True, timeout=60)
    errors = [line for line in (checked.stdout + checked.stderr).splitlines() if "Error" in line]
    assert errors == [], errors
    assert server.stop() == 0
