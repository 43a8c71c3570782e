"""The agent runs the shipped model on pushed studies: phantom DICOM in, class probabilities out."""

from __future__ import annotations

import csv
import json

import numpy as np
import pydicom
import pytest

from tests.helpers import frames_of, radlens_cli, storescu, wait_for

# Eight phantoms the shipped model reads right, class and area: this test checks the agent's
# path image by image, not the model's accuracy (test_models and docs/breast_us.md measure
# that: 94 % of fresh phantoms). The model retrained on 7 December 2026 gets all eight right
# on 5 of the 17 seeds 31-47; seed 31, chosen for the model before it, has one malignant
# lesion segmented at a quarter of its area.
SEED = 33


def test_phantom_studies_pushed_with_storescu_get_class_probabilities(server, tmp_path):
    made = radlens_cli("phantoms", "--out", str(tmp_path / "ph"), "--n", "8", "--seed",
                       str(SEED), "--dicom")
    assert made.returncode == 0, made.stderr
    with open(tmp_path / "ph" / "labels.csv") as handle:
        truth = {row["case_id"]: row for row in csv.DictReader(handle)}
    files = sorted((tmp_path / "ph" / "dicom").glob("*/IM0001.dcm"))
    assert len(files) == 8
    sent = storescu(server.port, files)
    assert sent.returncode == 0, sent.stderr
    wait_for(lambda: len(server.jobs_done()) == 8, 120, "eight studies to be processed")
    assert {j["state"] for j in server.jobs_done()} == {"done"}

    for path in files:
        case_id = path.parent.name
        study = pydicom.dcmread(path, stop_before_pixels=True).StudyInstanceUID
        findings = server.findings(study)
        assert findings["model"]["name"] == "radlens-unet-phantom"
        (image,) = findings["images"]
        assert image["not_analysed"] is None
        (frame,) = frames_of(image)
        probabilities = frame["class_probabilities"]
        assert abs(sum(probabilities.values()) - 1) < 1e-4
        label = truth[case_id]["label"]
        assert frame["predicted_class"] == label, (case_id, probabilities)
        predicted_area = sum(frame["lesion_pixels"].values())
        true_area = int(truth[case_id]["lesion_pixels"])
        maps = np.load(server.data_dir / "results" / study / frame["maps_file"])
        assert maps["classes"].shape == (256, 256) and maps["probabilities"].shape[0] == 3
        if label == "normal":
            assert predicted_area < 50
            assert frame["lesions"] == [] and frame["saliency"] == {}
            continue
        assert 0.5 * true_area <= predicted_area <= 1.5 * true_area, (case_id, frame)
        lesion = frame["lesions"][0]
        assert lesion["lesion_class"] == label
        spacing = float(truth[case_id]["pixel_spacing_mm"])
        assert lesion["area_mm2"] == pytest.approx(lesion["area_px"] * spacing**2, rel=1e-3)
        assert lesion["longest_diameter_mm"] >= lesion["perpendicular_diameter_mm"] > 0
        assert all(1 <= v <= 5 for v in lesion["levels"].values())
        assert set(frame["saliency"]) == {"prototype", "gradcam++"}
        assert frame["saliency"]["prototype"]["dice"] > 0.5
        assert set(maps.files) >= {"saliency_prototype", "saliency_gradcam++"}

    # Everything processed is kept for cohort analysis, and radlens cohort can run over it.
    rows = server.query("SELECT predicted_class FROM frame_analyses")
    assert len(rows) == 8
    lesion_rows = server.query("SELECT * FROM lesion_analyses")
    assert len(lesion_rows) >= 4  # at least the planted lesion of each lesion case
    assert all(len(r["latent"]) == 256 * 4 for r in lesion_rows)  # float32 per channel
    assert {json.loads(r["measurements"])["lesion_class"] for r in lesion_rows} <= {
        "benign", "malignant"}
    result = radlens_cli("cohort", "--from-agent", "--out", str(tmp_path / "cohort"),
                         env=server.env)
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "cohort" / "cohort.json").read_text())
    assert report["images"] == 8
    assert report["grouping"] == "predicted class, one sample per image"
    assert len(report["clustering"]) == 9
    expected = {name: sum(row["label"] == name for row in truth.values())
                for name in ("normal", "benign", "malignant")}  # each predicted right above
    assert {row["group"]: row["samples"] for row in report["per_class"]} == expected
    assert (tmp_path / "cohort" / "tsne_clusters.png").is_file()
    by_lesion = radlens_cli("cohort", "--from-agent", "--latent", "lesion", "--out",
                            str(tmp_path / "lesions"), env=server.env)
    assert by_lesion.returncode == 0, by_lesion.stderr
    lesion_report = json.loads((tmp_path / "lesions" / "cohort.json").read_text())
    assert lesion_report["images"] == len(lesion_rows)
    assert {row["group"]: row["lesions"] for row in lesion_report["per_class"]}["normal"] == 0


def test_agent_refuses_to_start_with_a_model_it_cannot_load(server_factory):
    server = server_factory(RADLENS_MODEL__VERSION="1999.01.01")
    server.start(wait=False)
    assert server.process.wait(timeout=60) == 1
    assert "cannot load model 'default'" in server.log()
    assert "not the pinned '1999.01.01'" in server.log()


def test_processed_study_exports_as_nifti(server, tmp_path):
    import nibabel as nib

    made = radlens_cli("phantoms", "--out", str(tmp_path / "ph"), "--n", "1", "--seed", "8",
                       "--dicom")
    assert made.returncode == 0, made.stderr
    (path,) = sorted((tmp_path / "ph" / "dicom").glob("*/IM0001.dcm"))
    assert storescu(server.port, [path]).returncode == 0
    wait_for(lambda: server.jobs_done(), 60, "the study to be processed")
    study = pydicom.dcmread(path, stop_before_pixels=True).StudyInstanceUID
    results = server.data_dir / "results" / study
    exported = radlens_cli("export-nifti", str(results), "--out", str(tmp_path / "nifti"))
    assert exported.returncode == 0, exported.stderr
    findings = server.findings(study)
    (frame,) = frames_of(findings["images"][0])
    stem = frame["maps_file"].split("/")[-1].removesuffix(".npz")
    classes = nib.load(str(tmp_path / "nifti" / f"{stem}_classes.nii.gz"))
    kept = np.load(results / frame["maps_file"])["classes"]
    assert np.array_equal(np.asarray(classes.dataobj)[..., 0].T, kept)
    spacing = findings["images"][0]["spacing"]
    assert classes.header.get_zooms()[:2] == pytest.approx(
        (spacing["column_mm"], spacing["row_mm"]), rel=1e-5)
    assert (tmp_path / "nifti" / f"{stem}_probability_malignant.nii.gz").is_file()


def test_lesions_and_saliency_are_reported_in_named_structures(server_factory, tmp_path):
    import nibabel as nib

    from radlens.analysis.nifti import to_nifti

    labels = np.ones((256, 256), np.int16)
    labels[128:] = 2
    nib.save(to_nifti(labels, None), str(tmp_path / "atlas.nii.gz"))
    (tmp_path / "names.csv").write_text("label,name\n1,upper breast\n2,lower breast\n")
    server = server_factory(RADLENS_ANATOMY__LABEL_MAP=str(tmp_path / "atlas.nii.gz"),
                            RADLENS_ANATOMY__NAMES=str(tmp_path / "names.csv")).start()
    made = radlens_cli("phantoms", "--out", str(tmp_path / "ph"), "--n", "1", "--seed", "31",
                       "--dicom")  # case 0 of seed 31 is a malignant lesion
    assert made.returncode == 0, made.stderr
    (path,) = sorted((tmp_path / "ph" / "dicom").glob("*/IM0001.dcm"))
    assert storescu(server.port, [path]).returncode == 0
    wait_for(lambda: server.jobs_done(), 60, "the study to be processed")
    study = pydicom.dcmread(path, stop_before_pixels=True).StudyInstanceUID
    (frame,) = frames_of(server.findings(study)["images"][0])
    assert frame["anatomy_note"] is None
    lesion = frame["lesions"][0]
    classes = np.load(server.data_dir / "results" / study / frame["maps_file"])["classes"]
    from radlens.analysis.lesions import find_lesions

    region, _ = find_lesions(classes)[0]
    expected_upper = region[:128].sum() / region.sum()
    reported = {o["name"]: o["fraction_of_mask"] for o in lesion["anatomy"]}
    assert sum(reported.values()) == pytest.approx(1.0)
    assert reported.get("upper breast", 0.0) == pytest.approx(expected_upper)
    for method in ("prototype", "gradcam++"):
        shares = frame["saliency"][method]["anatomy"]
        assert shares and sum(o["fraction_of_mask"] for o in shares) == pytest.approx(1.0)


def test_a_label_map_on_another_grid_is_reported_not_guessed(server_factory, tmp_path):
    import nibabel as nib

    from radlens.analysis.nifti import to_nifti

    nib.save(to_nifti(np.ones((64, 64), np.int16), None), str(tmp_path / "atlas.nii.gz"))
    (tmp_path / "names.csv").write_text("label,name\n1,somewhere\n")
    server = server_factory(RADLENS_ANATOMY__LABEL_MAP=str(tmp_path / "atlas.nii.gz"),
                            RADLENS_ANATOMY__NAMES=str(tmp_path / "names.csv")).start()
    assert radlens_cli("phantoms", "--out", str(tmp_path / "ph"), "--n", "1", "--seed", "31",
                       "--dicom").returncode == 0
    (path,) = sorted((tmp_path / "ph" / "dicom").glob("*/IM0001.dcm"))
    assert storescu(server.port, [path]).returncode == 0
    wait_for(lambda: server.jobs_done(), 60, "the study to be processed")
    study = pydicom.dcmread(path, stop_before_pixels=True).StudyInstanceUID
    (frame,) = frames_of(server.findings(study)["images"][0])
    assert "differs from the image's (256, 256)" in frame["anatomy_note"]
    assert frame["lesions"][0]["anatomy"] == []


@pytest.mark.parametrize("concurrency", [2, 1])
def test_worker_concurrency_runs_that_many_studies_at_once(server_factory, tmp_path,
                                                           concurrency):
    """worker.concurrency 2: two worker processes, so two studies are in flight at once (never
    three), and every study still ends done with all its outputs; 1: strictly one study after
    another."""
    made = radlens_cli("phantoms", "--out", str(tmp_path / "ph"), "--n", "3", "--seed", "5",
                       "--dicom")
    assert made.returncode == 0, made.stderr
    files = sorted((tmp_path / "ph" / "dicom").glob("*/IM0001.dcm"))
    server = server_factory(RADLENS_WORKER__CONCURRENCY=str(concurrency)).start()
    assert storescu(server.port, files).returncode == 0
    wait_for(lambda: len(server.jobs_done()) == 3, 120, "three studies to be processed")
    jobs = server.query("SELECT * FROM jobs ORDER BY id")
    assert [j["state"] for j in jobs] == ["done"] * 3
    overlaps = [later["started_at"] < earlier["finished_at"]
                for earlier, later in zip(jobs, jobs[1:], strict=False)]
    assert any(overlaps) if concurrency == 2 else not any(overlaps), [dict(j) for j in jobs]
    in_flight = max(sum(j["started_at"] <= job["started_at"] < j["finished_at"] for j in jobs)
                    for job in jobs)
    assert in_flight <= concurrency, [dict(j) for j in jobs]
    for job in jobs:
        results = server.data_dir / "results" / job["study_instance_uid"]
        written = {path.name.split("_")[0] for path in results.glob("dicom/revision-*/*.dcm")}
        assert {"SR", "PDF"} <= written, written  # and SEG, maps, overlay where lesions were
        assert json.loads((results / "findings.json").read_text())["timings"]["pdf"] > 0
