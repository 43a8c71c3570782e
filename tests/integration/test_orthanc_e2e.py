"""End to end with a real PACS: a phantom study pushed with storescu to `radlens serve` comes
back into Orthanc with its SEG, SR, Parametric Map and overlay series in the same study, each
referencing the source; with Orthanc down at first and the agent restarted in between, the
objects still arrive once it comes up."""

from __future__ import annotations

import json

import pydicom
import pytest

from radlens.demo.orthanc import Orthanc
from tests.helpers import radlens_cli, storescu, wait_for

OUTPUT_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.66.4": "SEG",
    "1.2.840.10008.5.1.4.1.1.88.34": "SR",
    "1.2.840.10008.5.1.4.1.1.30": "PM",
    "1.2.840.10008.5.1.4.1.1.7": "SC",
    "1.2.840.10008.5.1.4.1.1.104.1": "PDF",
}


@pytest.fixture
def orthanc(tmp_path):
    server = Orthanc(tmp_path / "orthanc")
    yield server
    server.stop()


@pytest.fixture
def phantom_study(tmp_path):
    made = radlens_cli("phantoms", "--out", str(tmp_path / "ph"), "--n", "12", "--seed", "31",
                       "--dicom")
    assert made.returncode == 0, made.stderr
    import csv

    with open(tmp_path / "ph" / "labels.csv") as handle:
        rows = [r for r in csv.DictReader(handle) if r["label"] != "normal"]
    rows.sort(key=lambda r: -int(r["lesion_pixels"]))
    return tmp_path / "ph" / "dicom" / rows[0]["case_id"] / "IM0001.dcm"


def _agent(server_factory, orthanc: Orthanc):
    return server_factory(
        RADLENS_DESTINATIONS=json.dumps([{"name": "pacs", "ae_title": orthanc.aet,
                                          "host": "127.0.0.1", "port": orthanc.dicom_port}]),
        RADLENS_OUTBOX__POLL_INTERVAL_S="0.3",
        RADLENS_OUTBOX__RETRY_INITIAL_S="0.5",
        RADLENS_OUTBOX__RETRY_MAX_S="2",
    )


def _outputs_in_orthanc(orthanc: Orthanc, study_uid: str) -> dict[str, list[dict]]:
    """Each output instance in Orthanc's copy of the study, by kind, as simplified tags."""
    study = orthanc.find_study(study_uid)
    found: dict[str, list[dict]] = {}
    if study is None:
        return found
    for instance in orthanc.get(f"/studies/{study}/instances"):
        tags = orthanc.instance_tags(instance["ID"])
        kind = OUTPUT_CLASSES.get(tags.get("SOPClassUID", ""))
        if kind:
            found.setdefault(kind, []).append({"id": instance["ID"], **tags})
    return found


def _expect_all_kinds(orthanc: Orthanc, study_uid: str) -> dict[str, list[dict]]:
    wait_for(lambda: set(_outputs_in_orthanc(orthanc, study_uid)) == set(OUTPUT_CLASSES.values()),
             120, "SEG, SR, map, overlay and PDF to reach Orthanc")
    return _outputs_in_orthanc(orthanc, study_uid)


def _references(orthanc: Orthanc, instance_id: str) -> set[str]:
    """Every SOP Instance UID an object references, read from Orthanc's own copy."""
    request = orthanc.url + f"/instances/{instance_id}/file"
    import io
    import urllib.request

    with urllib.request.urlopen(request, timeout=30) as response:
        ds = pydicom.dcmread(io.BytesIO(response.read()))
    found: set[str] = set()

    def walk(dataset: pydicom.Dataset) -> None:
        for element in dataset:
            if element.keyword == "ReferencedSOPInstanceUID":
                found.add(str(element.value))
            elif element.VR == "SQ":
                for item in element.value:
                    walk(item)

    walk(ds)
    return found


def test_results_reach_orthanc_in_the_source_study(server_factory, orthanc, phantom_study):
    orthanc.start()
    agent = _agent(server_factory, orthanc).start()
    source = pydicom.dcmread(phantom_study, stop_before_pixels=True)
    # The modality sends to the PACS and to radlens; radlens adds its series to the study.
    to_pacs = storescu(orthanc.dicom_port, [phantom_study], called_aet=orthanc.aet)
    assert to_pacs.returncode == 0, to_pacs.stderr
    sent = storescu(agent.port, [phantom_study])
    assert sent.returncode == 0, sent.stderr
    outputs = _expect_all_kinds(orthanc, source.StudyInstanceUID)
    series = {kind: {item["SeriesInstanceUID"] for item in items}
              for kind, items in outputs.items()}
    assert all(len(uids) == 1 for uids in series.values())  # each kind in its own series
    all_series = set().union(*series.values())
    assert len(all_series) == 5 and source.SeriesInstanceUID not in all_series
    for kind, items in outputs.items():
        for item in items:
            assert item["StudyInstanceUID"] == source.StudyInstanceUID
            assert source.SOPInstanceUID in _references(orthanc, item["id"]), kind
    seg_uid = outputs["SEG"][0]["SOPInstanceUID"]
    assert seg_uid in _references(orthanc, outputs["SR"][0]["id"])  # lesion -> segment
    # The same study through DICOMweb (what OHIF reads).
    dicomweb = orthanc.get(f"/dicom-web/studies/{source.StudyInstanceUID}/series")
    modalities = sorted(s["00080060"]["Value"][0] for s in dicomweb)
    assert set(modalities) == {"US", "SEG", "SR", "OT", "DOC"} and len(modalities) == 6
    rows = agent.query("SELECT state FROM outbox")
    assert len(rows) == 5 and {r["state"] for r in rows} == {"sent"}


def test_results_arrive_once_orthanc_comes_up_across_an_agent_restart(
        server_factory, orthanc, phantom_study):
    agent = _agent(server_factory, orthanc).start()
    source = pydicom.dcmread(phantom_study, stop_before_pixels=True)
    sent = storescu(agent.port, [phantom_study])
    assert sent.returncode == 0, sent.stderr
    wait_for(lambda: agent.query("SELECT COUNT(*) FROM outbox WHERE attempts >= 1")[0][0] == 5,
             120, "the job's five outputs to fail their first delivery")
    assert {r["state"] for r in agent.query("SELECT state FROM outbox")} == {"pending"}
    assert agent.stop() == 0
    orthanc.start()
    agent.start()
    _expect_all_kinds(orthanc, source.StudyInstanceUID)
    wait_for(lambda: {r["state"] for r in agent.query("SELECT state FROM outbox")} == {"sent"},
             60, "the outbox to mark everything sent")
