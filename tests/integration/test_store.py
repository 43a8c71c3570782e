"""C-STORE of pydicom's test files in every supported syntax: spooled as received, indexed,
decoded into findings.json with the right shape and spacing."""

from __future__ import annotations

import shutil
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid

from tests.helpers import (
    TEST_FILES,
    acknowledged_files,
    frames_of,
    storescu,
    storescu_by_syntax,
    wait_for,
)

# file -> (rows, columns, frames, channels, row spacing in mm or None, spacing source or None)
DECODABLE = {
    "CT_small.dcm": (128, 128, 1, 1, 0.661468, "PixelSpacing"),
    "MR_small_implicit.dcm": (64, 64, 1, 1, 0.3125, "PixelSpacing"),
    "MR_small_bigendian.dcm": (64, 64, 1, 1, 0.3125, "PixelSpacing"),
    "MR_small_RLE.dcm": (64, 64, 1, 1, 0.3125, "PixelSpacing"),
    "MR_small_jp2klossless.dcm": (64, 64, 1, 1, 0.3125, "PixelSpacing"),
    "MR_small_jpeg_ls_lossless.dcm": (64, 64, 1, 1, 0.3125, "PixelSpacing"),
    "JPGExtended.dcm": (1024, 256, 1, 1, 2.26, "PixelSpacing"),
    "SC_rgb_jpeg_gdcm.dcm": (100, 100, 1, 3, 1.0, "PixelSpacing"),
    "SC_rgb_dcmtk_+eb+cy+np.dcm": (100, 100, 1, 3, 1.0, "PixelSpacing"),
    "SC_rgb_rle_2frame.dcm": (100, 100, 2, 3, 1.0, "PixelSpacing"),
    "image_dfl.dcm": (512, 512, 1, 1, None, None),
    "examples_ybr_color.dcm": (240, 320, 30, 3, 0.5104970559477806, "SequenceOfUltrasoundRegions"),
    "examples_palette.dcm": (350, 800, 1, 3, 0.26228787661969977, "SequenceOfUltrasoundRegions"),
    "examples_jpeg2k.dcm": (480, 640, 1, 3, None, None),
    "dicomdirtests/77654033/CR1/6154": (16, 16, 1, 1, None, None),
}
# file -> words the skip reason must contain
SKIPPED = {
    "test-SR.dcm": "no pixel data",
}
NOT_ANALYSED = ("JPEG-lossy.dcm",)  # an undecodable CT: the model's scope decides first


@pytest.fixture
def corpus(tmp_path: Path) -> dict[str, Path]:
    """Copies of the test files; an instance UID already used by an earlier file is renewed
    (several files are one image in different encodings)."""
    folder = tmp_path / "corpus"
    folder.mkdir()
    seen: set[str] = set()
    files = {}
    for name in [*DECODABLE, *SKIPPED, *NOT_ANALYSED]:
        target = folder / (name.replace("/", "_") + ("" if name.endswith(".dcm") else ".dcm"))
        ds = pydicom.dcmread(TEST_FILES / name)
        if ds.SOPInstanceUID in seen:
            ds.SOPInstanceUID = generate_uid()
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            ds.save_as(target, enforce_file_format=True)
        else:
            shutil.copy(TEST_FILES / name, target)
        seen.add(ds.SOPInstanceUID)
        files[name] = target
    return files


def _wait_until_processed(server, expected_instances: int) -> None:
    wait_for(lambda: server.query(
        "SELECT COUNT(*) FROM instances WHERE job_id IS NOT NULL")[0][0] == expected_instances,
        60, "every instance to be in a job")
    wait_for(lambda: server.query(
        "SELECT COUNT(*) FROM jobs WHERE state IN ('queued', 'running')")[0][0] == 0,
        120, "every job to finish")


def test_every_syntax_is_spooled_as_received_and_decoded(server, corpus):
    runs = storescu_by_syntax(server.port, corpus.values())
    for run in runs:
        assert run.returncode == 0, run.stdout + run.stderr
    acked = {f for run in runs for f in acknowledged_files(run.stdout + run.stderr)}
    assert acked == {str(p) for p in corpus.values()}

    _wait_until_processed(server, len(corpus))
    rows = {r["sop_instance_uid"]: r for r in server.query("SELECT * FROM instances")}
    assert len(rows) == len(corpus)
    findings_by_study: dict[str, dict] = {}
    for name, source_path in corpus.items():
        source = pydicom.dcmread(source_path)
        row = rows[source.SOPInstanceUID]
        spooled_path = server.data_dir / row["path"]
        assert spooled_path.parts[-4:] == ("spool", source.StudyInstanceUID,
                                           source.SeriesInstanceUID,
                                           f"{source.SOPInstanceUID}.dcm")
        spooled = pydicom.dcmread(spooled_path)
        # Stored exactly as received: same transfer syntax, same (possibly encapsulated) bytes.
        assert spooled.file_meta.TransferSyntaxUID == source.file_meta.TransferSyntaxUID, name
        assert row["transfer_syntax_uid"] == source.file_meta.TransferSyntaxUID
        assert row["calling_aet"] == "STORESCU"
        assert row["size_bytes"] == spooled_path.stat().st_size
        if "PixelData" in source:
            assert spooled.PixelData == source.PixelData, name
        study = source.StudyInstanceUID
        if study not in findings_by_study:
            findings_by_study[study] = server.findings(study)

    images = {i["ref"]["sop_instance_uid"]: i
              for f in findings_by_study.values() for i in f["images"]}
    skipped = {s["ref"]["sop_instance_uid"]: s
               for f in findings_by_study.values() for s in f["skipped"]}
    for name, (rows_, cols, frames, channels, spacing, source_attr) in DECODABLE.items():
        uid = pydicom.dcmread(corpus[name], stop_before_pixels=True).SOPInstanceUID
        assert uid in images, f"{name} missing from findings (skipped: {skipped.get(uid)})"
        image = images[uid]
        assert (image["rows"], image["columns"], image["frames"], image["channels"]) == \
            (rows_, cols, frames, channels), name
        if spacing is None:
            assert image["spacing"] is None, name
        else:
            assert image["spacing"]["row_mm"] == pytest.approx(spacing), name
            assert image["spacing"]["source"] == source_attr
    # The shipped model reads breast ultrasound; other modalities say why it did not run.
    ct = images[pydicom.dcmread(corpus["CT_small.dcm"], stop_before_pixels=True).SOPInstanceUID]
    assert frames_of(ct) == []
    assert ct["not_analysed"] == "outside the model's scope: modality CT"
    # The echocardiogram clip states no body part: the model runs, and abstains on every frame.
    clip = images[pydicom.dcmread(corpus["examples_ybr_color.dcm"],
                                  stop_before_pixels=True).SOPInstanceUID]
    assert frames_of(clip) == [] and len(clip["abstained"]) == 30
    assert clip["not_analysed"].startswith("unlike the model's training images")
    # A CT whose JPEG cannot be decoded: the model would not read it anyway, so it is not
    # decoded at all, and the reason given is the one that decides (decode errors: test_pixels).
    lossy = images[pydicom.dcmread(corpus["JPEG-lossy.dcm"], stop_before_pixels=True)
                   .SOPInstanceUID]
    assert lossy["not_analysed"].startswith("outside the model's scope: modality")
    for name, words in SKIPPED.items():
        uid = pydicom.dcmread(corpus[name], stop_before_pixels=True).SOPInstanceUID
        assert uid in skipped, f"{name} should be skipped"
        assert words in skipped[uid]["reason"]


def test_same_instance_twice_is_stored_once(server):
    source = TEST_FILES / "CT_small.dcm"
    first = storescu(server.port, [source])
    second = storescu(server.port, [source])
    assert first.returncode == 0 and second.returncode == 0
    assert len(acknowledged_files(second.stdout + second.stderr)) == 1
    assert server.query("SELECT COUNT(*) FROM instances")[0][0] == 1
    spooled = list((server.data_dir / "spool").rglob("*.dcm"))
    assert len(spooled) == 1


def test_late_instance_makes_a_second_job_over_the_whole_study(server, tmp_path):
    from radlens.tasks.breast_us.dicom import write_us_studies

    files = list(write_us_studies(tmp_path / "us", studies=1, instances_per_study=3,
                                  rows=64, columns=64))
    assert storescu(server.port, files[:2]).returncode == 0
    wait_for(lambda: server.jobs_done(), 30, "the first job")
    study = pydicom.dcmread(files[0]).StudyInstanceUID
    assert len(server.findings(study)["images"]) == 2
    assert storescu(server.port, files[2:]).returncode == 0
    wait_for(lambda: len(server.jobs_done()) == 2, 30, "the second job")
    jobs = server.query("SELECT * FROM jobs ORDER BY id")
    assert [j["study_instance_uid"] for j in jobs] == [study, study]
    findings = server.findings(study)
    assert findings["revision"] == 2
    assert len(findings["images"]) == 3
    assert findings["images"][0]["spacing"]["source"] == "SequenceOfUltrasoundRegions"
