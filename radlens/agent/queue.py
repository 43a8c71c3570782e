"""The job queue, kept in SQLite and kept narrow so a distributed engine can replace it later.

A job covers the instances of one study that were pending when the study was declared complete;
instances arriving later make a new job. States: queued -> running -> done | failed.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from radlens.db import Database
from radlens.logs import kv

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Job:
    id: int
    study_instance_uid: str
    attempts: int


@dataclass(frozen=True)
class JobInstance:
    sop_instance_uid: str
    sop_class_uid: str
    series_instance_uid: str
    transfer_syntax_uid: str
    path: Path
    calling_aet: str | None = None  # who sent it (routing rules may use it)


@dataclass(frozen=True)
class PendingStudy:
    study_instance_uid: str
    first_received_at: float
    last_received_at: float


class JobQueue:
    """Creates, claims and finishes study jobs; ``wakeup`` is set whenever a job is queued."""

    def __init__(self, db: Database, data_dir: Path) -> None:
        self.db = db
        self.data_dir = data_dir
        self.wakeup = threading.Event()

    def create_job_for_pending(self, study_uid: str) -> int | None:
        """Turn the study's pending instances into one queued job (None if nothing is pending)."""
        with self.db.transaction() as conn:
            pending = conn.execute(
                "SELECT COUNT(*) FROM instances WHERE study_instance_uid = ? AND job_id IS NULL",
                (study_uid,),
            ).fetchone()[0]
            if not pending:
                return None
            job_id = conn.execute(
                "INSERT INTO jobs (study_instance_uid, state, created_at) VALUES (?, 'queued', ?)",
                (study_uid, time.time()),
            ).lastrowid
            conn.execute(
                "UPDATE instances SET job_id = ? WHERE study_instance_uid = ? AND job_id IS NULL",
                (job_id, study_uid),
            )
        log.info("study complete, job queued", extra=kv(study=study_uid, job=job_id,
                                                         instances=pending))
        self.wakeup.set()
        return int(job_id)  # type: ignore[arg-type]

    def claim_next(self) -> Job | None:
        with self.db.transaction() as conn:
            row = conn.execute(
                "UPDATE jobs SET state = 'running', started_at = ?, attempts = attempts + 1"
                " WHERE id = (SELECT id FROM jobs WHERE state = 'queued' ORDER BY id LIMIT 1)"
                " RETURNING id, study_instance_uid, attempts",
                (time.time(),),
            ).fetchone()
        if row is None:
            return None
        return Job(id=row["id"], study_instance_uid=row["study_instance_uid"],
                   attempts=row["attempts"])

    def instances(self, job: Job) -> list[JobInstance]:
        """Every instance of the job's study received up to this job: a later job re-processes
        the whole study as a new revision, not just the late arrivals."""
        rows = self.db.conn.execute(
            "SELECT sop_instance_uid, sop_class_uid, series_instance_uid, transfer_syntax_uid,"
            " path, calling_aet FROM instances WHERE study_instance_uid = ? AND job_id <= ?"
            " ORDER BY series_instance_uid, received_at",
            (job.study_instance_uid, job.id),
        ).fetchall()
        return [JobInstance(r["sop_instance_uid"], r["sop_class_uid"], r["series_instance_uid"],
                            r["transfer_syntax_uid"], self.data_dir / r["path"],
                            r["calling_aet"]) for r in rows]

    def revision(self, job: Job) -> int:
        """1 for a study's first job, 2 for the next, and so on."""
        return int(self.db.conn.execute(
            "SELECT COUNT(*) FROM jobs WHERE study_instance_uid = ? AND id <= ?",
            (job.study_instance_uid, job.id),
        ).fetchone()[0])

    def finish(self, job_id: int, *, error: str | None = None) -> None:
        """Done (an earlier attempt's error is cleared) or failed for good with ``error``."""
        state = "failed" if error else "done"
        with self.db.transaction() as conn:
            conn.execute(
                "UPDATE jobs SET state = ?, finished_at = ?, error = ? WHERE id = ?",
                (state, time.time(), error, job_id),
            )

    def retry(self, job_id: int, *, error: str) -> None:
        """Back to the queue after a failure (the error stays visible until it succeeds)."""
        with self.db.transaction() as conn:
            conn.execute("UPDATE jobs SET state = 'queued', started_at = NULL, error = ?"
                         " WHERE id = ?", (error, job_id))
        self.wakeup.set()

    def requeue_interrupted(self) -> int:
        """Jobs left 'running' by a crash run again (their outputs are written atomically)."""
        with self.db.transaction() as conn:
            count = conn.execute(
                "UPDATE jobs SET state = 'queued', started_at = NULL WHERE state = 'running'"
            ).rowcount
        if count:
            log.info("re-queued jobs interrupted by a stop", extra=kv(count=count))
            self.wakeup.set()
        return count

    def pending_studies(self) -> list[PendingStudy]:
        rows = self.db.conn.execute(
            "SELECT study_instance_uid, MIN(received_at) AS first, MAX(received_at) AS last"
            " FROM instances WHERE job_id IS NULL GROUP BY study_instance_uid"
        ).fetchall()
        return [PendingStudy(r["study_instance_uid"], r["first"], r["last"]) for r in rows]
