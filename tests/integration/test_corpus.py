"""Real files nobody here made: every file of pydicom's test data and of the pydicom-data
package goes through ``radlens process``, and a sample through the listener with storescu.

Each study must end done (none failed), every output object must pass dciodvfy without an Error
line that its sources do not already have, and no real ultrasound (none of it is breast) may get
a finding: the model abstains or the image is outside its scope.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections import defaultdict
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_files

from tests.helpers import (
    acknowledged_files,
    frames_of,
    radlens_cli,
    require_tool,
    storescu_by_syntax,
    wait_for,
)

pytestmark = pytest.mark.slow


def corpus_files() -> list[Path]:
    """pydicom's bundled test files plus pydicom-data's (get_testdata_files lists both)."""
    return sorted({Path(p) for p in get_testdata_files() if Path(p).is_file()})


def test_the_corpus_includes_pydicom_data():
    names = {p.name for p in corpus_files()}
    assert "examples_ybr_color.dcm" in names and "CT_small.dcm" in names
    assert "color3d_jpeg_baseline.dcm" in names, "pydicom-data is not installed (make test)"
    assert len(names) > 200


@pytest.fixture(scope="module")
def processed(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    corpus = root / "in"
    corpus.mkdir()
    for number, path in enumerate(corpus_files()):
        shutil.copy(path, corpus / f"{number:03d}_{path.name}")
    config = root / "config.yaml"
    config.write_text("model:\n  max_frames: 2\n")
    out = root / "out"
    result = radlens_cli("process", str(corpus), "--out", str(out), "--config", str(config),
                         timeout=900)
    return corpus, out, result


def _studies(out: Path) -> list[Path]:
    return sorted(p for p in (out / "results").iterdir() if p.is_dir())


def test_every_study_of_the_corpus_completes(processed, capsys):
    corpus, out, result = processed
    # The corpus holds files that are no instance (READMEs, JSON, files without UIDs): each
    # is listed with its reason and makes the exit status 1; no study may fail.
    last_line = result.stderr.strip().splitlines()[-1]
    assert result.returncode == 1 and re.fullmatch(
        r"radlens: \d+ file\(s\) could not be read \(listed above\)", last_line), \
        result.stderr[-3000:]
    unreadable = int(re.search(r"files not DICOM or unreadable\s*│\s*(\d+)",
                               result.stdout).group(1))
    assert f"radlens: {unreadable} file(s)" in last_line
    listed = [line for line in result.stderr.splitlines() if line.startswith("not read: ")]
    assert len(listed) == unreadable
    assert any("README.txt: not a DICOM instance" in line for line in listed)
    summary = result.stdout[result.stdout.index("summary"):result.stdout.index("not read")]
    with capsys.disabled():  # the counts, in the test log: files, studies, analysed, reasons
        print(f"\ncorpus of {len(list(corpus.iterdir()))} files through radlens process:\n"
              f"{summary}")
    assert re.search(r"studies done\s*│\s*(\d+)", summary)
    assert "studies failed" not in summary
    assert "Traceback" not in result.stderr
    studies = _studies(out)
    assert len(studies) >= 40
    for study in studies:
        findings = json.loads((study / "findings.json").read_text())
        srs = list(study.glob("dicom/revision-1/SR_*.dcm"))
        assert len(srs) == 1, f"{study.name}: {len(srs)} SRs"
        # Nothing here is breast ultrasound: no finding may be reported anywhere.
        lesions = [lesion for image in findings["images"] for frame in frames_of(image)
                   for lesion in frame["lesions"]]
        assert lesions == [], f"{study.name}: lesions reported on real non-breast images"
        for image in findings["images"]:
            assert frames_of(image) == [] and image["not_analysed"], image["ref"]
        assert not list(study.glob("dicom/revision-1/SEG_*.dcm"))


def test_real_ultrasound_abstains_or_is_out_of_scope(processed):
    _, out, _ = processed
    reasons = {}
    for study in _studies(out):
        findings = json.loads((study / "findings.json").read_text())
        for image in findings["images"]:
            if image["modality"] == "US":
                reasons[image["ref"]["sop_instance_uid"]] = image["not_analysed"]
    assert len(reasons) >= 8  # distinct US images (one image in several syntaxes counts once)
    abstained = [r for r in reasons.values() if r.startswith("unlike the model's training")]
    out_of_scope = [r for r in reasons.values() if r.startswith("outside the model's scope")]
    assert len(abstained) + len(out_of_scope) == len(reasons), reasons
    assert len(abstained) >= 0.75 * len(reasons), reasons  # the rest: retired SOP classes


_VALUE = re.compile(r"<([^<>]*)>|\"([^\"]*)\"")
_TAG = re.compile(r"\(0x[0-9a-f]{4},0x[0-9a-f]{4}\)")
_GENERIC = "Dicom dataset contains invalid data values"


def _errors(path: Path) -> list[str]:
    run = subprocess.run([require_tool("dciodvfy"), "-new", str(path)], capture_output=True,
                         text=True, timeout=60)
    return [line for line in (run.stdout + run.stderr).splitlines()
            if line.startswith("Error") and _GENERIC not in line]


def _flagged(lines: list[str]) -> set[str]:
    """The values, tags and element names that error lines complain about."""
    flagged = set()
    for line in lines:
        flagged.update(v for pair in _VALUE.findall(line) for v in pair if v)
        flagged.update(_TAG.findall(line))
    return flagged


def test_outputs_add_no_dciodvfy_errors(processed):
    corpus, out, _ = processed
    sources: dict[str, list[Path]] = defaultdict(list)
    for path in corpus.iterdir():
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            sources[str(ds.StudyInstanceUID)].append(path)
        except Exception:
            continue
    checked, new_errors = 0, []
    for study in _studies(out):
        inherited = _flagged([line for source in sources[study.name]
                              for line in _errors(source)])
        for output in sorted(study.glob("dicom/revision-*/*.dcm")):
            checked += 1
            for line in _errors(output):
                if not (_flagged([line]) & inherited):
                    new_errors.append(f"{output.name}: {line}")
    assert checked >= 80
    assert new_errors == []


def test_a_sample_through_the_listener_ends_done(server_factory, tmp_path):
    """storescu pushes files nobody here made: a CT, an MR, a JPEG-compressed echocardiogram
    clip, a big-endian US whose StudyTime has colons, palette and JPEG 2000 US, an SR. Every
    study ends done; the echo clip comes back with an SR saying why it was not analysed and
    no lesion anywhere."""
    names = ["CT_small.dcm", "MR_small.dcm", "examples_ybr_color.dcm", "ExplVR_BigEnd.dcm",
             "OBXXXX1A.dcm", "US1_J2KR.dcm", "reportsi.dcm", "examples_palette.dcm"]
    by_name = {p.name: p for p in corpus_files()}
    files = [by_name[name] for name in names]
    server = server_factory(RADLENS_MODEL__MAX_FRAMES="4").start()
    syntaxes = {str(pydicom.dcmread(f, stop_before_pixels=True).file_meta.TransferSyntaxUID)
                for f in files}
    for sent in storescu_by_syntax(server.port, files):
        assert sent.returncode == 0, sent.stdout[-2000:] + sent.stderr[-2000:]
        assert len(acknowledged_files(sent.stdout + sent.stderr)) == len(
            [a for a in sent.args if str(a).endswith(".dcm")])
    studies = {str(pydicom.dcmread(f, stop_before_pixels=True).StudyInstanceUID)
               for f in files}
    wait_for(lambda: len(server.jobs_done()) >= len(studies), 240, "every study's job")
    jobs = server.query("SELECT study_instance_uid, state, error FROM jobs")
    assert {j["state"] for j in jobs} == {"done"}, [dict(j) for j in jobs]
    assert len(syntaxes) > 2  # the sample spans several transfer syntaxes
    echo_study = str(pydicom.dcmread(by_name["examples_ybr_color.dcm"],
                                     stop_before_pixels=True).StudyInstanceUID)
    findings = server.findings(echo_study)
    (echo,) = [i for i in findings["images"] if i["frames"] == 30]
    assert frames_of(echo) == [] and len(echo["abstained"]) == 4
    assert echo["not_analysed"].startswith("unlike the model's training images")
    results = server.data_dir / "results" / echo_study / "dicom" / "revision-1"
    assert not list(results.glob("SEG_*")) and not list(results.glob("SC_*"))
    (sr,) = results.glob("SR_*.dcm")
    dump = subprocess.run([require_tool("dsrdump"), "+Pl", str(sr)], capture_output=True,
                          text=True, timeout=60).stdout
    assert "No image analysed" in dump
    assert "unlike the model's training images" in dump
    assert "Long Axis" not in dump and "Referenced Segment" not in dump
    pdf = subprocess.run(["pdftotext", str(server.data_dir / "results" / echo_study /
                                           "report.pdf"), "-"],
                         capture_output=True, text=True, timeout=60).stdout
    assert "No image was analysed" in pdf and "Not analysed (1)" in pdf
    assert "unlike the model's training images" in " ".join(pdf.split())
    status = radlens_cli("status", "--json",
                         env={"RADLENS_STORAGE__DATA_DIR": str(server.data_dir)})
    report = json.loads(status.stdout)
    reasons = {item["sop"]: item["reason"] for item in report["recent_not_analysed"]}
    newest = report["latest_job_timings"]  # the newest job's stage times, from its findings
    assert newest["study"] in studies and newest["seconds"]["total"] > 0
    assert newest["seconds"]["sr"] > 0 and newest["seconds"]["decode"] >= 0
    assert reasons[echo["ref"]["sop_instance_uid"]] == echo["not_analysed"]
    assert any(r.startswith("outside the model's scope: modality") for r in reasons.values())
