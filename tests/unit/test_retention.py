"""Retention against a real spool, job queue and SQLite state: what a sweep removes, and what it
must never remove (a study in assembly, a job queued or running, an undelivered output)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import sqlalchemy as sa

from radlens.agent.queue import JobQueue
from radlens.agent.retention import DAY_S, RetentionSweeper
from radlens.audit import AuditLog
from radlens.config import RetentionSettings
from radlens.db import DB_FILENAME, Database, frame_analyses, instances, jobs, outbox
from radlens.dicom_io.spool import Spool
from radlens.tasks.breast_us.dicom import us_dataset

NOW = time.time()


def _encoded(study: str, sop: str, size: int = 64) -> bytes:
    import io

    import numpy as np

    ds = us_dataset(np.zeros((size, size), dtype=np.uint8), study_uid=study,
                    series_uid=f"{study}.1", instance_number=1, spacing_cm=0.02,
                    patient_id="RET")
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = sop
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


class Node:
    """A data folder with its spool, queue and state, and a way to age what it holds."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.db = Database(root / DB_FILENAME)
        self.spool = Spool(root, self.db, fsync=False, min_free_mb=0)
        self.queue = JobQueue(self.db, root)

    def receive(self, study: str, count: int = 2, size: int = 64) -> list[Path]:
        return [self.spool.store(_encoded(study, f"{study}.9.{i}", size), calling_aet="T",
                                 transfer_syntax_uid="1.2.840.10008.1.2.1").path
                for i in range(count)]

    def finish(self, study: str, *, days_ago: float, state: str = "done",
               results_bytes: int = 1000) -> int:
        """A job for the study's pending instances, ended ``days_ago``, with results."""
        job = self.queue.create_job_for_pending(study)
        assert job is not None
        with self.db.transaction() as conn:
            conn.execute(sa.update(jobs).where(jobs.c.id == job).values(
                state=state, finished_at=NOW - days_ago * DAY_S))
        folder = self.root / "results" / study / "dicom" / "revision-1"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "SR_1.dcm").write_bytes(b"\0" * results_bytes)
        return job

    def queue_output(self, job: int, study: str, state: str = "pending") -> None:
        with self.db.transaction() as conn:
            conn.execute(sa.insert(outbox).values(
                destination="pacs", path=str(self.root / "results" / study / "dicom" /
                                             "revision-1" / "SR_1.dcm"),
                sop_instance_uid=f"{study}.sr", sop_class_uid="1.2", transfer_syntax_uid="1.2",
                job_id=job, state=state, created_at=NOW, next_attempt_at=NOW))

    def held(self, study: str) -> tuple[int, bool]:
        count = self.db.scalar(sa.select(sa.func.count()).select_from(instances)
                               .where(instances.c.study_instance_uid == study))
        return int(count), (self.root / "results" / study).exists()


@pytest.fixture
def node(tmp_path: Path) -> Node:
    return Node(tmp_path)


def _sweeper(node: Node, **settings: object) -> RetentionSweeper:
    defaults: dict[str, object] = {"keep_free_mb": 0}
    defaults.update(settings)
    return RetentionSweeper(node.db, node.root, RetentionSettings(**defaults),
                            audit_log=AuditLog(node.root / "audit.jsonl"))


def test_age_limits_remove_only_finished_studies_past_them(node):
    old_files = node.receive("1.1")
    node.finish("1.1", days_ago=40)
    node.receive("1.2")
    node.finish("1.2", days_ago=10)  # younger than 30 days: kept
    node.receive("1.3")  # in assembly: no job yet
    node.receive("1.4")
    node.queue.create_job_for_pending("1.4")  # queued
    plan = _sweeper(node).plan(NOW)
    assert [s.study_instance_uid for s in plan.spool] == ["1.1"]
    assert [s.study_instance_uid for s in plan.results] == ["1.1"]
    assert plan.frees_bytes >= 1000
    removed = _sweeper(node).sweep(NOW)
    assert [s.study_instance_uid for s in removed.spool] == ["1.1"]
    assert node.held("1.1") == (0, False)
    assert not any(path.exists() for path in old_files)
    assert not (node.root / "spool" / "1.1").exists()
    assert node.held("1.2") == (2, True)
    assert node.held("1.3")[0] == 2 and node.held("1.4")[0] == 2
    audit = (node.root / "audit.jsonl").read_text()
    assert audit.count('"instances-deleted"') == 2 and '"1.1"' in audit


def test_an_undelivered_output_keeps_its_results(node):
    node.receive("2.1")
    job = node.finish("2.1", days_ago=90)
    node.queue_output(job, "2.1")
    removed = _sweeper(node).sweep(NOW)
    assert removed.results == [] and len(removed.spool) == 1  # the input is not needed
    assert node.held("2.1") == (0, True)
    with node.db.transaction() as conn:
        conn.execute(sa.update(outbox).values(state="sent"))
    assert [s.study_instance_uid for s in _sweeper(node).sweep(NOW).results] == ["2.1"]
    assert node.held("2.1") == (0, False)


def test_the_disk_budget_removes_the_oldest_finished_studies_first(node):
    for number, days in ((1, 3), (2, 2), (3, 1)):
        node.receive(f"3.{number}", count=2, size=256)
        node.finish(f"3.{number}", days_ago=days, results_bytes=3 * 2**20)
    held_mb = _sweeper(node).disk_use().total_bytes / 2**20
    # A budget 2 MB under what is held: the oldest study's instances, then its results (3 MB)
    # go; the two others stay, though no age limit applies.
    sweeper = _sweeper(node, spool_days=None, results_days=None,
                       max_disk_mb=int(held_mb) - 2)
    plan = sweeper.plan(NOW)
    assert plan.budget and "retention.max_disk_mb" in plan.budget
    removed = sweeper.sweep(NOW)
    assert [s.study_instance_uid for s in removed.spool] == ["3.1"]
    assert [s.study_instance_uid for s in removed.results] == ["3.1"]
    assert node.held("3.2") == (2, True) and node.held("3.3") == (2, True)
    assert not sweeper.needs_sweep()


def test_keep_free_names_the_shortfall(node):
    node.receive("4.1")
    node.finish("4.1", days_ago=1)
    sweeper = _sweeper(node, keep_free_mb=10**9)  # more than any disk has free
    assert sweeper.needs_sweep()
    plan = sweeper.plan(NOW)
    assert plan.budget and "retention.keep_free_mb" in plan.budget
    assert [s.study_instance_uid for s in plan.spool] == ["4.1"]


def test_state_rows_of_long_finished_jobs_go_with_their_analyses(node):
    node.receive("5.1")
    job = node.finish("5.1", days_ago=400)
    node.queue_output(job, "5.1", state="sent")
    with node.db.transaction() as conn:
        conn.execute(sa.insert(frame_analyses).values(
            job_id=job, study_instance_uid="5.1", sop_instance_uid="5.1.9.0", frame=0,
            predicted_class="normal", p_normal=1.0, p_benign=0.0, p_malignant=0.0,
            latent=b"", created_at=NOW))
    removed = _sweeper(node).sweep(NOW)
    assert removed.state_jobs == [job]
    for table in (jobs, outbox, frame_analyses, instances):
        assert node.db.scalar(sa.select(sa.func.count()).select_from(table)) == 0, table.name


def test_an_instance_sent_again_after_its_removal_is_filed_anew(node):
    """The spool's index row went with the sweep while a sender re-sent the instance: the
    re-send is stored and pending, not lost."""
    (path,) = node.receive("6.1", count=1)
    node.finish("6.1", days_ago=40)
    encoded = path.read_bytes()
    existing = node.db.rows(sa.select(instances.c.path, instances.c.size_bytes,
                                      instances.c.received_at, instances.c.job_id))[0]
    _sweeper(node).sweep(NOW)
    assert not path.exists()
    from radlens.dicom_io.spool import read_uids

    changed = encoded[:-4] + b"\1\1\1\1"  # a corrected pixel value: not identical
    stored = node.spool._stored_again(existing, changed, read_uids(changed), calling_aet="T",
                                      transfer_syntax_uid="1.2.840.10008.1.2.1", now=NOW)
    assert not stored.duplicate and path.read_bytes() == changed
    (row,) = node.db.rows(sa.select(instances.c.job_id))
    assert row["job_id"] is None
