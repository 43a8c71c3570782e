"""Output routing: a delivery rule chooses destinations on the study's source (calling AE
title, modality), each destination gets only the kinds of output it takes (results by kind,
and the received instances with "sources"), "sender" is the calling AE's own return address,
and a study no rule matches goes nowhere with delivery.unmatched: none. Real storescp peers."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pydicom
from pydicom.uid import (
    Comprehensive3DSRStorage,
    EncapsulatedPDFStorage,
    SegmentationStorage,
    UltrasoundImageStorage,
    generate_uid,
)

from radlens.dicom_io.synthetic import us_dataset
from radlens.models.phantoms import make_phantom
from tests.helpers import free_port, port_open, require_tool, storescu, wait_for


def _storescp(ae_title: str, folder: Path) -> tuple[subprocess.Popen, int]:
    port = free_port()
    folder.mkdir(parents=True)
    process = subprocess.Popen([require_tool("storescp"), "-aet", ae_title, "+xa", "-od",
                                str(folder), str(port)], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    wait_for(lambda: port_open(port), 20, f"{ae_title} to listen")
    return process, port


def _classes(folder: Path) -> set[str]:
    return {str(pydicom.dcmread(p, stop_before_pixels=True).SOPClassUID)
            for p in folder.iterdir()}


def test_rules_and_output_kinds_choose_what_goes_where(server_factory, tmp_path):
    peers = {name: _storescp(name, tmp_path / name) for name in ("PACS", "ARCHIVE", "US01")}
    try:
        server = server_factory(
            RADLENS_OUTBOX__POLL_INTERVAL_S="0.2",
            RADLENS_DESTINATIONS=json.dumps([
                {"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1",
                 "port": peers["PACS"][1], "outputs": ["seg", "sr", "rejection"]},
                {"name": "archive", "ae_title": "ARCHIVE", "host": "127.0.0.1",
                 "port": peers["ARCHIVE"][1], "outputs": ["pdf", "sources"]}]),
            RADLENS_DICOM__PEERS=json.dumps([{"ae_title": "US01", "return_host": "127.0.0.1",
                                              "return_port": peers["US01"][1]}]),
            RADLENS_DELIVERY__RULES=json.dumps([{
                "name": "ultrasound", "calling_aet": "US01", "modality": "US",
                "destinations": ["pacs", "archive", "sender"]}]),
            RADLENS_DELIVERY__UNMATCHED="none").start()
        study = generate_uid()
        source = tmp_path / "in" / "IM1.dcm"
        source.parent.mkdir()
        us_dataset(make_phantom(123, 1, label="malignant").image, study_uid=study,
                   series_uid=generate_uid(), instance_number=1, spacing_cm=0.02,
                   patient_id="ROUTE").save_as(source, enforce_file_format=True)
        assert storescu(server.port, [source], calling_aet="US01").returncode == 0
        other = tmp_path / "in" / "IM2.dcm"  # from an AE no rule names
        us_dataset(make_phantom(123, 2, label="benign").image, study_uid=generate_uid(),
                   series_uid=generate_uid(), instance_number=1, spacing_cm=0.02,
                   patient_id="ROUTE").save_as(other, enforce_file_format=True)
        assert storescu(server.port, [other], calling_aet="CT01").returncode == 0
        wait_for(lambda: len(server.jobs_done()) == 2, 120, "both studies to be processed")
        wait_for(lambda: all(r["state"] == "sent" for r in server.query(
            "SELECT state FROM outbox")), 60, "the deliveries")

        assert _classes(tmp_path / "PACS") == {SegmentationStorage, Comprehensive3DSRStorage}
        assert _classes(tmp_path / "ARCHIVE") == {EncapsulatedPDFStorage,
                                                   UltrasoundImageStorage}
        forwarded = next(p for p in (tmp_path / "ARCHIVE").iterdir()
                         if "US" in pydicom.dcmread(p, stop_before_pixels=True).Modality)
        assert pydicom.dcmread(forwarded).PixelData == pydicom.dcmread(source).PixelData
        back = _classes(tmp_path / "US01")  # the sender's return address: every result kind
        assert {SegmentationStorage, Comprehensive3DSRStorage, EncapsulatedPDFStorage} <= back
        assert len(back) >= 4
        rows = server.query("SELECT DISTINCT destination FROM outbox")
        assert {r["destination"] for r in rows} == {"pacs", "archive", "sender-US01"}
        studies = {pydicom.dcmread(p, stop_before_pixels=True).StudyInstanceUID
                   for name in ("PACS", "ARCHIVE", "US01")
                   for p in (tmp_path / name).iterdir()}
        assert studies == {study}  # the unmatched study went nowhere
        assert server.stop() == 0
    finally:
        for process, _ in peers.values():
            process.terminate()
            process.wait(timeout=10)
