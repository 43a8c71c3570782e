"""Retention: what the node removes, and when, so that it can be left running for a year.

A study is *finished* when none of its instances waits for a job, none of its jobs is queued or
running, and none of its instances forwarded is undelivered: then its received instances may go,
once it has been finished for ``retention.spool_days``. Its results folder may go after
``retention.results_days`` if, besides, none of its outputs is undelivered. The quarantine is
kept ``quarantine_days``; the state's rows of jobs finished ``state_days`` ago go with their
analyses, deliveries and instances; a patient's remembered observations (the change since a
prior visit, radlens.history) go ``history_days`` after they were recorded. A disk budget
(``max_disk_mb``, ``keep_free_mb``) removes finished studies oldest first, whatever their age,
until the data folder fits again: received instances first, then results.

Removal never races a sender: an instance's file is unlinked and its row deleted in one write
transaction that first checks the row still belongs to a finished job, and the spool stores an
instance again if its row went away meanwhile (``Spool._stored_again``). A results folder is
renamed aside (atomic) before it is deleted, so a job starting for the study meanwhile writes a
fresh one. No library does this: apscheduler only times the sweep.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from radlens import audit, history
from radlens.agent.pipeline import RESULTS_DIR
from radlens.audit import AuditLog, NullAuditLog
from radlens.config import RetentionSettings
from radlens.db import (
    Database,
    frame_analyses,
    instances,
    jobs,
    lesion_analyses,
    nodes,
    observations,
    outbox,
    quarantine,
)
from radlens.dicom_io.spool import QUARANTINE_DIR, SPOOL_DIR
from radlens.logs import kv

log = logging.getLogger(__name__)

TRASH_PREFIX = ".removing-"
DAY_S = 86400.0
UNFINISHED_JOBS = ("queued", "running")


@dataclass(frozen=True)
class FinishedStudy:
    """A study the sweep may remove from: when it finished, what it holds."""

    study_instance_uid: str
    finished_at: float
    spool_bytes: int
    instances: int
    results_bytes: int


@dataclass
class DiskUse:
    """What the data folder holds, by kind, and what its disk has free."""

    spool_bytes: int = 0
    results_bytes: int = 0
    quarantine_bytes: int = 0
    state_bytes: int = 0  # the SQLite file and its journal; 0 for PostgreSQL
    free_bytes: int = 0

    @property
    def total_bytes(self) -> int:
        return self.spool_bytes + self.results_bytes + self.quarantine_bytes + self.state_bytes


@dataclass
class SweepPlan:
    """What one sweep removes (or removed), and why."""

    spool: list[FinishedStudy] = field(default_factory=list)
    results: list[FinishedStudy] = field(default_factory=list)
    quarantine: list[int] = field(default_factory=list)  # quarantine row ids
    quarantine_bytes: int = 0
    state_jobs: list[int] = field(default_factory=list)
    observations: int = 0  # a patient's remembered observations past retention.history_days
    budget: str | None = None  # why the budget removed studies younger than their age limits

    @property
    def frees_bytes(self) -> int:
        return (sum(s.spool_bytes for s in self.spool) + sum(s.results_bytes for s in self.results)
                + self.quarantine_bytes)

    def summary(self) -> dict[str, object]:
        return {"spool_studies": len(self.spool), "results_studies": len(self.results),
                "quarantined_files": len(self.quarantine), "state_jobs": len(self.state_jobs),
                "observations": self.observations,
                "frees_mb": round(self.frees_bytes / 2**20, 1), "budget": self.budget}


def folder_bytes(path: Path) -> int:
    """Bytes of the regular files under ``path`` (0 if it is gone); an explicit stack, no
    recursion."""
    total, stack = 0, [path]
    while stack:
        try:
            entries = list(os.scandir(stack.pop()))
        except OSError:
            continue
        for entry in entries:
            try:
                if entry.is_dir(follow_symlinks=False):
                    stack.append(Path(entry.path))
                elif entry.is_file(follow_symlinks=False):
                    total += entry.stat(follow_symlinks=False).st_size
            except OSError:
                continue
    return total


class RetentionSweeper:
    """Plans and applies the retention of one data folder (``plan`` changes nothing)."""

    def __init__(self, db: Database, data_dir: Path, settings: RetentionSettings, *,
                 audit_log: AuditLog | None = None) -> None:
        """Every study a sweep removes from is recorded in ``audit_log`` (DICOM Instances
        Accessed, action Delete)."""
        self.audit = audit_log or NullAuditLog()
        self.db = db
        self.data_dir = data_dir
        self.settings = settings
        self.last_sweep: SweepPlan | None = None

    # -- what is there ---------------------------------------------------------------------
    def disk_use(self) -> DiskUse:
        use = DiskUse(spool_bytes=int(self.db.scalar(
            sa.select(sa.func.coalesce(sa.func.sum(instances.c.size_bytes), 0))) or 0))
        use.results_bytes = folder_bytes(self.data_dir / RESULTS_DIR)
        use.quarantine_bytes = folder_bytes(self.data_dir / QUARANTINE_DIR)
        if self.db.dialect == "sqlite":
            database = Path(self.db.engine.url.database or "")
            use.state_bytes = sum(_size(Path(f"{database}{suffix}"))
                                  for suffix in ("", "-wal", "-shm"))
        try:
            use.free_bytes = shutil.disk_usage(self.data_dir).free
        except OSError:
            use.free_bytes = 0
        return use

    def finished_studies(self) -> tuple[list[FinishedStudy], list[FinishedStudy]]:
        """The studies whose received instances nothing waits on, oldest finished first; and
        of those, the ones whose results nothing waits on either (every output delivered)."""
        with self.db.read() as conn:
            busy = self._busy_studies(conn, results=False)
            sending = self._sending_studies(conn)
            finished_at = {str(r[0]): float(r[1] or 0.0) for r in conn.execute(
                sa.select(jobs.c.study_instance_uid, sa.func.max(jobs.c.finished_at))
                .group_by(jobs.c.study_instance_uid))}
            held = {str(r[0]): (int(r[1] or 0), int(r[2])) for r in conn.execute(
                sa.select(instances.c.study_instance_uid, sa.func.sum(instances.c.size_bytes),
                          sa.func.count()).group_by(instances.c.study_instance_uid))}
        studies = []
        for study, when in finished_at.items():
            if study in busy:
                continue
            spool_bytes, count = held.get(study, (0, 0))
            studies.append(FinishedStudy(study, when, spool_bytes, count,
                                         folder_bytes(self._results(study))))
        studies.sort(key=lambda s: (s.finished_at, s.study_instance_uid))
        return studies, [st for st in studies if st.study_instance_uid not in sending]

    def _busy_studies(self, conn: Connection, *, results: bool) -> set[str]:
        """Studies with an instance waiting, a job queued or running, an instance to forward,
        or (``results``) an output to send."""
        busy = {str(r[0]) for r in conn.execute(
            sa.select(instances.c.study_instance_uid).where(instances.c.job_id.is_(None))
            .distinct())}
        busy |= {str(r[0]) for r in conn.execute(
            sa.select(jobs.c.study_instance_uid).where(jobs.c.state.in_(UNFINISHED_JOBS))
            .distinct())}
        if results:
            busy |= self._sending_studies(conn)
        for (path,) in conn.execute(sa.select(outbox.c.path).where(
                outbox.c.state == "pending", outbox.c.job_id.is_(None))):
            study = self._study_of_path(str(path))  # a forwarded instance
            if study is not None:
                busy.add(study)
        return busy

    @staticmethod
    def _sending_studies(conn: Connection) -> set[str]:
        """Studies with an output still to send."""
        return {str(r[0]) for r in conn.execute(
            sa.select(jobs.c.study_instance_uid).join(outbox, outbox.c.job_id == jobs.c.id)
            .where(outbox.c.state == "pending").distinct())}

    def _study_of_path(self, path: str) -> str | None:
        try:
            parts = Path(path).resolve().relative_to(self.data_dir.resolve()).parts
        except ValueError:
            return None
        if len(parts) >= 2 and parts[0] in (SPOOL_DIR, RESULTS_DIR):
            return parts[1]
        return None

    def _results(self, study: str) -> Path:
        return self.data_dir / RESULTS_DIR / study

    # -- what goes -------------------------------------------------------------------------
    def plan(self, now: float | None = None, *, use: DiskUse | None = None) -> SweepPlan:
        """What a sweep at ``now`` would remove; ``use``: the disk use, if already measured."""
        now = time.time() if now is None else now
        s = self.settings
        finished, delivered = self.finished_studies()
        plan = SweepPlan()
        spool = _older(finished, now, s.spool_days, lambda st: st.instances > 0)
        results = _older(delivered, now, s.results_days, lambda st: st.results_bytes > 0)
        use = use or self.disk_use()
        shortfall = self._shortfall(use)
        if shortfall > 0:
            freed = sum(st.spool_bytes for st in spool) + sum(st.results_bytes
                                                               for st in results)
            # Oldest first: a study's instances, then (if still short) its results.
            removable_results = {st.study_instance_uid for st in delivered}
            for study in finished:
                if freed >= shortfall:
                    break
                if study.instances and study not in spool:
                    spool.append(study)
                    freed += study.spool_bytes
                if (freed < shortfall and study.results_bytes and study not in results
                        and study.study_instance_uid in removable_results):
                    results.append(study)
                    freed += study.results_bytes
            plan.budget = self._budget_reason(use)
        plan.spool, plan.results = spool, results
        if s.quarantine_days is not None:
            cutoff = now - s.quarantine_days * DAY_S
            rows = self.db.rows(sa.select(quarantine.c.id, quarantine.c.size_bytes)
                                .where(quarantine.c.received_at < cutoff))
            plan.quarantine = [int(r["id"]) for r in rows]
            plan.quarantine_bytes = sum(int(r["size_bytes"]) for r in rows)
        if s.state_days is not None:
            cutoff = now - s.state_days * DAY_S
            done = {st.study_instance_uid for st in delivered if st.finished_at < cutoff}
            if done:
                plan.state_jobs = [int(r["id"]) for r in self.db.rows(
                    sa.select(jobs.c.id).where(jobs.c.study_instance_uid.in_(done)))]
        if s.history_days is not None:
            plan.observations = int(self.db.scalar(
                sa.select(sa.func.count()).select_from(observations)
                .where(observations.c.created_at < now - s.history_days * DAY_S)) or 0)
        return plan

    def _shortfall(self, use: DiskUse) -> int:
        """Bytes the budget wants freed now (0: within it)."""
        s = self.settings
        short = max(0, s.keep_free_mb * 2**20 - use.free_bytes)
        if s.max_disk_mb is not None:
            short = max(short, use.total_bytes - s.max_disk_mb * 2**20)
        return short

    def _budget_reason(self, use: DiskUse) -> str:
        s = self.settings
        if use.free_bytes < s.keep_free_mb * 2**20:
            return (f"{use.free_bytes // 2**20} MB free on the data folder's disk, under "
                    f"retention.keep_free_mb ({s.keep_free_mb} MB)")
        return (f"the data folder holds {use.total_bytes // 2**20} MB, over "
                f"retention.max_disk_mb ({s.max_disk_mb} MB)")

    def needs_sweep(self) -> bool:
        """Whether the budget is short now (checked every ``check_interval_s``)."""
        return self._shortfall(self.disk_use()) > 0

    def sweep(self, now: float | None = None) -> SweepPlan:
        """Remove what ``plan`` lists, each removal checked again as it is made."""
        plan = self.plan(now)
        removed = SweepPlan(budget=plan.budget)
        for study in plan.spool:
            if self._remove_instances(study.study_instance_uid):
                removed.spool.append(study)
                self.audit.record(audit.INSTANCES_DELETED, study=study.study_instance_uid,
                                  what="received instances", instances=study.instances,
                                  bytes=study.spool_bytes, reason=plan.budget or "age")
        for study in plan.results:
            if self._remove_results(study.study_instance_uid):
                removed.results.append(study)
                self.audit.record(audit.INSTANCES_DELETED, study=study.study_instance_uid,
                                  what="results", bytes=study.results_bytes,
                                  reason=plan.budget or "age")
        if plan.quarantine:
            removed.quarantine, removed.quarantine_bytes = plan.quarantine, plan.quarantine_bytes
            self._remove_quarantine(plan.quarantine)
        if plan.state_jobs:
            removed.state_jobs = self._remove_state(plan.state_jobs)
        if self.settings.state_days is not None:
            cutoff = (time.time() if now is None else now) - self.settings.state_days * DAY_S
            with self.db.transaction() as conn:
                conn.execute(sa.delete(outbox).where(
                    outbox.c.job_id.is_(None), outbox.c.state != "pending",
                    outbox.c.created_at < cutoff))
                conn.execute(sa.delete(nodes).where(nodes.c.stopped_at.is_not(None),
                                                    nodes.c.stopped_at < cutoff))
        if plan.observations and self.settings.history_days is not None:
            removed.observations = history.remove_older_than(
                self.db, self.settings.history_days, now=now)
        self._clear_trash()
        self.last_sweep = removed
        if (removed.spool or removed.results or removed.quarantine or removed.state_jobs
                or removed.observations):
            log.info("retention sweep", extra=kv(**removed.summary()))
        return removed

    def _still_finished(self, conn: Connection, study: str, *, results: bool) -> bool:
        """The checks of ``_busy_studies`` for one study, inside the removal's transaction."""
        waiting = sa.select(instances.c.sop_instance_uid).where(
            instances.c.study_instance_uid == study, instances.c.job_id.is_(None))
        running = sa.select(jobs.c.id).where(jobs.c.study_instance_uid == study,
                                             jobs.c.state.in_(UNFINISHED_JOBS))
        sending = sa.select(outbox.c.id).join(jobs, outbox.c.job_id == jobs.c.id).where(
            jobs.c.study_instance_uid == study, outbox.c.state == "pending")
        forwarding = sa.select(outbox.c.id).where(
            outbox.c.job_id.is_(None), outbox.c.state == "pending",
            outbox.c.path.contains(f"/{SPOOL_DIR}/{study}/", autoescape=True))
        checks = (waiting, running, forwarding) + ((sending,) if results else ())
        return not any(conn.execute(query.limit(1)).first() for query in checks)

    def _remove_instances(self, study: str) -> bool:
        """Unlink the study's received instances and delete their rows, in one write
        transaction that first checks the study is still finished (a sender may be sending
        it again)."""
        with self.db.transaction() as conn:
            if not self._still_finished(conn, study, results=False):
                return False
            rows = conn.execute(sa.select(instances.c.sop_instance_uid, instances.c.path).where(
                instances.c.study_instance_uid == study,
                instances.c.job_id.is_not(None))).all()
            for _, relative in rows:
                (self.data_dir / relative).unlink(missing_ok=True)
            conn.execute(sa.delete(instances).where(
                instances.c.study_instance_uid == study, instances.c.job_id.is_not(None)))
        _remove_empty_folders(self.data_dir / SPOOL_DIR / study)
        return True

    def _remove_results(self, study: str) -> bool:
        folder = self._results(study)
        with self.db.transaction() as conn:
            if not self._still_finished(conn, study, results=True) or not folder.exists():
                return False
            aside = folder.with_name(f"{TRASH_PREFIX}{study}-{uuid.uuid4().hex[:8]}")
            try:
                folder.rename(aside)
            except OSError:  # another node of a cluster took it first
                return False
        shutil.rmtree(aside, ignore_errors=True)
        return True

    def _remove_quarantine(self, ids: list[int]) -> None:
        with self.db.transaction() as conn:
            for (path,) in conn.execute(sa.select(quarantine.c.path)
                                        .where(quarantine.c.id.in_(ids))).all():
                target = Path(path)
                target = target if target.is_absolute() else self.data_dir / target
                target.unlink(missing_ok=True)
                target.with_suffix(".json").unlink(missing_ok=True)
            conn.execute(sa.delete(quarantine).where(quarantine.c.id.in_(ids)))

    def _remove_state(self, job_ids: list[int]) -> list[int]:
        """The rows of finished jobs: lesion and frame analyses, deliveries, instances (their
        files too, should they still be held), then the jobs."""
        with self.db.transaction() as conn:
            ids = [int(r[0]) for r in conn.execute(sa.select(jobs.c.id).where(
                jobs.c.id.in_(job_ids), jobs.c.state.not_in(UNFINISHED_JOBS)))]
            if not ids:
                return []
            pending = conn.execute(sa.select(outbox.c.id).where(
                outbox.c.job_id.in_(ids), outbox.c.state == "pending").limit(1)).first()
            if pending:
                return []
            frames = sa.select(frame_analyses.c.id).where(frame_analyses.c.job_id.in_(ids))
            conn.execute(sa.delete(lesion_analyses).where(
                lesion_analyses.c.frame_analysis_id.in_(frames)))
            conn.execute(sa.delete(frame_analyses).where(frame_analyses.c.job_id.in_(ids)))
            conn.execute(sa.delete(outbox).where(outbox.c.job_id.in_(ids)))
            for (relative,) in conn.execute(sa.select(instances.c.path)
                                            .where(instances.c.job_id.in_(ids))):
                (self.data_dir / relative).unlink(missing_ok=True)
            conn.execute(sa.delete(instances).where(instances.c.job_id.in_(ids)))
            conn.execute(sa.delete(jobs).where(jobs.c.id.in_(ids)))
        return ids

    def _clear_trash(self) -> None:
        """Results folders set aside by a sweep that stopped before deleting them."""
        root = self.data_dir / RESULTS_DIR
        if root.is_dir():
            for entry in root.iterdir():
                if entry.name.startswith(TRASH_PREFIX):
                    shutil.rmtree(entry, ignore_errors=True)


def _older(studies: list[FinishedStudy], now: float, days: float | None,
           holds: Callable[[FinishedStudy], bool]) -> list[FinishedStudy]:
    if days is None:
        return []
    cutoff = now - days * DAY_S
    return [st for st in studies if st.finished_at <= cutoff and holds(st)]


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _remove_empty_folders(study_folder: Path) -> None:
    """The study's spool folder and its series folders, where empty (a new instance may have
    made one meanwhile: then it stays)."""
    if not study_folder.is_dir():
        return
    for series in study_folder.iterdir():
        try:
            series.rmdir()
        except OSError:
            pass
    try:
        study_folder.rmdir()
    except OSError:
        pass
