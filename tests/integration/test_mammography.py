"""Mammography end to end: storescu sends a combined 2D and 3D mammography study (four views
and their four tomosynthesis volumes) and a breast ultrasound study to one agent; each image
goes to the model built for it (the tomosynthesis volumes to none, with the reason), and the MG
study comes back to a storescp archive with its breast composition in the SR (read with
dsrdump), a Grad-CAM overlay per view and the PDF, every object dciodvfy-clean."""

from __future__ import annotations

import csv
import json
import subprocess
from pathlib import Path

import pydicom

from radlens.tasks.mammo_density import codes
from tests.helpers import dciodvfy_errors, frames_of, radlens_cli, require_tool, storescu, wait_for

SEED = 11  # phantom patients whose truth the shipped model gets right with margin
# The default: this patient's views (0.53 to 0.78 of their Grad-CAM on tissue) fall on both
# sides of it, so some carry the attention-on-artifact warning and others do not.
LOW_TISSUE_SHARE = 0.6


def _phantoms(root: Path) -> tuple[list[Path], dict[str, str], list[Path]]:
    made = radlens_cli("phantoms", "--task", "mammo_density", "--out", str(root / "mg"), "--n", "1",
                       "--seed", str(SEED), "--size", "256", "--dicom", "--tomosynthesis")
    assert made.returncode == 0, made.stderr
    mg = sorted((root / "mg" / "dicom").glob("*/*.dcm"))
    with open(root / "mg" / "labels.csv") as handle:
        truth = {row["laterality"] + row["view"]: row["density"] for row in csv.DictReader(handle)}
    made = radlens_cli("phantoms", "--out", str(root / "us"), "--n", "1", "--seed", "7",
                       "--dicom")
    assert made.returncode == 0, made.stderr
    us = sorted((root / "us" / "dicom").glob("*/IM0001.dcm"))
    return mg, truth, us


def _study_uid(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).StudyInstanceUID)


def test_one_agent_reads_mammograms_for_density_and_ultrasound_for_lesions(
        server_factory, archive, tmp_path):
    mg, truth, us = _phantoms(tmp_path)
    assert len(mg) == 8 and len(us) == 1
    volumes = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID)
               for p in mg if p.stem.endswith("_TOMO")}
    assert len(volumes) == 4
    server = server_factory(RADLENS_DENSITY__ENABLED="true", RADLENS_DESTINATIONS=json.dumps([{
        "name": "archive", "ae_title": "ARCHIVE", "host": "127.0.0.1", "port": archive.port}]),
        RADLENS_OUTBOX__POLL_INTERVAL_S="0.2",
        RADLENS_DENSITY__LOW_TISSUE_SHARE=str(LOW_TISSUE_SHARE)).start()
    for files in (mg, us):
        # -R: propose the files' own SOP classes (storescu's default list lacks tomosynthesis)
        sent = storescu(server.port, files, extra=["-R"])
        assert sent.returncode == 0 and "Failed" not in sent.stderr, sent.stderr
    wait_for(lambda: len(server.jobs_done()) == 2, 180, "both studies to be processed")
    assert {row["state"] for row in server.jobs_done()} == {"done"}

    # Routing: the density model read every 2D mammogram, no model the tomosynthesis volumes
    # (outside every scope), the lesion model the ultrasound.
    mammo = server.findings(_study_uid(mg[0]))
    assert len(mammo["images"]) == 8
    refused = [image for image in mammo["images"] if image["ref"]["sop_instance_uid"] in volumes]
    assert {image["not_analysed"] for image in refused} == {
        "outside the model's scope: SOP class Breast Tomosynthesis Image Storage"}
    assert all(_density(image) is None and image["frames"] == 6 for image in refused)
    for image in (image for image in mammo["images"] if image not in refused):
        reading = _density(image)
        assert image["route"] == "body part BREAST is in scope" and frames_of(image) == []
        side = reading["laterality"] + reading["view"]
        assert reading["category"] == truth[side], (side, reading["probabilities"])
        assert reading["model"]["name"] == "radlens-density"
        assert abs(sum(reading["attention"].values()) - 1) < 0.01
        assert reading["attention_on_artifact"] == (reading["attention"]["tissue"]
                                                    < LOW_TISSUE_SHARE)
    flagged = sum(_density(image)["attention_on_artifact"] for image in mammo["images"]
                  if _density(image))
    assert 0 < flagged < 4, "this patient's views should fall on both sides of the threshold"
    summary = mammo["summaries"]["mammo_density"]
    order = "ABCD"
    expected_left = max((truth["LCC"], truth["LMLO"]), key=order.index)
    assert summary["study"] == max(summary["left"], summary["right"], key=order.index)
    assert summary["left"] in (truth["LCC"], truth["LMLO"]) and summary["images"] == 4
    assert order.index(summary["study"]) >= order.index(expected_left)
    assert summary["attention_warnings"] == flagged
    ultrasound = server.findings(_study_uid(us[0]))
    (image,) = ultrasound["images"]
    assert frames_of(image) and _density(image) is None
    assert "mammo_density" not in ultrasound["summaries"]

    # What came back for the MG study: SR, a Grad-CAM overlay per view, the PDF; no SEG.
    wait_for(lambda: server.query("SELECT COUNT(*) FROM outbox WHERE state != 'sent'")[0][0]
             == 0 and server.query("SELECT COUNT(*) FROM outbox")[0][0] > 0, 60,
             "every output to reach the archive")
    returned = [path for path in archive.files() if _study_uid(path) == _study_uid(mg[0])]
    modalities = sorted(str(pydicom.dcmread(p, stop_before_pixels=True).Modality)
                        for p in returned)
    assert modalities == ["DOC", "OT", "OT", "OT", "OT", "SR"], modalities
    for path in returned:
        errors = dciodvfy_errors(path)
        assert errors == [], (path.name, errors)
    overlays = [pydicom.dcmread(p, stop_before_pixels=True) for p in returned
                if pydicom.dcmread(p, stop_before_pixels=True).Modality == "OT"]
    assert sorted(str(o.Laterality) for o in overlays) == ["L", "L", "R", "R"]
    assert all("Grad-CAM of the breast density model" in o.ImageComments for o in overlays)

    (sr,) = [p for p in returned if pydicom.dcmread(p, stop_before_pixels=True).Modality == "SR"]
    tree = subprocess.run([require_tool("dsrdump"), "+U8", "+Pl", "+Pc", str(sr)],
                          capture_output=True, text=True, timeout=60).stdout
    study_code = codes.BREAST_COMPOSITION_VALUES[summary["study"]]
    assert '(71651007,SCT,"Mammography")' in tree
    # the finding and the category of each view, then each breast's and the study's
    assert tree.count('(129715009,SCT,"Breast composition")') == 4 * 2 + 3
    assert f'({study_code.value},SCT,"{study_code.meaning}")' in tree
    assert tree.count('CODE:(111031,DCM,"Image View")=(399162004,SCT,"cranio-caudal")') == 2
    assert tree.count('(399368009,SCT,"medio-lateral oblique")') == 2
    assert tree.count('CODE:(111027,DCM,"Image Laterality")=(7771000,SCT,"Left")') == 2
    assert tree.count('CODE:(111027,DCM,"Image Laterality")=(24028007,SCT,"Right")') == 2
    assert "Grad-CAM share on breast tissue" in tree
    assert tree.count("not analysed: outside the model's scope: SOP class Breast "
                      "Tomosynthesis Image Storage.") == 4  # the SR accounts for the volumes
    assert tree.count('=(RADL074,99RADLENS,"Attention on artifact")') == flagged
    assert tree.count(": attention-on-artifact warning.") == flagged  # the SR's notes
    assert f"Attention-on-artifact warning on {flagged} mammogram(s)" in " ".join(tree.split())
    assert f"Study density category: {summary['study']}" in " ".join(tree.split())

    pdf = server.data_dir / "results" / _study_uid(mg[0]) / "report.pdf"
    text = subprocess.run(["pdftotext", str(pdf), "-"], capture_output=True, text=True,
                          timeout=60).stdout
    assert f"Breast density: study {summary['study']}" in text
    for view in ("R CC", "L CC", "R MLO", "L MLO"):
        assert f"{view}: " in text
    assert text.count("attention on artifacts") >= flagged  # the table and the figures
    # Both SR and PDF say what the model was trained on, from its card.
    assert "Trained on synthetic phantoms only" in " ".join(tree.split())
    assert "Trained on synthetic phantoms only" in " ".join(text.split())


def _density(image: dict) -> dict | None:
    """The breast density task's reading of an image in findings.json, if it has one."""
    readings = [a for a in image.get("analyses", []) if a["task"] == "mammo_density"]
    assert len(readings) <= 1
    return readings[0] if readings else None


def test_real_files_relabelled_as_mammograms_get_no_density(tmp_path):
    """pydicom's CT, MR and chest and extremity radiographs, their headers rewritten to say MG
    BREAST: the 64 x 64 MR slice is outside the density model's image geometry, and routing
    sends the rest to the model, which must state no category for any of them (a CT slice once
    passed its out-of-distribution score). Each study still ends with an SR that dciodvfy
    accepts."""
    from pydicom.data import get_testdata_file

    sources = tmp_path / "disguised"
    sources.mkdir()
    for name in ("CT_small.dcm", "MR_small.dcm", "RG1_UNCR.dcm", "RG3_UNCR.dcm"):
        ds = pydicom.dcmread(get_testdata_file(name))
        ds.Modality, ds.BodyPartExamined = "MG", "BREAST"
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.2"
        ds.save_as(sources / name)
    out = tmp_path / "out"
    processed = radlens_cli("process", str(sources), "--out", str(out), timeout=300)
    assert processed.returncode == 0, processed.stderr
    images = [image for path in (out / "results").glob("*/findings.json")
              for image in json.loads(path.read_text())["images"]]
    assert len(images) == 4
    for image in images:
        assert _density(image) is None
        if image["rows"] == 64:  # MR_small
            assert image["not_analysed"] == ("outside the model's scope: matrix 64x64 (the "
                                             "model reads 96 to 6000 pixels a side)")
            continue
        assert image["route"] == "body part BREAST is in scope"
        assert image["not_analysed"].startswith(("not like a mammogram: ",
                                                 "the density model abstains: "))
    reports = sorted(out.glob("results/*/dicom/revision-1/SR_*.dcm"))
    assert len(reports) == len(list((out / "results").iterdir()))
    for report in reports:
        assert dciodvfy_errors(report) == [], report.name
