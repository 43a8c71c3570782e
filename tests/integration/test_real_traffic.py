"""Real traffic through the real pipeline: one broken image beside a good one, a job that keeps
failing, and the abstention figures and routing answers the commands print."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pydicom
import pytest
import sqlalchemy as sa

from radlens.agent.offline import collect_studies, process_study
from radlens.agent.queue import JobQueue
from radlens.agent.service import load_tasks
from radlens.agent.worker import Worker
from radlens.config import Settings
from radlens.db import DB_FILENAME, Database, instances
from radlens.tasks.breast_us.dicom import us_dataset
from radlens.tasks.breast_us.phantoms import make_phantom
from tests.helpers import (
    TEST_FILES,
    acknowledged_files,
    dciodvfy_errors,
    frames_of,
    radlens_cli,
    require_tool,
    storescu,
    wait_for,
)

pytestmark = pytest.mark.slow
ECHO = TEST_FILES / "examples_ybr_color.dcm"


def _phantom_file(path: Path, study: str, number: int, case: int = 4) -> Path:
    ds = us_dataset(make_phantom(321, case).image, study_uid=study, series_uid=f"{study}.1",
                    instance_number=number, spacing_cm=0.02, patient_id="REAL-1")
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def test_one_unusable_image_never_costs_the_study_its_good_image(tmp_path):
    study = "1.2.826.0.1.3680043.8.498.777"
    good = _phantom_file(tmp_path / "in" / "good.dcm", study, 1)
    broken = pydicom.dcmread(_phantom_file(tmp_path / "in" / "broken.dcm", study, 2, case=53))
    broken.PixelData = broken.PixelData * 2  # double-length pixel data
    broken.save_as(tmp_path / "in" / "broken.dcm", enforce_file_format=True)
    settings = Settings()
    settings.storage.fsync = False
    studies, _ = collect_studies([tmp_path / "in"])
    done = process_study(study, studies[study], tmp_path / "out", load_tasks(settings),
                         settings)
    assert done.error is None and done.lesions >= 1
    findings = json.loads(done.findings_path.read_text())
    (analysed,) = [i for i in findings["images"] if frames_of(i)]
    assert analysed["ref"]["sop_instance_uid"] == str(pydicom.dcmread(good).SOPInstanceUID)
    (skipped,) = findings["skipped"]
    assert "pixel data do not fit the header" in skipped["reason"]
    assert done.outputs.seg and done.outputs.sr
    dump = subprocess.run([require_tool("dsrdump"), "+Pl", str(done.outputs.sr[0])],
                          capture_output=True, text=True, timeout=60).stdout
    assert "pixel data do not fit the header" in dump  # the SR names what it skipped, and why
    timings = json.loads(done.findings_path.read_text())["timings"]  # rewritten at the end
    assert timings == done.findings.timings and timings["total"] > 0
    for stage in ("decode", "inference", "measurement", "saliency", "narrative", "seg", "sr",
                  "parametric_map", "overlay", "pdf"):
        assert timings[stage] > 0, stage  # every stage of the job is timed
    assert timings["total"] >= sum(v for k, v in timings.items() if k != "total") * 0.95


def test_a_job_that_keeps_failing_is_retried_then_answered_with_an_sr(tmp_path, monkeypatch):
    """A bug (here: the pipeline raising) is retried ``max_attempts`` times; then the job stays
    failed with its reason, and an SR saying the analysis failed goes to the outbox."""
    study = "1.2.826.0.1.3680043.8.498.778"
    source = _phantom_file(tmp_path / "spool" / "IM1.dcm", study, 1)
    ds = pydicom.dcmread(source, stop_before_pixels=True)
    db = Database(tmp_path / DB_FILENAME)
    with db.transaction() as conn:
        conn.execute(sa.insert(instances).values(
            sop_instance_uid=str(ds.SOPInstanceUID), sop_class_uid=str(ds.SOPClassUID),
            study_instance_uid=study, series_instance_uid=str(ds.SeriesInstanceUID),
            transfer_syntax_uid="1.2.840.10008.1.2.1", calling_aet="US01",
            path="spool/IM1.dcm", size_bytes=1, received_at=0))
    queue = JobQueue(db, tmp_path)
    job_id = queue.create_job_for_pending(study)

    def broken_pipeline(*args, **kwargs):
        raise RuntimeError("a bug in a stage")

    monkeypatch.setattr("radlens.agent.worker.run_study", broken_pipeline)
    delivered: list[tuple[int, list[Path]]] = []
    worker = Worker(queue, tmp_path / "results", fsync=False, max_attempts=3,
                    deliver=lambda conn, job, files: delivered.append(
                        (job, [file.path for file in files])))
    while (job := queue.claim_next()) is not None:
        worker.process(job)
    row = db.rows("SELECT state, attempts, error FROM jobs WHERE id = :id", {"id": job_id})[0]
    assert (row["state"], row["attempts"]) == ("failed", 3)
    assert row["error"] == "RuntimeError: a bug in a stage"
    ((job, paths),) = delivered
    (sr_path,) = paths
    assert job == job_id and sr_path.name.startswith("SR_")
    sr = pydicom.dcmread(sr_path)
    assert sr.StudyInstanceUID == study
    dump = subprocess.run([require_tool("dsrdump"), "+Pl", str(sr_path)], capture_output=True,
                          text=True, timeout=60).stdout
    assert "Analysis failed" in dump and "a bug in a stage" in dump
    errors = subprocess.run([require_tool("dciodvfy"), str(sr_path)], capture_output=True,
                            text=True, timeout=60)
    assert "Error" not in errors.stdout + errors.stderr


def test_evaluate_prints_the_abstention_distributions(tmp_path):
    """Fresh phantoms pass (at most 5 % abstain); the frames of pydicom's echocardiogram clip,
    real non-breast ultrasound, abstain (at least 95 %)."""
    made = radlens_cli("phantoms", "--out", str(tmp_path / "fresh"), "--n", "100",
                       "--seed", "4242")
    assert made.returncode == 0, made.stderr
    evaluated = radlens_cli("evaluate", "--data", str(tmp_path / "fresh"), "--out",
                            str(tmp_path / "eval"), "--unlike", str(ECHO), "--device", "cpu",
                            timeout=600)
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]
    assert "Out-of-distribution score" in evaluated.stdout
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    distributions = report["ood"]["distributions"]
    phantoms = distributions[f"{tmp_path / 'fresh'} (should pass)"]
    echo = distributions["examples_ybr_color.dcm (should abstain)"]
    assert phantoms["n"] == 100 and phantoms["abstain_rate"] <= 0.05
    assert echo["n"] == 30 and echo["abstain_rate"] >= 0.95
    assert re.search(r"examples_ybr_color\.dcm \(should abstain\) \| 30 \| 1\.000",
                     evaluated.stdout)


def test_route_says_which_model_runs_and_why(tmp_path):
    phantom = _phantom_file(tmp_path / "IM1.dcm", "1.2.826.0.1.3680043.8.498.779", 1)
    heart = pydicom.dcmread(phantom)
    heart.BodyPartExamined = "HEART"
    heart.SOPInstanceUID = heart.file_meta.MediaStorageSOPInstanceUID = \
        "1.2.826.0.1.3680043.8.498.780"
    heart.save_as(tmp_path / "heart.dcm", enforce_file_format=True)
    config = tmp_path / "routing.yaml"
    config.write_text("routing:\n  rules:\n    - {name: echo-lab, calling_ae: ECHOLAB, "
                      "model: none}\n")
    files = [str(phantom), str(tmp_path / "heart.dcm"), str(ECHO),
             str(TEST_FILES / "CT_small.dcm")]

    def route(*extra: str) -> dict[str, str]:
        routed = radlens_cli("route", *files, "--config", str(config), *extra,
                             env={"COLUMNS": "300"})
        assert routed.returncode == 0, routed.stderr
        return {Path(line.split()[1]).name: line for line in routed.stdout.splitlines()
                if ".dcm" in line}

    lines = route()
    assert "radlens-unet-phantom" in lines["IM1.dcm"]
    assert "body part BREAST is in scope" in lines["IM1.dcm"]
    assert "outside the model's scope: body part HEART" in lines["heart.dcm"]
    assert "outside the model's scope: modality CT" in lines["CT_small.dcm"]
    assert "radlens-unet-phantom" in lines["examples_ybr_color.dcm"]
    assert "out-of-distribution check still applies" in lines["examples_ybr_color.dcm"]
    for name in ("heart.dcm", "CT_small.dcm"):
        assert " none " in lines[name]
    from_echo_lab = route("--calling-aet", "ECHOLAB")
    assert "routing rule 'echo-lab' sends it to no model" in \
        from_echo_lab["examples_ybr_color.dcm"]
    assert "outside the model's scope: modality CT" in from_echo_lab["CT_small.dcm"]


def _mutated_study(folder: Path) -> dict[str, Path]:
    """One study: a valid phantom with a lesion, and copies of it each broken the way a real
    sender broke one (pixel data, header values, nesting)."""
    from pydicom.dataelem import RawDataElement
    from pydicom.dataset import Dataset
    from pydicom.tag import Tag
    from pydicom.uid import generate_uid

    study = "1.2.826.0.1.3680043.8.498.781"
    valid = _phantom_file(folder / "valid.dcm", study, 1)

    def raw(ds: Dataset, keyword: str, vr: str, value: bytes) -> None:
        tag = Tag(keyword)
        ds[tag] = RawDataElement(tag, vr, len(value), value, 0, True, True)

    def double_pixel_data(ds):
        ds.PixelData = ds.PixelData * 2

    def frames_disagree(ds):
        ds.NumberOfFrames = 3

    def bits_allocated_1(ds):
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 1, 1, 0

    def broken_palette(ds):
        ds.PhotometricInterpretation = "PALETTE COLOR"
        for offset in range(3):  # Red, Green, Blue: data shorter than their descriptors
            ds.add_new(Tag(0x0028, 0x1101 + offset), "US", [256, 0, 8])
            ds.add_new(Tag(0x0028, 0x1201 + offset), "OW", bytes(10))

    def deep_nesting(ds):
        item = ds
        for _ in range(60):
            child = Dataset()
            item.ReferencedImageSequence = [child]
            item = child

    mutations = {
        "double_pixel_data": double_pixel_data,
        "frames_disagree": frames_disagree,
        "bits_allocated_1": bits_allocated_1,
        "rescale_abc": lambda ds: raw(ds, "RescaleSlope", "DS", b"abc "),
        "rescale_nan": lambda ds: (raw(ds, "RescaleSlope", "DS", b"NaN "),
                                   raw(ds, "RescaleIntercept", "DS", b"0 ")),
        "broken_palette": broken_palette,
        "birth_date_0230": lambda ds: raw(ds, "PatientBirthDate", "DA", b"19700230"),
        "charset_999": lambda ds: raw(ds, "SpecificCharacterSet", "CS", b"ISO_IR 999"),
        "weight_heavy": lambda ds: raw(ds, "PatientWeight", "DS", b"heavy "),
        "study_time_colons": lambda ds: raw(ds, "StudyTime", "TM", b"14:04:38"),
        "deep_nesting": deep_nesting,
    }
    files = {"valid": valid}
    for number, (name, mutate) in enumerate(mutations.items(), start=2):
        ds = pydicom.dcmread(valid)
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid(
            entropy_srcs=["mutated", name])
        ds.InstanceNumber = number
        mutate(ds)
        ds.save_as(folder / f"{name}.dcm", enforce_file_format=True)
        files[name] = folder / f"{name}.dcm"
    return files


def test_mutated_datasets_over_real_associations_lose_nothing_and_fail_no_job(server_factory,
                                                                            tmp_path):
    files = _mutated_study(tmp_path / "mutated")
    server = server_factory(RADLENS_OUTPUTS__PDF="true").start()
    sent = storescu(server.port, list(files.values()))
    acked = set(acknowledged_files(sent.stdout + sent.stderr))
    assert acked == {str(p) for p in files.values()}, sent.stderr[-3000:]
    wait_for(lambda: server.jobs_done(), 240, "the study's job")
    ((job),) = server.jobs_done()
    assert job["state"] == "done", job["error"]
    study = str(pydicom.dcmread(files["valid"], stop_before_pixels=True).StudyInstanceUID)
    findings = server.findings(study)
    accounted = {i["ref"]["sop_instance_uid"]: i for i in findings["images"]}
    accounted.update({s["ref"]["sop_instance_uid"]: s for s in findings["skipped"]})
    uids = {name: str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID)
            for name, p in files.items()}
    assert set(accounted) == set(uids.values())  # every acknowledged instance is in the answer
    valid = accounted[uids["valid"]]
    assert frames_of(valid) and frames_of(valid)[0]["lesions"]
    for name in ("double_pixel_data", "frames_disagree", "bits_allocated_1", "rescale_nan",
                 "broken_palette"):
        reason = accounted[uids[name]].get("reason") or accounted[uids[name]]["not_analysed"]
        assert reason, name
    results = server.data_dir / "results" / study / "dicom" / "revision-1"
    (sr,) = results.glob("SR_*.dcm")
    assert list(results.glob("SEG_*.dcm")) and list(results.glob("PDF_*.dcm"))
    dump = subprocess.run([require_tool("dsrdump"), "+Pl", str(sr)], capture_output=True,
                          text=True, timeout=60).stdout
    assert "pixel data do not fit the header" in dump
    for output in results.glob("*.dcm"):  # every object written, none refused by dciodvfy
        errors = dciodvfy_errors(output)
        assert errors == [], (output.name, errors)
    assert "Traceback" not in server.log()
