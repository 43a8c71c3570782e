"""The change since a prior visit: what the state remembers of a patient's studies (a salted
key, never the ID; the latest earlier-dated study; a re-run replacing its rows; retention),
how a dermoscopy reading is compared with its lesion's prior visit, and the narrative's
grounding of both dates and of each change."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import sqlalchemy as sa
from pydicom.dataset import Dataset

from radlens import history
from radlens.agent.retention import DAY_S, RetentionSweeper
from radlens.audit import AuditLog
from radlens.config import PriorVisitSettings, RetentionSettings
from radlens.db import DB_FILENAME, Database, observations
from radlens.findings import ImageInfo, ImageRef, ModelRef, StudyFindings
from radlens.history import Observation, ObservedItem, PatientHistory
from radlens.reporting import grounding
from radlens.reporting.prompt import StudyFacts
from radlens.reporting.template import template_narrative
from radlens.tasks.dermoscopy import prior as dermoscopy_prior
from radlens.tasks.dermoscopy.analyser import lesion_identity, lesion_key
from radlens.tasks.dermoscopy.findings import AbcMeasurements, DermoscopyReading
from radlens.tasks.dermoscopy.report import facts, pdf_table

KEY = "site=back|laterality=none|lesion_id=2"
MODEL = ModelRef(name="radlens-dermoscopy-phantom", version="0.1.0", architecture="ViT")


@pytest.fixture
def db(tmp_path: Path) -> Database:
    return Database(tmp_path / DB_FILENAME)


def _header(path: Path, patient_id: str | None, study_date: str | None,
            issuer: str | None = None) -> Path:
    ds = Dataset()
    if patient_id is not None:
        ds.PatientID = patient_id
    if issuer is not None:
        ds.IssuerOfPatientID = issuer
    if study_date is not None:
        ds.StudyDate = study_date
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.77.1.4"
    ds.SOPInstanceUID = "1.2.3.4"
    ds.file_meta = Dataset()
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.1"
    ds.save_as(path, enforce_file_format=True)
    return path


def test_the_patient_is_a_salted_key_never_the_id(db, tmp_path):
    key = history.subject_key(db, "PAT-1", None)
    assert key == history.subject_key(db, "PAT-1", None)
    assert key != history.subject_key(db, "PAT-1", "HOSPITAL-B")  # the issuer is part of it
    assert "PAT-1" not in key
    other = Database(tmp_path / "other" / DB_FILENAME)
    assert history.subject_key(other, "PAT-1", None) != key  # another installation's salt


def test_the_patient_comes_from_the_first_header_that_reads(tmp_path):
    corrupt = tmp_path / "corrupt.dcm"
    corrupt.write_bytes(b"not DICOM at all")
    good = _header(tmp_path / "good.dcm", "PAT-2", "20250301", issuer="H")
    patient = history.patient_of([corrupt, good])
    assert (patient.patient_id, patient.issuer, patient.study_date) == ("PAT-2", "H",
                                                                        "2025-03-01")
    assert history.patient_of([corrupt]).patient_id is None
    assert history.iso_date("20251341") is None  # not a date: no comparison, no guess


def _remember(db: Database, tmp_path: Path, study: str, date: str, job: int,
              values: dict[str, object]) -> PatientHistory:
    path = _header(tmp_path / f"{study}.dcm", "PAT-3", date)
    found = history.load(db, study, [path])
    history.record(db, job, found, [("dermoscopy", ObservedItem(KEY, values))])
    return found


def test_the_prior_is_the_latest_earlier_dated_study_of_the_same_lesion(db, tmp_path):
    _remember(db, tmp_path, "1.1", "20240101", 1, {"asymmetry": 0.1})
    _remember(db, tmp_path, "1.2", "20250301", 2, {"asymmetry": 0.2})
    _remember(db, tmp_path, "1.4", "20251201", 3, {"asymmetry": 0.9})  # later than the study
    now = history.load(db, "1.3", [_header(tmp_path / "now.dcm", "PAT-3", "20250901")])
    found = now.prior("dermoscopy", KEY)
    assert found is not None and (found.study_instance_uid, found.values) == (
        "1.2", {"asymmetry": 0.2})
    assert now.prior("dermoscopy", "site=arm|laterality=L|lesion_id=1") is None
    assert now.prior("lesions", KEY) is None  # another task's observations are its own
    undated = history.load(db, "1.5", [_header(tmp_path / "undated.dcm", "PAT-3", None)])
    assert undated.prior("dermoscopy", KEY) is None  # both dates, or no comparison
    other = history.load(db, "1.6", [_header(tmp_path / "other.dcm", "PAT-4", "20250901")])
    assert other.observations == ()


def test_a_study_run_again_replaces_what_it_recorded(db, tmp_path):
    _remember(db, tmp_path, "2.1", "20250301", 1, {"asymmetry": 0.2})
    _remember(db, tmp_path, "2.1", "20250301", 2, {"asymmetry": 0.25})
    rows = db.rows(sa.select(observations))
    assert [(r["job_id"], r["study_date"]) for r in rows] == [(2, "2025-03-01")]
    assert "PAT-3" not in str([dict(r) for r in rows])


def test_a_study_without_a_patient_id_is_neither_compared_nor_remembered(db, tmp_path):
    found = history.load(db, "3.1", [_header(tmp_path / "anon.dcm", None, "20250301")])
    assert found.subject is None
    assert history.record(db, 1, found, [("dermoscopy", ObservedItem(KEY, {}))]) == 0
    assert db.scalar(sa.select(sa.func.count()).select_from(observations)) == 0


def test_retention_removes_observations_past_history_days(db, tmp_path):
    _remember(db, tmp_path, "4.1", "20200101", 1, {"asymmetry": 0.2})
    sweeper = RetentionSweeper(db, tmp_path, RetentionSettings(keep_free_mb=0, history_days=30),
                               audit_log=AuditLog(tmp_path / "audit.jsonl"))
    assert sweeper.plan(time.time()).observations == 0
    later = time.time() + 31 * DAY_S
    assert sweeper.plan(later).observations == 1
    assert sweeper.sweep(later).observations == 1
    assert db.scalar(sa.select(sa.func.count()).select_from(observations)) == 0


# ---- the dermoscopy task's comparison ------------------------------------------------------

def test_the_lesion_is_matched_by_the_sites_rule():
    header = Dataset()
    header.SeriesDescription = "dermoscopy, lesion 2 (back)"
    region = Dataset()
    region.CodeMeaning = "Back"
    header.AnatomicRegionSequence = [region]
    identity = lesion_identity(header, PriorVisitSettings())
    assert identity == ("Back", None, "2")
    assert lesion_key(PriorVisitSettings(), *identity) == KEY
    assert lesion_key(PriorVisitSettings(enabled=False), *identity) is None
    assert lesion_key(PriorVisitSettings(), "Back", None, None) is None  # no identifier
    assert lesion_key(PriorVisitSettings(match_on=["site", "laterality"]), "Back", "L",
                      None) == "site=back|laterality=L"
    header.SeriesDescription = "naevus #7"
    assert lesion_identity(header, PriorVisitSettings(lesion_id_pattern=r"#(\d+)"))[2] == "7"
    with pytest.raises(ValueError, match="one group"):
        PriorVisitSettings(lesion_id_pattern=r"lesion \w+")
    with pytest.raises(ValueError, match="keyword"):
        PriorVisitSettings(lesion_id_attribute="NoSuchAttribute")


def _reading(asymmetry: float, probability: float, diameter: float | None = 6.0,
             key: str | None = KEY) -> DermoscopyReading:
    return DermoscopyReading(
        model=MODEL, melanoma_probability=probability,
        assessment="melanoma" if probability >= 0.5 else "nevus",
        measurements=AbcMeasurements(
            asymmetry=asymmetry, asymmetry_axes=(asymmetry, asymmetry),
            border_per_mm=None if diameter is None else 0.4, border_per_pixel=0.05,
            border_turns=1.1, hue_sd=0.05, saturation_sd=0.1, value_sd=0.1, colour_score=0.25,
            diameter_mm=diameter, area_mm2=None,
            levels={"asymmetry": 1 if asymmetry < 0.2 else 4, "border": 1, "colour": 2,
                    "diameter_mm": None if diameter is None else 3}),
        descriptors=[], refined=True, refiner="random walker", lesion_pixels=400,
        site="Back", lesion_id="2", lesion_key=key)


def _findings(reading: DermoscopyReading, study: str = "5.2") -> StudyFindings:
    ref = ImageRef(study_instance_uid=study, series_instance_uid=f"{study}.1",
                   sop_instance_uid=f"{study}.1.1",
                   sop_class_uid="1.2.840.10008.5.1.4.1.1.77.1.4")
    info = ImageInfo(ref=ref, modality="DMS", photometric_interpretation="RGB",
                     transfer_syntax_uid="1.2.840.10008.1.2.1", rows=64, columns=64, frames=1,
                     channels=3, spacing=None, analyses=[reading])
    return StudyFindings(study_instance_uid=study, job_id=2, revision=1,
                         radlens_version="test", model=MODEL, images=[info])


def _history(values: dict[str, object], study_date: str = "2025-09-01") -> PatientHistory:
    return PatientHistory("subject", "5.2", study_date, (Observation(
        task="dermoscopy", item=KEY, study_instance_uid="5.1", study_date="2025-03-01",
        values=values, job_id=1),))


def _compared(now: DermoscopyReading, then: DermoscopyReading, **kw: str) -> StudyFindings:
    return dermoscopy_prior.compare_with_prior(
        _findings(now), _history(dermoscopy_prior.remembered(then), **kw))


def test_a_reading_gets_the_change_since_its_lesions_prior_visit():
    findings = _compared(_reading(0.31, 0.64, diameter=7.5), _reading(0.12, 0.2))
    reading = findings.images[0].analyses[0]
    assert isinstance(reading, DermoscopyReading) and reading.prior is not None
    prior = reading.prior
    assert (prior.prior_study_date, prior.study_date, prior.interval_days) == (
        "2025-03-01", "2025-09-01", 184)
    assert prior.prior_study_instance_uid == "5.1"
    assert prior.changes["asymmetry"].change == pytest.approx(0.19)
    assert prior.changes["diameter_mm"].change == pytest.approx(1.5)
    assert prior.changes["melanoma_probability"].change == pytest.approx(0.44)
    assert "area_mm2" not in prior.changes  # neither visit measured it
    assert prior.prior_assessment == "nevus" and prior.prior_levels["asymmetry"] == 1
    [item] = dermoscopy_prior.observations(findings)
    assert item.item == KEY and item.values["asymmetry"] == 0.31


def test_without_a_prior_or_a_key_nothing_is_compared():
    unchanged = _findings(_reading(0.31, 0.64, key=None))
    assert dermoscopy_prior.compare_with_prior(unchanged, _history({})) is unchanged
    assert dermoscopy_prior.observations(unchanged) == []
    no_date = _findings(_reading(0.31, 0.64))
    history_without_date = PatientHistory("subject", "5.2", None, _history({}).observations)
    assert dermoscopy_prior.compare_with_prior(no_date, history_without_date) is no_date


def test_a_change_of_spacing_compares_only_what_both_visits_measured():
    findings = _compared(_reading(0.31, 0.64, diameter=7.5), _reading(0.12, 0.2, diameter=None))
    prior = findings.images[0].analyses[0].prior
    assert "diameter_mm" not in prior.changes and "border_per_mm" not in prior.changes
    assert "asymmetry" in prior.changes


def test_the_narrative_states_both_dates_and_passes_its_grounding():
    findings = _compared(_reading(0.31, 0.64, diameter=7.5), _reading(0.12, 0.2))
    narrative = template_narrative(findings)
    assert ("Change since the prior visit: 2025-03-01 to 2025-09-01 (184 days): asymmetry "
            "0.12 to 0.31 (+0.19)") in narrative.text
    assert "melanoma probability 20% to 64% (+44 points)" in narrative.text
    assert "diameter 6.0 mm to 7.5 mm (+1.5 mm)" in narrative.text
    stated = StudyFacts.from_findings(findings)
    assert grounding.check(narrative.text, stated) == []
    table = pdf_table(findings)
    assert table is not None and "2025-03-01 to 2025-09-01 (184 days)" in table.footnote


@pytest.mark.parametrize(("text", "expected"), [
    ("The lesion was seen on 2024-11-02.", "an identifier or date"),
    ("Since the prior visit the diameter decreased.", "diameter is said to fall"),
    ("Since the prior visit the asymmetry fell.", "asymmetry is said to fall"),
    ("Asymmetry rose from 0.12 to 0.35 since the prior visit.", "the number 0.35"),
])
def test_grounding_refuses_another_date_or_a_change_the_findings_do_not_hold(text, expected):
    stated = StudyFacts.from_findings(_compared(_reading(0.31, 0.64, diameter=7.5),
                                                _reading(0.12, 0.2)))
    found = grounding.check(text, stated)
    assert any(expected in v for v in found), found


def test_grounding_refuses_a_change_without_a_prior_visit():
    findings = _findings(_reading(0.31, 0.64))
    stated = StudyFacts.from_findings(findings)
    assert grounding.check(template_narrative(findings).text, stated) == []
    assert grounding.check("The lesion is unchanged.", stated)
    found = grounding.check("The lesion has grown since the prior visit.", stated)
    assert any("no prior visit" in v for v in found), found
    assert facts(_findings(_reading(0.31, 0.64))).photographs[0].prior is None
