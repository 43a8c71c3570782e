"""SEG, SR, Parametric Map and overlay of phantom studies, checked by independent tools:
dciodvfy (dicom3tools) for the IODs, dsrdump (dcmtk) for the SR tree, highdicom to read back."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid

from radlens.agent.offline import collect_studies, process_study
from radlens.agent.service import load_tasks
from radlens.config import Settings
from radlens.dicom_io.writers.common import OUTPUT_SOP_CLASSES, OUTPUT_TRANSFER_SYNTAXES
from radlens.tasks.breast_us.dicom import us_dataset, us_multiframe_dataset
from radlens.tasks.breast_us.phantoms import make_phantom
from tests.helpers import frames_of, radlens_cli, require_tool

SPACING_MM = 0.2
# Held-out phantoms (the shipped model trained on another seed) with large lesions, and a normal.
LESION_CASES = ((321, 4), (321, 53))
NORMAL_CASE = (321, 7)


def _phantom(case: tuple[int, int], label: str | None = None) -> np.ndarray:
    return make_phantom(*case, label=label).image  # type: ignore[arg-type]


def _write(ds: pydicom.Dataset, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.fixture(scope="module")
def processed(tmp_path_factory):
    """Four studies through the real pipeline: one lesion image, one normal image, a 3-frame
    cine with lesions on two frames, and a series of two lesion images."""
    root = tmp_path_factory.mktemp("outputs")
    sources = root / "sources"
    made = {}

    def study(name: str) -> tuple[str, str]:
        uid = generate_uid(entropy_srcs=["radlens outputs test", name])
        return uid, generate_uid(entropy_srcs=["radlens outputs test", name, "series"])

    study_uid, series_uid = study("single")
    made["single"] = [_write(us_dataset(
        _phantom(LESION_CASES[0]), study_uid=study_uid, series_uid=series_uid, instance_number=1,
        spacing_cm=SPACING_MM / 10, patient_id="OUT-1"), sources / "single" / "IM1.dcm")]
    study_uid, series_uid = study("normal")
    made["normal"] = [_write(us_dataset(
        _phantom(NORMAL_CASE, "normal"), study_uid=study_uid, series_uid=series_uid,
        instance_number=1, spacing_cm=SPACING_MM / 10, patient_id="OUT-2"),
        sources / "normal" / "IM1.dcm")]
    study_uid, series_uid = study("cine")
    frames = np.stack([_phantom(LESION_CASES[0]), _phantom(NORMAL_CASE, "normal"),
                       _phantom(LESION_CASES[1])])
    made["cine"] = [_write(us_multiframe_dataset(
        frames, study_uid=study_uid, series_uid=series_uid, instance_number=1,
        spacing_cm=SPACING_MM / 10, patient_id="OUT-3"), sources / "cine" / "IM1.dcm")]
    study_uid, series_uid = study("series")
    made["series"] = [_write(us_dataset(
        _phantom(case), study_uid=study_uid, series_uid=series_uid, instance_number=n,
        spacing_cm=SPACING_MM / 10, patient_id="OUT-4"), sources / "series" / f"IM{n}.dcm")
        for n, case in enumerate(LESION_CASES, start=1)]

    settings = Settings()
    settings.storage.fsync = False
    analysers = load_tasks(settings)
    studies, unreadable = collect_studies([sources])
    assert not unreadable and len(studies) == 4
    results = root / "results"
    done = {}
    for name, paths in made.items():
        uid = pydicom.dcmread(paths[0], stop_before_pixels=True).StudyInstanceUID
        done[name] = process_study(uid, studies[uid], results, analysers, settings)
    return done, made


def _errors(path: Path) -> list[str]:
    result = subprocess.run([require_tool("dciodvfy"), str(path)], capture_output=True,
                            text=True, timeout=60)
    return [line for line in (result.stdout + result.stderr).splitlines() if "Error" in line]


@pytest.mark.parametrize("name", ["single", "normal", "cine", "series"])
def test_every_object_passes_dciodvfy(processed, name):
    done, made = processed
    outputs = done[name].outputs
    for source in made[name]:  # the sources are clean, so nothing is inherited
        assert _errors(source) == []
    assert outputs.sr, "every study gets an SR"
    for path in outputs.all:
        assert _errors(path) == [], path.name


def test_what_each_study_gets(processed):
    done, _ = processed
    counts = {name: (len(d.outputs.seg), len(d.outputs.sr), len(d.outputs.parametric_map),
                     len(d.outputs.overlay)) for name, d in done.items()}
    assert counts["single"] == (1, 1, 1, 1)
    assert counts["normal"] == (0, 1, 0, 0)  # no lesion: no SEG, no map
    assert counts["cine"] == (1, 1, 1, 1)  # one SEG, map and (multi-frame) overlay for the cine
    assert counts["series"] == (1, 1, 2, 2)  # one SEG for the series


def _pipeline_mask(study_dir: Path, sop_uid: str, frame: int, lesion_class: str,
                   findings: dict) -> np.ndarray:
    (image,) = [i for i in findings["images"] if i["ref"]["sop_instance_uid"] == sop_uid]
    (prediction,) = [p for p in frames_of(image) if p["frame"] == frame]
    lesions = np.load(study_dir / prediction["maps_file"])["lesions"]
    indices = [lesion["index"] for lesion in prediction["lesions"]
               if lesion["lesion_class"] == lesion_class]
    return np.isin(lesions, indices)


def test_seg_reads_back_to_the_pipeline_mask(processed):
    import json

    done, made = processed
    for name in ("single", "cine", "series"):
        study = done[name]
        findings = json.loads(study.findings_path.read_text())
        (seg_path,) = study.outputs.seg
        seg = hd.seg.segread(seg_path)
        assert seg.StudyInstanceUID == findings["study_instance_uid"]
        assert seg.SeriesInstanceUID != made[name][0] and seg.Modality == "SEG"
        algorithm = seg.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0]
        assert algorithm.AlgorithmName == "radlens-unet-phantom"
        assert algorithm.AlgorithmVersion == findings["model"]["version"]
        shared = seg.SharedFunctionalGroupsSequence[0]
        assert [float(v) for v in shared.PixelMeasuresSequence[0].PixelSpacing] == \
            pytest.approx([SPACING_MM, SPACING_MM])
        assert "PlaneOrientationSequence" in shared
        assert all("PlanePositionSequence" in item
                   for item in seg.PerFrameFunctionalGroupsSequence)
        segments = {item.SegmentLabel.split()[0]: int(item.SegmentNumber)
                    for item in seg.SegmentSequence}
        compared = 0
        for source_path in made[name]:
            source = pydicom.dcmread(source_path, stop_before_pixels=True)
            frames = int(source.get("NumberOfFrames", 1))
            for frame in range(frames):
                for lesion_class, number in segments.items():
                    expected = _pipeline_mask(study.findings_path.parent,
                                              source.SOPInstanceUID, frame, lesion_class,
                                              findings)
                    if frames > 1:
                        if not expected.any():
                            continue
                        got = seg.get_pixels_by_source_frame(
                            source.SOPInstanceUID, source_frame_numbers=[frame + 1],
                            segment_numbers=[number], skip_overlap_checks=True)[0, ..., 0]
                    else:
                        got = seg.get_pixels_by_source_instance(
                            [source.SOPInstanceUID], segment_numbers=[number],
                            skip_overlap_checks=True)[0, ..., 0]
                    assert np.array_equal(got > 0, expected), (name, frame, lesion_class)
                    compared += 1
        assert compared >= 2 if name != "single" else compared >= 1


def _sr_groups(path: Path) -> dict[str, dict]:
    """Each lesion group of the SR as {tracking id: {concept meaning: value}}."""
    sr = hd.sr.srread(path)
    groups = {}
    for group in sr.content.get_image_measurement_groups():
        identifier = group.tracking_identifier
        if ":Lesion" not in identifier:
            continue
        identifier = identifier.split(":")[-1]
        values: dict = {m.name.meaning: m.value for m in group.get_measurements()}
        values["_scoords"] = [m.referenced_coordinates for m in group.get_measurements()
                              if m.referenced_coordinates]
        groups[identifier] = values
    return groups


def test_sr_reads_back_to_the_same_measurements(processed):
    import json

    done, _ = processed
    for name in ("single", "cine", "series"):
        study = done[name]
        findings = json.loads(study.findings_path.read_text())
        lesions = [lesion for image in findings["images"] for p in frames_of(image)
                   for lesion in p["lesions"]]
        groups = _sr_groups(study.outputs.sr[0])
        assert len(groups) == len(lesions) == study.lesions
        for number, lesion in enumerate(lesions, start=1):
            group = groups[f"Lesion {number}"]
            assert float(group["Long Axis"]) == pytest.approx(lesion["longest_diameter_mm"],
                                                              abs=1e-3)
            assert float(group["Short Axis"]) == pytest.approx(
                lesion["perpendicular_diameter_mm"], abs=1e-3)
            assert float(group["Area"]) == pytest.approx(lesion["area_mm2"], abs=1e-3)
            assert float(group["Compactness 4*pi*A/P^2"]) == pytest.approx(
                lesion["compactness"], abs=1e-3)
            assert float(group["Edge sharpness"]) == pytest.approx(lesion["edge_sharpness"],
                                                                   abs=1e-3)
            assert len(group["_scoords"]) == 3  # long axis, short axis, contour


def test_dsrdump_shows_groups_scoords_and_narrative(processed):
    done, _ = processed
    study = done["series"]
    dump = subprocess.run([require_tool("dsrdump"), "-Ec", "+U8", "+Pl", str(study.outputs.sr[0])],
                          capture_output=True, text=True, timeout=60)
    assert dump.returncode == 0, dump.stderr
    text = dump.stdout
    assert text.count('"Measurement Group"') == 2 + study.lesions  # two images + lesions
    assert text.count("SCOORD") == 3 * study.lesions + 2  # + each image's outline
    assert '"Referenced Segment"' in text and "(SG image" in text
    assert '"Impression"' in text and "Automated analysis of 2 ultrasound image(s)" in text
    assert "NOT FOR DIAGNOSTIC USE" in text
    assert '"Device Observer Name")="radlens"' in text
    assert "Trained on synthetic phantoms only" in " ".join(text.split())  # from the card


def test_no_lesion_is_said_in_the_sr(processed):
    done, _ = processed
    dump = subprocess.run([require_tool("dsrdump"), "-Ec", "+U8", "+Pl",
                           str(done["normal"].outputs.sr[0])],
                          capture_output=True, text=True, timeout=60).stdout
    assert "No lesion was found, so no segmentation (SEG) was written." in dump
    assert "no focal lesion detected" in dump


def test_a_cine_loop_gets_one_multiframe_overlay_that_plays(processed):
    done, made = processed
    (path,) = done["cine"].outputs.overlay
    sc = pydicom.dcmread(path)
    source = pydicom.dcmread(made["cine"][0])
    assert sc.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7.4"  # Multi-frame True Color SC
    assert int(sc.NumberOfFrames) == 3 and sc.pixel_array.shape == (3, 256, 256, 3)
    assert sc.FrameIncrementPointer == pydicom.tag.Tag("FrameTime") and float(sc.FrameTime) > 0
    (reference,) = sc.SourceImageSequence
    assert reference.ReferencedSOPInstanceUID == source.SOPInstanceUID
    assert list(reference.ReferencedFrameNumber) == [1, 2, 3]
    green = [int(np.all(frame == (0, 255, 0), axis=-1).sum()) for frame in sc.pixel_array]
    assert green[0] > 20 and green[2] > 20  # the lesions of frames 1 and 3 are outlined
    assert green[1] == 0  # the normal frame: the image, no outline


def test_parametric_map_and_overlay_carry_the_saliency(processed):
    done, made = processed
    study = done["single"]
    pm = pydicom.dcmread(study.outputs.parametric_map[0])
    assert pm.Modality == "RWV" or pm.SOPClassUID == "1.2.840.10008.5.1.4.1.1.30"
    values = pm.pixel_array
    assert values.dtype == np.float32 and 0.0 <= values.min() and values.max() <= 1.0
    source = pydicom.dcmread(made["single"][0])
    assert values.shape == source.pixel_array.shape
    sc = pydicom.dcmread(study.outputs.overlay[0])
    assert sc.PhotometricInterpretation == "RGB" and sc.pixel_array.shape[-1] == 3
    assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    green = np.all(sc.pixel_array == (0, 255, 0), axis=-1)
    assert green.sum() > 20  # the lesion outline is drawn
    for dataset in (pm, sc):
        assert dataset.StudyInstanceUID == source.StudyInstanceUID
        assert dataset.SeriesInstanceUID != source.SeriesInstanceUID


def test_reprocessing_makes_new_objects_and_says_which_revision(processed, tmp_path):
    done, made = processed
    first = done["single"]
    settings = Settings()
    settings.storage.fsync = False
    studies, _ = collect_studies(made["single"])
    (uid,) = studies
    results = first.findings_path.parent.parent
    again = process_study(uid, studies[uid], results, load_tasks(settings), settings)
    assert again.revision == first.revision + 1
    before = pydicom.dcmread(first.outputs.seg[0], stop_before_pixels=True)
    after = pydicom.dcmread(again.outputs.seg[0], stop_before_pixels=True)
    assert after.SOPInstanceUID != before.SOPInstanceUID
    assert after.SeriesInstanceUID != before.SeriesInstanceUID
    assert f"(revision {again.revision})" in after.SeriesDescription
    assert first.outputs.seg[0].exists()  # the earlier revision is kept


def test_process_command_writes_the_outputs_and_names_what_it_skipped(processed, tmp_path):
    _, made = processed
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "notes.txt").write_text("not DICOM")
    source = made["single"][0]
    (folder / source.name).write_bytes(source.read_bytes())
    result = radlens_cli("process", str(folder), "--out", str(tmp_path / "out"), timeout=300)
    # notes.txt is listed with its reason, the study is processed, and the exit status says
    # that something could not be read
    assert result.returncode == 1, result.stderr
    assert "radlens: 1 file(s) could not be read" in result.stderr
    assert f"not read: {folder / 'notes.txt'}: not a DICOM instance" in result.stderr
    assert "not read" in result.stdout  # the table at the end
    study = pydicom.dcmread(source, stop_before_pixels=True).StudyInstanceUID
    written = sorted(p.name.split("_")[0] for p in
                     (tmp_path / "out" / "results" / study / "dicom" / "revision-1").iterdir())
    assert written == ["PDF", "PM", "SC", "SEG", "SR"]
    assert (tmp_path / "out" / "results" / study / "findings.json").exists()


def test_process_command_fails_clearly_without_any_dicom(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "a.txt").write_text("x")
    result = radlens_cli("process", str(tmp_path / "empty"), "--out", str(tmp_path / "out"))
    assert result.returncode == 1
    assert "no DICOM study found" in result.stderr


def _process_one(source: Path, results: Path):
    """One file's study through the offline pipeline: (its Study UID, what was written)."""
    settings = Settings()
    settings.storage.fsync = False
    studies, _ = collect_studies([source])
    (uid,) = studies
    return uid, process_study(uid, studies[uid], results, load_tasks(settings), settings)


def test_a_source_missing_type2_attributes_still_gets_every_output(tmp_path):
    ds = us_dataset(_phantom(LESION_CASES[0]), study_uid=generate_uid(), series_uid=generate_uid(),
                    instance_number=1, spacing_cm=SPACING_MM / 10, patient_id="OUT-5")
    for keyword in ("PatientBirthDate", "PatientSex", "AccessionNumber", "ReferringPhysicianName",
                    "StudyID"):
        delattr(ds, keyword)
    source = _write(ds, tmp_path / "src" / "IM1.dcm")
    uid, done = _process_one(source, tmp_path / "results")
    assert [len(x) for x in (done.outputs.seg, done.outputs.sr, done.outputs.parametric_map,
                             done.outputs.overlay)] == [1, 1, 1, 1]
    for path in done.outputs.all:
        assert _errors(path) == [], path.name  # nothing missing is passed on


def test_an_rgb_image_with_odd_header_text_gets_every_output(tmp_path):
    """Names holding a backslash (read as several names: highdicom takes one), control
    characters, bytes no declared character set takes: the outputs are written from the
    header made conformant (the first name kept), and a failure report could be built from
    it too. This study once failed for good and could not even write its failure report."""
    from pydicom.uid import ExplicitVRLittleEndian

    from radlens.dicom_io.writers import write_failure_report

    grey = _phantom(LESION_CASES[0])
    ds = us_dataset(grey, study_uid=generate_uid(), series_uid=generate_uid(),
                    instance_number=1, spacing_cm=SPACING_MM / 10, patient_id="ODD\\7")
    ds.PhotometricInterpretation = "RGB"
    ds.SamplesPerPixel = 3
    ds.PlanarConfiguration = 0
    ds.PixelData = np.repeat(grey[..., None], 3, axis=2).tobytes()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.PatientName = "Doe^Jane\\Roe^Richard"
    ds.ReferringPhysicianName = "Who^\x01Dr"
    ds.StudyDescription = "caf\xe9"  # pydicom writes the byte E9: no character set takes it
    source = _write(ds, tmp_path / "src" / "IM1.dcm")
    assert b"caf\xe9" in source.read_bytes()
    uid, done = _process_one(source, tmp_path / "results")
    assert done.error is None, done.error
    assert len(done.outputs.sr) == 1 and len(done.outputs.overlay) == 1
    for path in (*done.outputs.sr, *done.outputs.overlay):
        written = pydicom.dcmread(path)
        assert str(written.PatientName) == "Doe^Jane", path.name
        assert _errors(path) == [], path.name
    report = write_failure_report(uid, 9, {ds.SOPInstanceUID: source},
                                  tmp_path / "failed", "a test reason", model=None,
                                  fsync=False)
    assert report is not None and pydicom.dcmread(report).StudyInstanceUID == uid


def test_an_output_that_cannot_be_built_is_named_in_the_sr_and_costs_nothing_else(tmp_path):
    """The source's pixels are damaged after the analysis: the overlay (the one object that
    needs them again) fails, the SEG, the map and the SR are still written, and the SR says so."""
    from radlens.agent.pipeline import StudyInput, run_study
    from radlens.dicom_io.writers import write_outputs
    from radlens.reporting.template import template_narrative

    ds = us_dataset(_phantom(LESION_CASES[0]), study_uid=generate_uid(), series_uid=generate_uid(),
                    instance_number=1, spacing_cm=SPACING_MM / 10, patient_id="OUT-6")
    source = _write(ds, tmp_path / "src" / "IM1.dcm")
    settings = Settings()
    studies, _ = collect_studies([source])
    (uid,) = studies
    result = run_study(StudyInput(1, 1, uid, studies[uid]), tmp_path / "results",
                       analysers=load_tasks(settings), fsync=False)
    damaged = pydicom.dcmread(source)
    damaged.PixelData = damaged.PixelData[:100]  # truncated: no longer decodable
    damaged.save_as(source, enforce_file_format=True)
    written = write_outputs(result.findings, {ds.SOPInstanceUID: source},
                            tmp_path / "results" / uid, template_narrative(result.findings),
                            settings=settings.outputs, saliency_methods=settings.model.saliency,
                            fsync=False)
    assert (len(written.seg), len(written.parametric_map), len(written.overlay),
            len(written.sr)) == (1, 1, 0, 1)
    dump = subprocess.run([require_tool("dsrdump"), "-Ec", "+U8", "+Pl", str(written.sr[0])],
                          capture_output=True, text=True, timeout=60).stdout
    assert f"The saliency overlay of {ds.SOPInstanceUID} could not be written" in dump


def _instant(ds: pydicom.Dataset, date: str, time: str):
    from datetime import datetime

    offset = ds.TimezoneOffsetFromUTC
    return datetime.strptime(f"{ds[date].value}{ds[time].value[:6]}{offset}", "%Y%m%d%H%M%S%z")


def test_every_output_carries_one_creation_time_in_the_nodes_zone(tmp_path):
    """TZ=America/New_York and TZ=Asia/Tokyo: each job's SEG, SR, PM, SC and PDF carry the
    same content and creation date and time, in the node's zone, with its offset from UTC; a
    source that states its own offset sets the zone instead, so the copied study date and time
    and ours are read alike."""
    from datetime import UTC, datetime, timedelta

    sources = tmp_path / "sources"
    plain = us_dataset(_phantom(LESION_CASES[0]), study_uid=generate_uid(),
                       series_uid=generate_uid(), instance_number=1,
                       spacing_cm=SPACING_MM / 10, patient_id="TZ-1")
    _write(plain, sources / "plain.dcm")
    stated = us_dataset(_phantom(LESION_CASES[1]), study_uid=generate_uid(),
                        series_uid=generate_uid(), instance_number=1,
                        spacing_cm=SPACING_MM / 10, patient_id="TZ-2")
    stated.TimezoneOffsetFromUTC = "+0530"
    _write(stated, sources / "stated.dcm")
    for zone, offset in (("America/New_York", "-0500"), ("Asia/Tokyo", "+0900")):
        out = tmp_path / zone.replace("/", "-")
        started = datetime.now(UTC)
        result = radlens_cli("process", str(sources), "--out", str(out), "--json",
                             env={"TZ": zone}, timeout=300)
        assert result.returncode == 0, result.stderr[-2000:]
        for study, expected in ((plain.StudyInstanceUID, offset),
                                (stated.StudyInstanceUID, "+0530")):
            objects = [pydicom.dcmread(p, stop_before_pixels=True)
                       for p in sorted((out / "results" / study).rglob("*.dcm"))]
            kinds = {path.name.split("_")[0] for path in (out / "results" / study).rglob("*.dcm")}
            assert kinds == {"SEG", "SR", "PM", "SC", "PDF"}, kinds
            assert {ds.TimezoneOffsetFromUTC for ds in objects} == {expected}, zone
            # ... and every object is of a SOP class and syntax the conformance statement lists
            assert {ds.SOPClassUID for ds in objects} <= set(OUTPUT_SOP_CLASSES)
            assert {ds.file_meta.TransferSyntaxUID for ds in objects} <= set(
                OUTPUT_TRANSFER_SYNTAXES)
            moments = {(ds.ContentDate, ds.ContentTime, ds.InstanceCreationDate,
                        ds.InstanceCreationTime) for ds in objects}
            assert len(moments) == 1, moments
            assert {ds.ContentDate + ds.ContentTime for ds in objects} == {
                ds.InstanceCreationDate + ds.InstanceCreationTime for ds in objects}
            instant = _instant(objects[0], "ContentDate", "ContentTime")
            assert started - timedelta(seconds=2) <= instant <= datetime.now(UTC), (zone, instant)


def _dcmqi(tool: str, *args: str) -> subprocess.CompletedProcess:
    """One of QIICR's dcmqi readers (the PyPI package, in this venv): the reference readers of
    SEG, Parametric Maps and TID 1500 SRs, as 3D Slicer uses them."""
    path = Path(sys.executable).parent / tool
    assert path.exists(), f"{tool} is missing: the dev extras install dcmqi"
    return subprocess.run([str(path), *args], capture_output=True, text=True, timeout=120)


def _dcmqi_to_itk(tool: str, path: Path, out: Path) -> dict:
    """Convert one SEG or Parametric Map to ITK images in ``out``; its meta.json, read back."""
    out.mkdir()
    result = _dcmqi(tool, "--inputDICOM", str(path), "--outputDirectory", str(out))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Failed to get CIELab values" not in result.stdout + result.stderr
    return json.loads((out / "meta.json").read_text())


def test_dcmqi_reads_every_seg_map_and_report(processed, tmp_path):
    """Every SEG converts with its segments' recommended colours, every Parametric Map with its
    frame anatomy and its quantity (DCM Saliency), every SR with its measurements."""
    done, _ = processed
    seen = {"seg": 0, "pm": 0, "sr": 0}
    for name, study in done.items():
        for number, path in enumerate(study.outputs.seg):
            meta = _dcmqi_to_itk("segimage2itkimage", path, tmp_path / f"{name}-seg{number}")
            colours = {tuple(s["recommendedDisplayRGBValue"]) for group in
                       meta["segmentAttributes"] for s in group}
            assert colours and colours <= {(220, 30, 30), (30, 190, 60)}, colours
            seen["seg"] += 1
        for number, path in enumerate(study.outputs.parametric_map):
            out = tmp_path / f"{name}-pm{number}"
            meta = _dcmqi_to_itk("paramap2itkimage", path, out)
            assert meta["QuantityValueCode"]["CodeMeaning"] == "Saliency", meta
            assert meta["AnatomicRegionSequence"]["CodeValue"] == "76752008"
            assert (out / "pmap.nrrd").stat().st_size > 0
            seen["pm"] += 1
        for path in study.outputs.sr:
            out = tmp_path / f"{name}-sr.json"
            result = _dcmqi("tid1500reader", "--inputDICOM", str(path),
                            "--outputMetadata", str(out))
            assert result.returncode == 0, result.stdout + result.stderr
            report = json.loads(out.read_text())
            concepts = {item["quantity"]["CodeMeaning"] for group in
                        report.get("Measurements", []) for item in group["measurementItems"]}
            if name != "normal":
                assert "Probability of cancer" in concepts, concepts
            seen["sr"] += 1
    assert seen == {"seg": 3, "pm": 4, "sr": 4}, seen
