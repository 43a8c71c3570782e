"""A patient's earlier studies, as the tasks remember them: the change since a prior visit.

A task may remember a few values of each thing it observed in a study (a skin lesion's ABC(D)
and melanoma probability, keyed by its site and number) and, when the same patient's later
study observes the same thing, give the change with both dates. The state keeps them in the
``observations`` table, keyed by a salted hash of the patient (issuer and Patient ID, never
the ID itself; the salt is this installation's, so two sites' tables cannot be joined), and
keeps them ``retention.history_days`` (a follow-up interval is months, longer than the
state's job rows are kept).

The job runner reads the patient from the study's first readable header and loads the
patient's observations before the job (``load``), the pipeline lets each task compare its
findings with them (``Task.compare_with_prior``), and the runner records what each task
observed once the findings are written (``record``). No library keeps longitudinal
observations of DICOM findings (dcmqi and highdicom write single studies; Orthanc's index has
no place for derived values), so this is ours.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import json
import logging
import secrets
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from radlens.logs import kv

if TYPE_CHECKING:
    from radlens.db import Database

log = logging.getLogger(__name__)

# At most this many observations of one patient are read before a job: a bound, however many
# studies a patient has (a patient seen weekly for years has a few hundred).
MAX_OBSERVATIONS = 2000
SALT_NAME = "subject_salt"


@dataclass(frozen=True)
class ObservedItem:
    """What a task remembers of one thing it observed in a study: ``item`` names the thing
    the same way in every study of the patient (for example ``site=back|side=L|lesion=2``),
    ``values`` are JSON-serialisable."""

    item: str
    values: dict[str, Any]


@dataclass(frozen=True)
class Observation:
    """One remembered observation of an earlier study of the patient."""

    task: str
    item: str
    study_instance_uid: str
    study_date: str | None  # ISO 8601 (YYYY-MM-DD), None when the study stated none
    values: dict[str, Any]
    job_id: int


@dataclass(frozen=True)
class PatientHistory:
    """The patient of the study being run and their earlier observations. ``subject`` is
    None when the study names no patient: nothing is compared or remembered then."""

    subject: str | None
    study_instance_uid: str
    study_date: str | None
    observations: tuple[Observation, ...] = field(default_factory=tuple)

    def prior(self, task: str, item: str) -> Observation | None:
        """The latest observation of ``item`` in a study dated before this one. A study
        without a date is neither compared nor compared with: the change is stated with both
        dates or not at all."""
        if self.subject is None or self.study_date is None:
            return None
        earlier = [o for o in self.observations
                   if o.task == task and o.item == item and o.study_date is not None
                   and o.study_date < self.study_date
                   and o.study_instance_uid != self.study_instance_uid]
        return max(earlier, key=lambda o: (o.study_date or "", o.job_id), default=None)


def iso_date(value: object) -> str | None:
    """A DICOM DA (YYYYMMDD) as YYYY-MM-DD; None when absent or not a real date."""
    text = str(value or "").strip()
    try:
        return dt.datetime.strptime(text, "%Y%m%d").date().isoformat()
    except ValueError:
        return None


def days_between(earlier: str, later: str) -> int:
    return (dt.date.fromisoformat(later) - dt.date.fromisoformat(earlier)).days


@dataclass(frozen=True)
class StudyPatient:
    """Who a study is of, as its header says: the Patient ID, its issuer, the study date."""

    patient_id: str | None
    issuer: str | None
    study_date: str | None


def patient_of(paths: Iterable[Path]) -> StudyPatient:
    """The patient of the first header that reads: every instance of a study is of one
    patient, and a file that does not read costs only its own image (the pipeline says why)."""
    from pydicom import dcmread
    from pydicom.errors import InvalidDicomError

    for path in paths:
        try:
            ds = dcmread(path, stop_before_pixels=True,
                         specific_tags=["PatientID", "IssuerOfPatientID", "StudyDate"])
        except (OSError, InvalidDicomError, ValueError, EOFError, KeyError) as exc:
            log.debug("header unreadable for the patient", extra=kv(path=str(path),
                                                                     error=str(exc)))
            continue
        patient_id = str(ds.get("PatientID", "") or "").strip() or None
        issuer = str(ds.get("IssuerOfPatientID", "") or "").strip() or None
        return StudyPatient(patient_id, issuer, iso_date(ds.get("StudyDate")))
    return StudyPatient(None, None, None)


def _salt(db: Database) -> bytes:
    """This installation's salt, made on first use (nodes sharing a state share it)."""
    import sqlalchemy as sa

    from radlens.db import installation

    select = sa.select(installation.c.value).where(installation.c.name == SALT_NAME)
    value = db.scalar(select)
    if value is None:
        try:
            with db.transaction() as conn:
                conn.execute(sa.insert(installation).values(name=SALT_NAME,
                                                            value=secrets.token_hex(32)))
        except sa.exc.IntegrityError:  # another node made it first: use theirs
            pass
        value = db.scalar(select)
    return bytes.fromhex(str(value))


def subject_key(db: Database, patient_id: str, issuer: str | None) -> str:
    """The patient as the state keys them: HMAC-SHA256 of the issuer and the ID under this
    installation's salt. A pseudonym, not anonymisation: whoever holds the salt and a list of
    IDs can tell them apart."""
    message = f"{issuer or ''}\x1f{patient_id}".encode()
    return hmac.new(_salt(db), message, hashlib.sha256).hexdigest()


def load(db: Database, study_instance_uid: str, paths: Sequence[Path]) -> PatientHistory:
    """The study's patient and their observations of other studies, newest first, bounded."""
    import sqlalchemy as sa

    from radlens.db import observations

    patient = patient_of(paths)
    if patient.patient_id is None:
        return PatientHistory(None, study_instance_uid, patient.study_date)
    subject = subject_key(db, patient.patient_id, patient.issuer)
    rows = db.rows(sa.select(observations)
                   .where(observations.c.subject == subject,
                          observations.c.study_instance_uid != study_instance_uid)
                   .order_by(observations.c.id.desc()).limit(MAX_OBSERVATIONS))
    found = tuple(Observation(task=row["task"], item=row["item"],
                              study_instance_uid=row["study_instance_uid"],
                              study_date=row["study_date"], values=json.loads(row["observed"]),
                              job_id=int(row["job_id"])) for row in rows)
    return PatientHistory(subject, study_instance_uid, patient.study_date, found)


def record(db: Database, job_id: int, history: PatientHistory,
           observed: Sequence[tuple[str, ObservedItem]]) -> int:
    """What each task observed in this study, in place of what an earlier run of the same
    study recorded (one transaction). Returns the number of rows written."""
    import sqlalchemy as sa

    from radlens.db import observations

    if history.subject is None:
        return 0
    now = time.time()
    with db.transaction() as conn:
        conn.execute(sa.delete(observations).where(
            observations.c.subject == history.subject,
            observations.c.study_instance_uid == history.study_instance_uid))
        if observed:
            conn.execute(sa.insert(observations), [
                {"subject": history.subject, "task": task, "item": item.item,
                 "study_instance_uid": history.study_instance_uid,
                 "study_date": history.study_date, "job_id": job_id,
                 "observed": json.dumps(item.values, sort_keys=True), "created_at": now}
                for task, item in observed])
    if observed:
        log.info("observations recorded", extra=kv(job=job_id, count=len(observed)))
    return len(observed)


def remove_older_than(db: Database, days: float, *, now: float | None = None) -> int:
    """Observations recorded more than ``days`` ago (the retention sweep's)."""
    import sqlalchemy as sa

    from radlens.db import observations

    cutoff = (time.time() if now is None else now) - days * 86400.0
    with db.transaction() as conn:
        return int(conn.execute(sa.delete(observations).where(
            observations.c.created_at < cutoff)).rowcount or 0)
