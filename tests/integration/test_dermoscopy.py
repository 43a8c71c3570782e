"""The dermoscopy task end to end, small: ``radlens train|evaluate --task dermoscopy`` (phantoms
in; a sealed weights folder with its card, calibration, OOD threshold, split, held-out test
and the ablation without alignment out; an evaluation report in the published tables'
terms), ``radlens process`` with the task on (phantom photographs read, relabelled corpus
images refused), and storescu to the agent to a storescp (SEG, SR, overlay and PDF back,
dciodvfy-clean). The figures of so short a training mean nothing; what is asserted is that
each is there and consistent."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_files

from radlens.tasks.dermoscopy.scope import VL_PHOTOGRAPHIC
from tests.helpers import (
    dciodvfy_errors,
    radlens_cli,
    require_tool,
    storescu_by_syntax,
    train_small_dermoscopy_model,
    wait_for,
)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return train_small_dermoscopy_model(tmp_path_factory.mktemp("dermoscopy"), "--ablation")


def test_train_and_evaluate_write_what_the_card_and_report_promise(trained, tmp_path):
    data, model, trained = trained
    report = tmp_path / "eval"
    assert trained.returncode == 0, trained.stderr
    assert "trained the dermoscopy model on 48 images" in trained.stdout
    assert "without alignment:" in trained.stdout
    card = json.loads((model / "card.json").read_text())
    assert card["task"] == "dermoscopy" and card["classes"] == ["nevus", "melanoma"]
    assert card["calibration"]["temperature"] > 0 and card["ood"]["threshold"] > 0
    assert card["provenance"]["split"] == "split.json" and (model / "split.json").is_file()
    assert set(card["features"]["cut_points"]) == {"asymmetry", "border", "colour",
                                                   "diameter_mm"}
    test = card["test"]["classification"]
    assert sum(map(sum, test["confusion"])) == test["cases"] > 0
    assert card["ablation"]["without_alignment"]["classification"]["cases"] == test["cases"]
    for name in ("model.pt", "ood.npz", "curves.png", "metrics.json", "test/report.md",
                 "test/alignment.png", "test/reliability.png"):
        assert (model / name).is_file(), name
    assert (model / "test" / "alignment.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert radlens_cli("models", "verify", str(model)).returncode == 0

    evaluated = radlens_cli("evaluate", "--task", "dermoscopy", "--data", str(data),
                            "--model", str(model), "--out", str(report), timeout=300)
    assert evaluated.returncode == 0, evaluated.stderr
    figures = json.loads((report / "report.json").read_text())
    assert figures["classification"]["cases"] == 48
    assert figures["segmentation"]["all"]["cases"] == 48
    assert set(figures["confounders"]) <= {"hair", "ruler", "ink", "bubbles", "specular",
                                           "vignette"}
    text = (report / "report.md").read_text()
    assert figures["descriptors"]["cases"] == 48
    assert 0.0 <= figures["descriptors"]["precision_at_3"] <= 1.0
    for part in ("sensitivity at specificity 0.80", "refined Dice", "positive pairs",
                 "precision at 3", "Calibration of the melanoma probability"):
        assert part in text, part


def test_a_folder_without_masks_is_refused_with_the_case_named(tmp_path):
    data = tmp_path / "data"
    assert radlens_cli("phantoms", "--task", "dermoscopy", "--out", str(data), "--n", "6",
                       "--size", "64").returncode == 0
    shutil.rmtree(data / "masks")
    trained = radlens_cli("train", "--task", "dermoscopy", "--data", str(data), "--out",
                          str(tmp_path / "model"), "--epochs", "1", "--device", "cpu")
    assert trained.returncode == 1
    assert "no mask of case" in trained.stderr and "D000" in trained.stderr
    assert not (tmp_path / "model" / "model.pt").exists()


def _relabelled(name: str, folder: Path) -> Path:
    """A corpus colour image sent as a dermoscopic photograph (VL Photographic, XC, SKIN)."""
    source = next(Path(p) for p in get_testdata_files(name) if Path(p).name == name)
    ds = pydicom.dcmread(source)
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = VL_PHOTOGRAPHIC
    ds.Modality, ds.BodyPartExamined = "XC", "SKIN"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    ds.save_as(path)
    return path


def test_a_dermoscopy_study_comes_back_and_what_is_not_one_is_refused(
        trained, server_factory, archive, tmp_path):
    """storescu sends two phantom photographs (a Dermoscopic Photography Image with Pixel
    Spacing, a VL Photographic Image without) and three colour images of pydicom's corpora
    relabelled as dermoscopy, each its own study, to the agent with the task on. Each
    photograph gets a reading whose numbers come from its measured mask (a diameter only
    where the spacing is known) and comes back to a storescp as SEG, SR, Grad-CAM overlay
    and PDF, every object dciodvfy-clean, the SR read with dsrdump; each relabelled image is
    refused by the plausibility check, with why. The first photograph's lesion is then sent
    again, six months later: its reading, SR and narrative give the change since the first
    visit with both dates, and the state keeps the patient only as a salted key."""
    _, model, result = trained
    assert result.returncode == 0, result.stderr
    made = radlens_cli("phantoms", "--task", "dermoscopy", "--out", str(tmp_path / "p"),
                       "--n", "24", "--size", "96", "--seed", "21", "--dicom", "--visits", "2")
    assert made.returncode == 0, made.stderr
    chosen: dict[tuple[str, bool], Path] = {}
    for path in sorted((tmp_path / "p" / "dicom").glob("*/*.dcm")):
        if "_V2" in path.stem:
            continue
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        chosen.setdefault((str(ds.Modality), "PixelSpacing" in ds), path)
    photographs = [chosen[("DMS", True)], chosen[("XC", False)]]
    (follow_up,) = (tmp_path / "p" / "dicom").glob(f"*/{photographs[0].stem}_V2.dcm")
    corpus = [_relabelled(name, tmp_path / "corpus")
              for name in ("SC_rgb_rle.dcm", "US1_UNCR.dcm", "SC_rgb_jpeg_dcmd.dcm")]
    server = server_factory(
        RADLENS_DERMOSCOPY__ENABLED="true", RADLENS_DERMOSCOPY__WEIGHTS=str(model),
        RADLENS_DERMOSCOPY__ABSTAIN="false", RADLENS_OUTBOX__POLL_INTERVAL_S="0.2",
        RADLENS_DESTINATIONS=json.dumps([{"name": "archive", "ae_title": "ARCHIVE",
                                          "host": "127.0.0.1", "port": archive.port}])).start()
    for sent in storescu_by_syntax(server.port, [*photographs, *corpus], extra=["-R"]):
        assert sent.returncode == 0 and "Failed" not in sent.stderr, sent.stderr
    wait_for(lambda: len(server.jobs_done()) == 5, 180, "the five studies to be processed")
    assert {row["state"] for row in server.jobs_done()} == {"done"}

    def study_of(path: Path) -> str:
        return str(pydicom.dcmread(path, stop_before_pixels=True).StudyInstanceUID)

    for path in corpus:
        (image,) = server.findings(study_of(path))["images"]
        assert "not like a dermoscopic photograph" in image["not_analysed"], image
        assert not image.get("analyses")
    for path, spacing in zip(photographs, (True, False), strict=True):
        (image,) = server.findings(study_of(path))["images"]
        (reading,) = [a for a in image["analyses"] if a["task"] == "dermoscopy"]
        assert 0 <= reading["melanoma_probability"] <= 1
        assert reading["assessment"] in ("nevus", "melanoma")
        assert len(reading["descriptors"]) == 3 and reading["lesion_pixels"] > 0
        assert reading["site"] and reading["lesion_id"] in ("1", "2")
        measured = reading["measurements"]
        assert set(measured["levels"]) == {"asymmetry", "border", "colour", "diameter_mm"}
        assert (measured["diameter_mm"] is not None) == spacing
        assert (measured["levels"]["diameter_mm"] is not None) == spacing

    # Six months later, the same lesion of the same patient: the change since the first visit.
    (sent,) = storescu_by_syntax(server.port, [follow_up], extra=["-R"])
    assert sent.returncode == 0 and "Failed" not in sent.stderr, sent.stderr
    wait_for(lambda: len(server.jobs_done()) == 6, 120, "the follow-up visit to be processed")
    first = pydicom.dcmread(photographs[0], stop_before_pixels=True)
    (image,) = server.findings(study_of(follow_up))["images"]
    (reading,) = [a for a in image["analyses"] if a["task"] == "dermoscopy"]
    prior = reading["prior"]
    assert prior is not None, reading
    assert prior["prior_study_instance_uid"] == str(first.StudyInstanceUID)
    first_date = str(first.StudyDate)
    assert prior["prior_study_date"] == f"{first_date[:4]}-{first_date[4:6]}-{first_date[6:]}"
    assert prior["interval_days"] == 180
    assert {"asymmetry", "border_turns", "colour_score", "melanoma_probability"} <= set(
        prior["changes"])
    (before,) = server.findings(str(first.StudyInstanceUID))["images"][0]["analyses"]
    assert prior["changes"]["asymmetry"]["prior"] == pytest.approx(
        before["measurements"]["asymmetry"])
    assert server.query("SELECT COUNT(*) FROM observations")[0][0] == 3
    assert not server.query("SELECT 1 FROM observations WHERE subject = ?",
                            (str(first.PatientID),))

    wait_for(lambda: server.query("SELECT COUNT(*) FROM outbox WHERE state != 'sent'")[0][0]
             == 0 and server.query("SELECT COUNT(*) FROM outbox")[0][0] >= 12, 60,
             "every output to reach the archive")
    for study in map(study_of, [*photographs, follow_up]):
        returned = [p for p in archive.files() if study_of(p) == study]
        modalities = sorted(str(pydicom.dcmread(p, stop_before_pixels=True).Modality)
                            for p in returned)
        assert modalities == ["DOC", "OT", "SEG", "SR"], modalities
        for path in returned:
            assert dciodvfy_errors(path) == [], path.name
        by_modality = {str(pydicom.dcmread(p, stop_before_pixels=True).Modality): p
                       for p in returned}
        assert pydicom.dcmread(by_modality["SEG"]).SegmentSequence[0].SegmentLabel == \
            "skin lesion"
        assert "Grad-CAM of the dermoscopy model" in pydicom.dcmread(
            by_modality["OT"], stop_before_pixels=True).ImageComments
        tree = subprocess.run([require_tool("dsrdump"), "+Pl", str(by_modality["SR"])],
                              capture_output=True, text=True, timeout=60)
        assert tree.returncode == 0, tree.stderr
        for concept in ('(95324001,SCT,"Skin lesion")', "Probability of melanoma",
                        "Asymmetry level (1-5)", "Border total turning",
                        "Hue standard deviation", "Dermoscopic AI assessment",
                        "Dermoscopic feature", "Referenced Segment",
                        "Dermoscopic photography", "Quantitative analysis",
                        "Visual features:", "Risk assessment:"):
            assert concept in tree.stdout, (concept, study)
        follow_up_sr = study == study_of(follow_up)
        for concept in ("Asymmetry change since prior visit",
                        "Probability of melanoma change since prior visit",
                        "Study date of the prior visit compared",
                        "Study Instance UID of the prior visit compared",
                        "Change since the prior visit"):
            assert (concept in tree.stdout) == follow_up_sr, (concept, study)


def test_the_shipped_model_verifies_and_holds_on_new_phantoms(tmp_path):
    """The model radlens ships as ``dermoscopy`` matches its card's hashes, states its note,
    and on 60 new phantoms (seed 7, not its training or its measured seed) stays near its
    measured figures: a guard against weights or preprocessing drifting from the card. The
    bounds sit below the 400-image figures by this sample's spread (8 melanomas)."""
    assert radlens_cli("models", "verify", "dermoscopy").returncode == 0
    listed = radlens_cli("models", env={"COLUMNS": "400"})
    assert "shipped: dermoscopy = radlens-dermoscopy" in listed.stdout, listed.stdout
    data = tmp_path / "new"
    assert radlens_cli("phantoms", "--task", "dermoscopy", "--out", str(data), "--n", "60",
                       "--seed", "7").returncode == 0
    out = tmp_path / "eval"
    result = radlens_cli("evaluate", "--task", "dermoscopy", "--data", str(data), "--model",
                         "dermoscopy", "--out", str(out), "--device", "cpu", timeout=300)
    assert result.returncode == 0, result.stderr
    report = json.loads((out / "report.json").read_text())
    figures = report["classification"]
    assert figures["cases"] == 60
    assert figures["accuracy"] >= 0.80 and figures["auc"] >= 0.85, figures
    assert report["segmentation"]["all"]["refined_dice"] >= 0.90
