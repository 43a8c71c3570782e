"""The narrative through the real ``ollama`` client against a local server speaking Ollama's API:
grounded answers go into the SR with the model's name; altered numbers, extra lesions, invented
sides, timeouts, server errors, a refused connection and a missing model all end in the template,
saying why, and the study's outputs still arrive. No identifier ever reaches the server."""

from __future__ import annotations

import logging
import subprocess
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid

from radlens.agent.offline import collect_studies
from radlens.agent.pipeline import StudyInput, run_study
from radlens.agent.service import load_tasks
from radlens.config import LlmSettings, Settings
from radlens.dicom_io.writers import write_outputs
from radlens.reporting import grounding
from radlens.reporting.ollama import OllamaNarrator, narrate
from radlens.reporting.prompt import StudyFacts
from radlens.reporting.template import template_narrative
from radlens.tasks.breast_us.dicom import us_dataset
from radlens.tasks.breast_us.phantoms import make_phantom
from radlens.tasks.breast_us.report import LesionFacts, LesionTaskFacts
from tests.fake_ollama import FakeOllama, answer
from tests.helpers import free_port, require_tool

IDENTIFIERS = {"PatientName": "ZYXWVUT^QWERTYKLM", "PatientID": "PID-987654321",
               "PatientBirthDate": "19450317", "AccessionNumber": "ACC5551234"}


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """Two phantom images with a lesion each, headers filled with distinctive identifiers."""
    root = tmp_path_factory.mktemp("llm")
    study_uid, series_uid = generate_uid(), generate_uid()
    paths = []
    for number, index in enumerate((4, 53), start=1):
        ds = us_dataset(make_phantom(321, index).image, study_uid=study_uid,
                        series_uid=series_uid, instance_number=number, spacing_cm=0.02,
                        patient_id=IDENTIFIERS["PatientID"])
        ds.PatientName = IDENTIFIERS["PatientName"]
        ds.PatientBirthDate = IDENTIFIERS["PatientBirthDate"]
        ds.AccessionNumber = IDENTIFIERS["AccessionNumber"]
        path = root / "src" / f"IM{number}.dcm"
        path.parent.mkdir(exist_ok=True)
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    studies, _ = collect_studies(paths)
    result = run_study(StudyInput(1, 1, study_uid, studies[study_uid]), root / "results",
                       analysers=load_tasks(Settings()), fsync=False)
    return root, result.findings, paths


@pytest.fixture
def fake():
    server = FakeOllama().start()
    yield server
    server.stop()


def _settings(host: str, **overrides) -> LlmSettings:
    return LlmSettings(provider="ollama", host=host, timeout_s=overrides.pop("timeout_s", 20.0),
                       **overrides)


def _lesions(facts: StudyFacts) -> list[LesionFacts]:
    """The lesion task's facts: the lesions an LLM may describe."""
    lesion_facts = facts.of("breast_us", LesionTaskFacts)
    return lesion_facts.lesions if lesion_facts is not None else []


def _grounded(facts: StudyFacts) -> str:
    lesions = [f"Lesion {x.number}: {x.lesion_class}-appearing, {x.longest_diameter_mm} x "
               f"{x.perpendicular_diameter_mm} mm, model probability {x.probability_percent}%."
               for x in _lesions(facts)]
    return answer(impression=f"{len(_lesions(facts))} lesions detected on breast ultrasound.",
                  lesions=lesions, comparison="Lesion 1 is the larger.",
                  recommendation="; ".join(f"Lesion {x.number}: BI-RADS-style category "
                                           f"{x.suggested_category}, an AI suggestion"
                                           for x in _lesions(facts)),
                  limitations="2-D images without clinical context.")


def _sr_text(findings, paths, root: Path, narrative) -> str:
    written = write_outputs(findings, {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID:
                                       p for p in paths},
                            root / "results" / findings.study_instance_uid, narrative,
                            settings=Settings().outputs, saliency_methods=["prototype"],
                            fsync=False)
    assert written.seg and written.sr, "the study's outputs still arrive"
    return subprocess.run([require_tool("dsrdump"), "-Ec", "+U8", "+Pl", str(written.sr[0])],
                          capture_output=True, text=True, timeout=60).stdout


def test_a_grounded_answer_goes_into_the_sr_with_the_models_name(study, fake):
    root, findings, paths = study
    facts = StudyFacts.from_findings(findings)
    assert len(_lesions(facts)) == 2
    fake.replies = [_grounded(facts)]
    narrative = narrate(findings, _settings(fake.host))
    assert narrative.author == "llama3.1:8b" and narrative.grounded is True
    assert len(fake.requests) == 1
    request = fake.requests[0]
    assert request["stream"] is False and request["options"] == {"temperature": 0, "seed": 0}
    assert request["format"]["title"] == "LlmNarrative" and request["keep_alive"] == "10m"
    dump = _sr_text(findings, paths, root, narrative)
    assert '"Narrative author")="llama3.1:8b (grounding passed)"' in dump
    assert "BI-RADS-style category" in dump


@pytest.mark.parametrize("fault, expected", [
    ("number", "is not in the findings"),
    ("lesion", "lesion 3 does not exist"),
    ("side", "'left': the findings give no side or location"),
])
def test_an_ungrounded_answer_is_retried_then_replaced_by_the_template(study, fake, fault,
                                                                      expected, caplog):
    root, findings, paths = study
    facts = StudyFacts.from_findings(findings)
    good = _grounded(facts)
    bad = {"number": good.replace(f"{_lesions(facts)[0].longest_diameter_mm} x",
                                  f"{_lesions(facts)[0].longest_diameter_mm + 7.3:.1f} x"),
           "lesion": good.replace("Lesion 1 is the larger.",
                                  "Lesion 1 is the larger; Lesion 3 is a small cyst."),
           "side": good.replace("detected on breast ultrasound",
                                "detected in the left breast")}[fault]
    assert bad != good
    fake.replies = [bad, bad]
    with caplog.at_level(logging.WARNING):
        narrative = narrate(findings, _settings(fake.host))
    assert len(fake.requests) == 2  # retried once
    retry = fake.requests[1]["messages"][-1]["content"]
    assert "rejected" in retry and expected in retry
    assert narrative.author == "radlens template" and narrative.grounded is False
    assert narrative.text == template_narrative(findings).text
    assert "LLM narrative not grounded" in caplog.text
    dump = _sr_text(findings, paths, root, narrative)
    assert "radlens template (grounding failed); template used because the LLM's text failed " \
           "grounding twice" in dump


def test_a_corrected_second_answer_is_accepted(study, fake):
    _, findings, _ = study
    facts = StudyFacts.from_findings(findings)
    good = _grounded(facts)
    fake.replies = [good.replace("breast ultrasound", "right breast ultrasound"), good]
    narrative = narrate(findings, _settings(fake.host))
    assert narrative.grounded is True and narrative.author == "llama3.1:8b"


def _fallback_reason(study, settings, caplog) -> str:
    """The template stands in, the log says so in one line, and the outputs still arrive with
    the reason in the SR."""
    root, findings, paths = study
    with caplog.at_level(logging.WARNING):
        narrative = narrate(findings, settings)
    assert narrative.author == "radlens template" and narrative.note
    assert "template narrative used instead of the LLM" in caplog.text
    assert narrative.note in _sr_text(findings, paths, root, narrative)
    return narrative.note


def test_timeout_falls_back_to_the_template(study, fake, caplog):
    fake.delay_s = 3.0
    note = _fallback_reason(study, _settings(fake.host, timeout_s=1.0), caplog)
    assert "timed out" in note


def test_server_error_falls_back_to_the_template(study, fake, caplog):
    fake.replies = [lambda body: (500, {"error": "llama runner process has terminated"})]
    note = _fallback_reason(study, _settings(fake.host), caplog)
    assert "HTTP 500" in note and "llama runner" in note


def test_refused_connection_falls_back_to_the_template(study, caplog):
    note = _fallback_reason(study, _settings(f"http://127.0.0.1:{free_port()}"), caplog)
    assert "connection refused" in note or "ConnectError" in note


def test_missing_model_falls_back_to_the_template(study, fake, caplog):
    fake.models = ["mistral:7b"]
    note = _fallback_reason(study, _settings(fake.host, model="llama3.1:8b"), caplog)
    assert "HTTP 404" in note and "not found" in note
    status = OllamaNarrator(_settings(fake.host, model="llama3.1:8b")).status()
    assert status.reachable and not status.pulled
    assert "ollama pull llama3.1:8b" in status.message


def test_status_of_a_ready_vision_model_and_of_a_server_that_is_down(fake):
    fake.capabilities = ["completion", "vision"]
    ready = OllamaNarrator(_settings(fake.host)).status()
    assert ready.ready and ready.vision
    down = OllamaNarrator(_settings(f"http://127.0.0.1:{free_port()}")).status()
    assert not down.reachable and "not reachable" in down.message


def test_the_request_holds_no_identifier(study, fake):
    _, findings, paths = study
    fake.replies = [_grounded(StudyFacts.from_findings(findings))]
    narrate(findings, _settings(fake.host))
    body = fake.raw_bodies[0].decode()
    forbidden = list(IDENTIFIERS.values()) + ["ZYXWVUT", "1945"]
    for path in paths:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        forbidden += [ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID]
    for value in forbidden:
        assert value not in body, value


def test_images_go_only_to_a_vision_model_the_user_enabled(study, fake):
    _, findings, _ = study
    facts = StudyFacts.from_findings(findings)
    png = b"\x89PNG\r\n\x1a\nfake"
    fake.replies = [_grounded(facts), _grounded(facts)]
    narrate(findings, _settings(fake.host, vision=True), images=lambda: [png],
            vision_capable=False)
    narrate(findings, _settings(fake.host, vision=True), images=lambda: [png],
            vision_capable=True)
    assert "images" not in fake.requests[0]["messages"][1]
    assert fake.requests[1]["messages"][1]["images"]


def test_the_template_names_both_lesions_with_their_sizes_and_passes_grounding(study):
    _, findings, _ = study
    narrative = template_narrative(findings)
    facts = StudyFacts.from_findings(findings)
    for lesion in _lesions(facts):
        assert (f"Lesion {lesion.number} " in narrative.text
                and f"{lesion.longest_diameter_mm:.1f} x {lesion.perpendicular_diameter_mm:.1f} mm"
                in narrative.text)
    assert grounding.check(narrative.text, facts) == []


def test_the_agent_checks_the_llm_at_start_and_uses_it(server_factory, fake, tmp_path):
    """`radlens serve` with llm.provider ollama: the start-up check shows in `radlens status`,
    and a pushed study's SR carries the LLM's grounded text."""
    from tests.helpers import radlens_cli, storescu, wait_for

    ds = us_dataset(make_phantom(321, 4).image, study_uid=generate_uid(),
                    series_uid=generate_uid(), instance_number=1, spacing_cm=0.02,
                    patient_id="LLM-AGENT")
    source = tmp_path / "IM1.dcm"
    ds.save_as(source, enforce_file_format=True)

    def reply(body: dict) -> str:  # grounded, whatever the study: built from the prompt's facts
        facts = StudyFacts.model_validate_json(
            body["messages"][1]["content"].split("Findings JSON:\n", 1)[1])
        return _grounded(facts)

    fake.replies = [reply]
    server = server_factory(RADLENS_LLM__PROVIDER="ollama", RADLENS_LLM__HOST=fake.host,
                            RADLENS_LLM__TIMEOUT_S="20").start()
    status = radlens_cli("status", env=server.env)
    assert "narrative: ollama - model llama3.1:8b ready at" in status.stdout, status.stdout
    assert storescu(server.port, [source]).returncode == 0
    wait_for(lambda: len(server.jobs_done()) == 1, 120, "the study to be processed")
    (sr,) = (server.data_dir / "results" / ds.StudyInstanceUID / "dicom").glob("*/SR_*.dcm")
    dump = subprocess.run([require_tool("dsrdump"), "-Ec", "+U8", "+Pl", str(sr)],
                          capture_output=True, text=True, timeout=60).stdout
    assert '"Narrative author")="llama3.1:8b (grounding passed)"' in dump
    assert "lesions detected on breast ultrasound" in dump


def test_the_agent_says_when_the_llm_is_missing_and_still_answers(server_factory, tmp_path):
    from tests.helpers import radlens_cli, storescu, wait_for

    ds = us_dataset(make_phantom(321, 4).image, study_uid=generate_uid(),
                    series_uid=generate_uid(), instance_number=1, spacing_cm=0.02,
                    patient_id="LLM-DOWN")
    source = tmp_path / "IM1.dcm"
    ds.save_as(source, enforce_file_format=True)
    server = server_factory(RADLENS_LLM__PROVIDER="ollama",
                            RADLENS_LLM__HOST=f"http://127.0.0.1:{free_port()}").start()
    assert "narrative LLM unavailable" in server.log()
    status = radlens_cli("status", env=server.env).stdout
    assert "not reachable" in status and "the template narrative is used" in status
    assert storescu(server.port, [source]).returncode == 0
    wait_for(lambda: len(server.jobs_done()) == 1, 120, "the study to be processed")
    assert {j["state"] for j in server.jobs_done()} == {"done"}
    outputs = list((server.data_dir / "results" / ds.StudyInstanceUID / "dicom").glob("*/*.dcm"))
    assert {p.name.split("_")[0] for p in outputs} == {"SEG", "SR", "PM", "SC", "PDF"}


def test_the_pdf_report_holds_the_narrative_and_each_lesions_size(study, tmp_path):
    root, findings, paths = study
    narrative = template_narrative(findings)
    written = write_outputs(findings, {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID:
                                       p for p in paths},
                            root / "results" / findings.study_instance_uid, narrative,
                            settings=Settings().outputs, saliency_methods=["prototype"],
                            fsync=False)
    (document,) = written.pdf
    errors = subprocess.run([require_tool("dciodvfy"), str(document)], capture_output=True,
                            text=True, timeout=60)
    assert [line for line in (errors.stdout + errors.stderr).splitlines() if "Error" in line] == []
    ds = pydicom.dcmread(document)
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.104.1" and ds.Modality == "DOC"
    assert ds.StudyInstanceUID == findings.study_instance_uid
    assert {item.ReferencedSOPInstanceUID for item in ds.SourceInstanceSequence} == {
        pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in paths}
    extracted = tmp_path / "from-dicom.pdf"
    extracted.write_bytes(ds.EncapsulatedDocument[:ds.EncapsulatedDocumentLength])
    on_disk = root / "results" / findings.study_instance_uid / "report.pdf"
    assert extracted.read_bytes() == on_disk.read_bytes()
    text = subprocess.run(["pdftotext", "-layout", str(extracted), "-"], capture_output=True,
                          text=True, timeout=60, check=True).stdout
    flat = " ".join(text.split())
    assert "NOT FOR DIAGNOSTIC USE" in flat and "radlens-unet-phantom" in flat
    assert "Narrative written by: radlens template" in flat
    first_line = narrative.text.splitlines()[1]  # "Impression: ..."
    assert " ".join(first_line.split()) in flat
    facts = StudyFacts.from_findings(findings)
    for lesion in _lesions(facts):
        size = f"{lesion.longest_diameter_mm:.1f} x {lesion.perpendicular_diameter_mm:.1f} mm"
        assert flat.count(size) >= 2, size  # in the narrative and in the table
    for value in IDENTIFIERS.values():
        assert value not in text
    # Every embedded font is a subset with a ToUnicode map: the text stays text.
    fonts = subprocess.run(["pdffonts", str(extracted)], capture_output=True, text=True,
                           timeout=60, check=True).stdout.splitlines()[2:]
    assert fonts
    for row in fonts:
        embedded, subset, unicode_map = row.split()[-5:-2]
        assert (embedded, subset, unicode_map) == ("yes", "yes", "yes"), row


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """A real cohort analysis (nine clusterings, t-SNE, tables) over three separated groups."""
    import numpy as np

    from radlens.analysis.cohort import summarise_cohort

    out = tmp_path_factory.mktemp("cohort")
    rng = np.random.default_rng(3)
    labels = np.repeat([0, 1, 2], 12)
    latents = rng.normal(size=(36, 16)) + labels[:, None] * 6.0
    attributes = [None if y == 0 else {
        "area_px": 900.0 + 300 * y, "area_mm2": 36.0 + 12 * y, "compactness": 0.95 - 0.15 * y,
        "edge_sharpness": 24.0 - 3 * y, "centroid_x": 0.5, "centroid_y": 0.5,
        "border_irregularity": 1.0 + 0.4 * y, "asymmetry": 0.05 * y} for y in labels]
    report = summarise_cohort(latents, labels, attributes, out, data="synthetic",
                              model="test", grouping="ground truth")
    return out, report


def test_the_cohort_report_is_grounded_and_written_next_to_the_tables(cohort, fake):
    from radlens.reporting.cohort_report import REPORT_FILE, cohort_facts, write_cohort_report

    out, report = cohort
    facts = cohort_facts(report)
    best = facts["best_clustering"]
    first = facts["per_cluster"][0]
    good = answer(summary=f"{facts['images']} images in {best['clusters']} clusters.",
                  latent_picture=f"{best['algorithm']} separates them (silhouette "
                                 f"{best['silhouette']}); the linear probe reaches "
                                 f"{facts['linear_probe_accuracy_percent']}% accuracy.",
                  cluster_comparison=f"{first['group']} holds {first['samples']} images.",
                  interpretation="Normal maps to BI-RADS-style 1, an AI suggestion.",
                  subgroups="The clusters follow the known classes.")
    fake.replies = [good]
    fake.capabilities = ["completion", "vision"]
    narrative = write_cohort_report(out, report, _settings(fake.host, vision=True),
                                    vision_capable=True)
    assert narrative.grounded and narrative.author == "llama3.1:8b"
    assert len(fake.requests[0]["messages"][1]["images"]) == 2  # both t-SNE pictures
    written = (out / REPORT_FILE).read_text()
    assert "Written by: llama3.1:8b (grounding passed)" in written
    assert "tsne_clusters.png" in written and "| cluster" in written.lower()

    fake.replies = [good.replace(" clusters.", " clusters; cluster 9 is new."),
                    good.replace(f"{first['samples']} images", f"{first['samples'] + 17} images")]
    fallback = write_cohort_report(out, report, _settings(fake.host))
    assert fallback.author == "radlens template" and fallback.grounded is False
    retry = fake.requests[-1]["messages"][-1]["content"]
    assert "cluster 9 does not exist" in retry
    assert "template used because the LLM's text failed grounding twice" in \
        (out / REPORT_FILE).read_text()


def test_grounding_catches_a_wrong_count_and_an_invented_finding(study):
    _, findings, _ = study
    facts = StudyFacts.from_findings(findings)
    assert len(_lesions(facts)) == 2
    assert any("the findings hold 2 lesion(s)" in v
               for v in grounding.check("Three lesions are seen.", facts))
    assert any("no such finding" in v
               for v in grounding.check("Lesion 1 shows calcifications.", facts))
    assert grounding.check("Two lesions are seen.", facts) == []


def test_a_mammography_only_study_reaches_the_llm_with_its_density_facts(fake):
    """A study only the density task read: the LLM is asked (with the density facts and the
    task's guidance), its grounded text is the narrative, and a category the findings do not
    hold sends it back."""
    from tests.unit.test_density_agent import _findings, _reading

    findings = _findings([_reading("B", "L"), _reading("C", "R")])
    good = answer(impression="Breast density: left breast B, right breast C; study category C "
                             "(the denser breast), an AI suggestion.",
                  lesions=[], comparison="No lesion.",
                  recommendation="Study breast composition C, an AI suggestion.",
                  limitations="2-D images without clinical context.")
    fake.replies = [good]
    narrative = narrate(findings, _settings(fake.host))
    assert narrative.grounded is True and narrative.author == _settings(fake.host).model
    assert "study category C" in narrative.text
    body = fake.raw_bodies[-1].decode()
    assert "mammo_density" in body and "BI-RADS breast composition" in body
    fake.replies = [good.replace("study category C", "study category D")] * 2
    refused = narrate(findings, _settings(fake.host))
    assert refused.grounded is False and "density category D is not in the findings" in (
        refused.note or "")
