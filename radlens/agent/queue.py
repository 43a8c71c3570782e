"""The job queue, kept in the state database and kept narrow.

A job covers the instances of one study that were pending when the study was declared complete;
instances arriving later make a new job. States: queued -> running -> done | failed.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pydicom
import sqlalchemy as sa
from sqlalchemy.engine import Connection

from radlens.agent.delivery import StudySource
from radlens.db import Database, instances, jobs, outbox
from radlens.dicom_io.scu import OutgoingFile
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


class _LostTheRace(Exception):
    """Another node got there first (queued the study's job, took over the job): roll back."""


class JobQueue:
    """Creates, claims and finishes study jobs; ``wakeup`` is set whenever a job is queued.

    A claim is a lease: the node holds the job until ``lease_until`` and renews it while it
    works (``renew``); a job whose lease ran out (its node died) is claimable again, and the
    node that lost it can no longer finish it. On PostgreSQL claims skip rows another node is
    claiming at that moment (``FOR UPDATE SKIP LOCKED``); SQLite has one writer at a time.
    """

    def __init__(self, db: Database, data_dir: Path, *, node_id: str | None = None,
                 lease_s: float = 60.0) -> None:
        self.db = db
        self.data_dir = data_dir
        self.node_id = node_id
        self.lease_s = lease_s
        self.wakeup = threading.Event()

    def create_job_for_pending(self, study_uid: str, *, quiet_since: float | None = None,
                               open_since: float | None = None) -> int | None:
        """Turn the study's pending instances into one queued job (None if nothing is pending).

        With ``quiet_since`` (a sweeper's call) only if the study is still complete: its last
        pending instance arrived before ``quiet_since``, or its first before ``open_since``.
        The job takes the instances the decision saw, by their arrival time, and only if no
        other node took them first, so when several nodes sweep at once exactly one wins.
        """
        try:
            job_id, taken = self._create_job(study_uid, quiet_since, open_since)
        except _LostTheRace:
            return None
        if job_id is None:
            return None
        log.info("study complete, job queued", extra=kv(study=study_uid, job=job_id,
                                                         instances=taken))
        self.wakeup.set()
        return job_id

    def _create_job(self, study_uid: str, quiet_since: float | None, open_since: float | None
                    ) -> tuple[int | None, int]:
        c = instances.c
        pending_of_study = sa.and_(c.study_instance_uid == study_uid, c.job_id.is_(None))
        with self.db.transaction() as conn:
            pending, first, last = conn.execute(
                sa.select(sa.func.count(), sa.func.min(c.received_at), sa.func.max(c.received_at))
                .where(pending_of_study)).one()
            if not pending:
                return None, 0
            if quiet_since is not None and last > quiet_since and \
                    (open_since is None or first > open_since):
                return None, 0  # an instance arrived since the study looked quiet
            job_id = conn.execute(
                sa.insert(jobs).values(study_instance_uid=study_uid, state="queued",
                                       created_at=time.time()).returning(jobs.c.id)
            ).scalar_one()
            taken = conn.execute(sa.update(instances)
                                 .where(pending_of_study, c.received_at <= last)
                                 .values(job_id=job_id)).rowcount
            if not taken:  # another node's job has them: ours must not exist
                raise _LostTheRace
        return int(job_id), taken

    def sweep(self, quiet_period_s: float, max_wait_s: float, now: float | None = None
              ) -> list[int]:
        """Queue a job for every pending study quiet for ``quiet_period_s`` or open for
        ``max_wait_s``: the cluster's study assembly, which any node may run at any time."""
        now = time.time() if now is None else now
        queued = []
        for study in self.pending_studies():
            if study.last_received_at <= now - quiet_period_s or \
                    study.first_received_at <= now - max_wait_s:
                job_id = self.create_job_for_pending(
                    study.study_instance_uid, quiet_since=now - quiet_period_s,
                    open_since=now - max_wait_s)
                if job_id is not None:
                    queued.append(job_id)
        return queued

    def _claimable(self, now: float) -> sa.ColumnElement[bool]:
        return sa.or_(jobs.c.state == "queued",
                      sa.and_(jobs.c.state == "running", jobs.c.lease_until < now))

    def claim_next(self) -> Job | None:
        now = time.time()
        candidate = (sa.select(jobs.c.id).where(self._claimable(now)).order_by(jobs.c.id)
                     .limit(1).with_for_update(skip_locked=True).scalar_subquery())
        with self.db.transaction() as conn:
            row = conn.execute(
                sa.update(jobs).where(jobs.c.id == candidate, self._claimable(now))
                .values(state="running", started_at=now, attempts=jobs.c.attempts + 1,
                        claimed_by=self.node_id, lease_until=now + self.lease_s)
                .returning(jobs.c.id, jobs.c.study_instance_uid, jobs.c.attempts)
            ).mappings().first()
        if row is None:
            return None
        return Job(id=row["id"], study_instance_uid=row["study_instance_uid"],
                   attempts=row["attempts"])

    def renew(self, job_ids: list[int]) -> list[int]:
        """Extend this node's leases on ``job_ids``; returns the jobs it still holds."""
        if not job_ids:
            return []
        with self.db.transaction() as conn:
            held = conn.execute(
                sa.update(jobs).where(jobs.c.id.in_(job_ids), jobs.c.state == "running",
                                      self._ours())
                .values(lease_until=time.time() + self.lease_s).returning(jobs.c.id)
            ).scalars().all()
        lost = sorted(set(job_ids) - set(held))
        if lost:
            log.warning("job leases lost: another node may run them", extra=kv(jobs=lost))
        return list(held)

    def _ours(self) -> sa.ColumnElement[bool]:
        """Rows this node holds (every row, for a node without an id: the single agent)."""
        return jobs.c.claimed_by == self.node_id if self.node_id is not None else sa.true()

    def instances(self, job: Job) -> list[JobInstance]:
        """Every instance of the job's study received up to this job: a later job re-processes
        the whole study as a new revision, not just the late arrivals."""
        c = instances.c
        rows = self.db.rows(
            sa.select(c.sop_instance_uid, c.sop_class_uid, c.series_instance_uid,
                      c.transfer_syntax_uid, c.path, c.calling_aet)
            .where(c.study_instance_uid == job.study_instance_uid, c.job_id <= job.id)
            .order_by(c.series_instance_uid, c.received_at))
        return [JobInstance(r["sop_instance_uid"], r["sop_class_uid"], r["series_instance_uid"],
                            r["transfer_syntax_uid"], self.data_dir / r["path"],
                            r["calling_aet"]) for r in rows]

    def last_received(self, job: Job) -> float | None:
        """When the last instance of the job's own arrived (the start of its turnaround)."""
        return self.db.scalar(sa.select(sa.func.max(instances.c.received_at))
                              .where(instances.c.job_id == job.id))

    def study_source(self, conn: Connection, job_id: int, data_dir: Path
                     ) -> tuple[StudySource, list[OutgoingFile]]:
        """Where a job's study came from and what it holds (calling AE titles; modality and
        description from one header per series, at most 20), and its received instances as
        files to forward."""
        rows = conn.execute(sa.select(
            instances.c.sop_instance_uid, instances.c.sop_class_uid,
            instances.c.transfer_syntax_uid, instances.c.calling_aet, instances.c.path,
            instances.c.series_instance_uid).where(instances.c.job_id == job_id)).all()
        modalities: set[str] = set()
        description = ""
        one_per_series = {row.series_instance_uid: row.path for row in rows}
        for relative in list(one_per_series.values())[:20]:
            try:
                header = pydicom.dcmread(data_dir / relative, stop_before_pixels=True,
                                         specific_tags=["Modality", "StudyDescription"])
            except Exception:  # an unreadable header chooses nothing; its job said why
                continue
            modalities.add(str(header.get("Modality", "") or ""))
            description = description or str(header.get("StudyDescription", "") or "")
        files = [OutgoingFile(data_dir / row.path, row.sop_class_uid, row.sop_instance_uid,
                              row.transfer_syntax_uid) for row in rows]
        from radlens.agent.pipeline import FINDINGS_FILE, RESULTS_DIR  # it imports this module

        tasks: frozenset[str] = frozenset()
        study = conn.execute(sa.select(jobs.c.study_instance_uid)
                             .where(jobs.c.id == job_id)).scalar_one_or_none()
        try:  # what ran on the study: the worker wrote its findings before ending the job
            tasks = StudySource.tasks_of(json.loads(
                (data_dir / RESULTS_DIR / str(study) / FINDINGS_FILE).read_text()))
        except (OSError, ValueError):
            pass
        source = StudySource(frozenset(row.calling_aet for row in rows),
                             frozenset(m for m in modalities if m), description, tasks)
        return source, files

    def destinations_of_earlier_jobs(self, conn: Connection, job_id: int) -> set[str]:
        """The destinations that got (or are to get) outputs of the study's earlier jobs."""
        study = sa.select(jobs.c.study_instance_uid).where(jobs.c.id == job_id).scalar_subquery()
        earlier = sa.select(jobs.c.id).where(jobs.c.study_instance_uid == study,
                                             jobs.c.id < job_id)
        return {str(r[0]) for r in conn.execute(
            sa.select(outbox.c.destination).where(outbox.c.job_id.in_(earlier),
                                                  outbox.c.state.in_(("sent", "pending")))
            .distinct())}

    def revision(self, job: Job) -> int:
        """1 for a study's first job, 2 for the next, and so on."""
        return int(self.db.scalar(
            sa.select(sa.func.count()).select_from(jobs)
            .where(jobs.c.study_instance_uid == job.study_instance_uid, jobs.c.id <= job.id)))

    def finish(self, job_id: int, *, error: str | None = None,
               also: Callable[[Connection], object] | None = None) -> bool:
        """Done (an earlier attempt's error is cleared) or failed for good with ``error``;
        ``also`` adds to the same transaction (the job's outputs into the outbox), so a job is
        never done without them, nor are they queued twice by a job run again. False, and
        nothing changed, when this node no longer holds the job."""
        try:
            with self.db.transaction() as conn:
                changed = conn.execute(sa.update(jobs).where(jobs.c.id == job_id, self._ours())
                                       .values(state="failed" if error else "done",
                                               finished_at=time.time(), error=error,
                                               lease_until=None)).rowcount
                if not changed:
                    raise _LostTheRace
                if also is not None:
                    also(conn)
        except _LostTheRace:
            return self._held(job_id, 0)
        return True

    def retry(self, job_id: int, *, error: str) -> bool:
        """Back to the queue after a failure (the error stays visible until it succeeds).
        False, and nothing changed, when this node no longer holds the job."""
        with self.db.transaction() as conn:
            changed = conn.execute(sa.update(jobs).where(jobs.c.id == job_id, self._ours())
                                   .values(state="queued", started_at=None, error=error,
                                           claimed_by=None, lease_until=None)).rowcount
        self.wakeup.set()
        return self._held(job_id, changed)

    def _held(self, job_id: int, changed: int) -> bool:
        if not changed:
            log.warning("job no longer held by this node: its lease ran out and another node "
                        "took it", extra=kv(job=job_id, node=self.node_id))
        return bool(changed)

    def requeue_interrupted(self) -> int:
        """Jobs left 'running' by a crash run again (their outputs are written atomically).
        For the single agent only: in a cluster the other nodes' running jobs are theirs, and
        a dead node's jobs come back when their leases run out."""
        with self.db.transaction() as conn:
            count = conn.execute(sa.update(jobs).where(jobs.c.state == "running").values(
                state="queued", started_at=None, claimed_by=None, lease_until=None)).rowcount
        if count:
            log.info("re-queued jobs interrupted by a stop", extra=kv(count=count))
            self.wakeup.set()
        return count

    def pending_studies(self) -> list[PendingStudy]:
        c = instances.c
        rows = self.db.rows(
            sa.select(c.study_instance_uid, sa.func.min(c.received_at).label("first"),
                      sa.func.max(c.received_at).label("last"))
            .where(c.job_id.is_(None)).group_by(c.study_instance_uid))
        return [PendingStudy(r["study_instance_uid"], r["first"], r["last"]) for r in rows]
