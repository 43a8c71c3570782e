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

from radlens.tasks.breast_us.dicom import us_dataset
from radlens.tasks.breast_us.phantoms import make_phantom
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
                "name": "ultrasound", "calling_aet": "US01", "modality": "US", "task": "lesions",
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


def test_sighup_reloads_destinations_and_names_what_needs_a_restart(server_factory, tmp_path):
    """The configuration file is read again on SIGHUP: a new destination takes the next
    study's results at once (the sender restarted with it); a changed model setting is named as
    needing a restart; a file that does not load changes nothing."""
    import signal

    first, first_port = _storescp("FIRST", tmp_path / "FIRST")
    second, second_port = _storescp("SECOND", tmp_path / "SECOND")
    try:
        config = tmp_path / "radlens.yaml"

        def write_config(name: str, port: int, extra: str = "") -> None:
            config.write_text(f"destinations:\n  - {{name: {name.lower()}, ae_title: {name}, "
                              f"host: 127.0.0.1, port: {port}}}\noutbox:\n"
                              f"  poll_interval_s: 0.2\n{extra}")

        write_config("FIRST", first_port)
        server = server_factory(RADLENS_MODEL__ENABLED="false")
        server.config_file = config
        server.start()

        def study(number: int) -> Path:
            path = tmp_path / "in" / f"S{number}.dcm"
            path.parent.mkdir(exist_ok=True)
            us_dataset(make_phantom(7, number).image, study_uid=generate_uid(),
                       series_uid=generate_uid(), instance_number=1, spacing_cm=0.02,
                       patient_id="HUP").save_as(path, enforce_file_format=True)
            return path

        # Forwarded files show the destinations at work without the model.
        from tests.helpers import radlens_cli

        env = dict(server.env, RADLENS_CONFIG=str(config))
        assert radlens_cli("forward", str(study(1)), "--to", "first", env=env).returncode == 0
        wait_for(lambda: list((tmp_path / "FIRST").iterdir()), 30, "the first destination")

        write_config("SECOND", second_port, "model:\n  batch_size: 4\n")
        server.process.send_signal(signal.SIGHUP)
        wait_for(lambda: "configuration reloaded" in server.log(), 20, "the reload")
        line = next(x for x in server.log().splitlines() if "configuration reloaded" in x)
        assert "destinations" in line and "model" in line.split("needs_restart", 1)[1]
        assert storescu(server.port, [study(2)]).returncode == 0  # the listeners go on
        assert radlens_cli("forward", str(study(3)), "--to", "second",
                           env=env).returncode == 0
        wait_for(lambda: list((tmp_path / "SECOND").iterdir()), 30, "the new destination")
        assert len(list((tmp_path / "FIRST").iterdir())) == 1

        config.write_text("destinations: [\n")  # broken: nothing changes
        server.process.send_signal(signal.SIGHUP)
        wait_for(lambda: "configuration not reloaded" in server.log(), 20, "the refusal")
        assert server.process.poll() is None
        assert server.stop() == 0
    finally:
        for process in (first, second):
            process.terminate()
            process.wait(timeout=10)
