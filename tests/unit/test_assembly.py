"""Study assembly and the job queue against a real scheduler and a real SQLite database."""

from __future__ import annotations

import time
from datetime import UTC
from pathlib import Path

import pytest
import sqlalchemy as sa
from apscheduler.schedulers.background import BackgroundScheduler

from radlens.agent.assembler import StudyAssembler
from radlens.agent.queue import JobQueue
from radlens.db import DB_FILENAME, Database, instances
from tests.helpers import wait_for


def _add_instance(db: Database, study: str, sop: str, received_at: float) -> None:
    with db.transaction() as conn:
        conn.execute(sa.insert(instances).values(
            sop_instance_uid=sop, sop_class_uid="1.2", study_instance_uid=study,
            series_instance_uid="9.9", transfer_syntax_uid="1.2.840.10008.1.2.1",
            calling_aet="T", path="p", size_bytes=1, received_at=received_at))


@pytest.fixture
def parts(tmp_path: Path):
    db = Database(tmp_path / DB_FILENAME)
    queue = JobQueue(db, tmp_path)
    scheduler = BackgroundScheduler(timezone=UTC)
    scheduler.start()
    yield db, queue, scheduler
    scheduler.shutdown(wait=True)


def _jobs(db: Database) -> list:
    return db.rows("SELECT * FROM jobs ORDER BY id")


def test_quiet_period_is_rearmed_by_each_instance(parts):
    db, queue, scheduler = parts
    quiet = 1.0
    assembler = StudyAssembler(scheduler, queue, quiet_period_s=quiet, max_wait_s=30)
    checked = 0
    for i in range(6):  # 6 instances 0.15 s apart: never quiet for a whole second
        now = time.time()
        _add_instance(db, "1.1", f"1.1.{i}", now)
        assembler.instance_received("1.1", now)
        time.sleep(0.15)
        jobs = _jobs(db)
        # Judged on the clock, not on the sleep: on a loaded machine the index write and the
        # sleep may take longer than planned, and a job is due only a quiet period after the
        # last instance.
        if time.time() < now + quiet - 0.05:
            assert jobs == [], f"job created while instances still arrive ({i})"
            checked += 1
    assert checked >= 3, "the machine was too slow to judge the quiet period"
    last = now
    wait_for(lambda: _jobs(db), 5, "the job")
    assert time.time() >= last + quiet - 0.05
    job = _jobs(db)[0]
    assert job["state"] == "queued" and job["study_instance_uid"] == "1.1"
    assert db.scalar("SELECT COUNT(*) FROM instances WHERE job_id = :job",
                     {"job": job["id"]}) == 6
    assert assembler.open_studies() == 0


def test_max_wait_closes_a_study_that_never_goes_quiet(parts):
    db, queue, scheduler = parts
    assembler = StudyAssembler(scheduler, queue, quiet_period_s=0.5, max_wait_s=1.0)
    start = time.time()
    i = 0
    while not _jobs(db) and time.time() - start < 5:
        now = time.time()
        _add_instance(db, "2.1", f"2.1.{i}", now)
        assembler.instance_received("2.1", now)
        i += 1
        time.sleep(0.1)
    elapsed = time.time() - start
    assert _jobs(db), "max_wait_s did not close the study"
    assert 0.9 <= elapsed < 3.0  # near max_wait_s, long before the loop's 5 s (a loaded machine)


def test_rebuild_after_restart_fires_overdue_studies_once(parts):
    db, queue, scheduler = parts
    long_ago = time.time() - 3600
    for i in range(3):
        _add_instance(db, "3.1", f"3.1.{i}", long_ago)
    _add_instance(db, "3.2", "3.2.0", long_ago)
    assembler = StudyAssembler(scheduler, queue, quiet_period_s=0.6, max_wait_s=600)
    restarted = time.time()
    assert assembler.rebuild() == 2
    time.sleep(0.3)
    assert _jobs(db) == [], "an overdue study waits one quiet period after a restart"
    wait_for(lambda: len(_jobs(db)) == 2, 5, "both overdue studies")
    assert time.time() - restarted >= 0.6 - 0.05
    assert assembler.rebuild() == 0  # the sweep finds nothing left to arm
    time.sleep(0.3)
    assert sorted(j["study_instance_uid"] for j in _jobs(db)) == ["3.1", "3.2"]


def test_study_still_arriving_after_a_crash_is_processed_once_whole(parts):
    """kill -9 in the middle of a burst: the study's old deadline passed during the stop, the
    sender re-sends the rest after the restart; the study runs once, on every instance."""
    db, queue, scheduler = parts
    before_crash = time.time() - 30
    for i in range(4):
        _add_instance(db, "5.1", f"5.1.{i}", before_crash)
    assembler = StudyAssembler(scheduler, queue, quiet_period_s=0.8, max_wait_s=600)
    assert assembler.rebuild() == 1
    for i in range(4, 8):  # the sender goes on right after the restart
        time.sleep(0.1)
        now = time.time()
        _add_instance(db, "5.1", f"5.1.{i}", now)
        assembler.instance_received("5.1", now)
    wait_for(lambda: _jobs(db), 5, "the study's job")
    time.sleep(0.3)
    jobs = _jobs(db)
    assert len(jobs) == 1
    assert db.scalar("SELECT COUNT(*) FROM instances WHERE job_id = :job",
                     {"job": jobs[0]["id"]}) == 8


def test_a_recovered_study_waits_for_senders_slower_than_a_quiet_period(parts):
    """After a restart many senders reconnect at once and a study's may come back later than
    one quiet period: at start-up the recovered study waits ``recovery_wait_s``, then runs
    once, on every instance."""
    db, queue, scheduler = parts
    for i in range(3):
        _add_instance(db, "6.1", f"6.1.{i}", time.time() - 30)
    assembler = StudyAssembler(scheduler, queue, quiet_period_s=0.5, max_wait_s=600,
                               recovery_wait_s=2.0)
    assert assembler.rebuild(at_start=True) == 1
    time.sleep(1.2)  # longer than the quiet period: the sender is still reconnecting
    assert _jobs(db) == []
    for i in range(3, 6):
        now = time.time()
        _add_instance(db, "6.1", f"6.1.{i}", now)
        assembler.instance_received("6.1", now)
        time.sleep(0.1)
    wait_for(lambda: _jobs(db), 5, "the study's job")
    time.sleep(0.8)
    (job,) = _jobs(db)
    assert db.scalar("SELECT COUNT(*) FROM instances WHERE job_id = :job",
                     {"job": job["id"]}) == 6


def test_queue_claims_in_order_and_requeues_interrupted_jobs(tmp_path):
    db = Database(tmp_path / DB_FILENAME)
    queue = JobQueue(db, tmp_path)
    assert queue.create_job_for_pending("none") is None
    _add_instance(db, "4.1", "4.1.0", 1.0)
    first = queue.create_job_for_pending("4.1")
    _add_instance(db, "4.1", "4.1.1", 2.0)
    second = queue.create_job_for_pending("4.1")
    assert queue.wakeup.is_set()
    claimed = queue.claim_next()
    assert claimed.id == first and claimed.attempts == 1
    # A crash while running: the job runs again after restart.
    assert queue.requeue_interrupted() == 1
    again = queue.claim_next()
    assert again.id == first and again.attempts == 2
    queue.finish(again.id)
    later = queue.claim_next()
    assert later.id == second
    assert queue.revision(later) == 2
    assert [i.sop_instance_uid for i in queue.instances(later)] == ["4.1.0", "4.1.1"]
    assert [i.sop_instance_uid for i in queue.instances(again)] == ["4.1.0"]
    queue.retry(later.id, error="ValueError: boom")  # a failed attempt goes back to the queue
    assert _jobs(db)[1]["state"] == "queued" and _jobs(db)[1]["error"] == "ValueError: boom"
    retried = queue.claim_next()
    assert retried.id == second and retried.attempts == 2
    queue.finish(retried.id, error="ValueError: boom")
    states = {j["id"]: (j["state"], j["error"]) for j in _jobs(db)}
    assert states == {first: ("done", None), second: ("failed", "ValueError: boom")}
    assert queue.claim_next() is None
