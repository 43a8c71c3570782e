"""Operator actions on the state (radlens jobs / radlens outbox): each applies to the states it
names, refuses the others with a reason, and leaves the rest alone."""

from __future__ import annotations

import time

import pytest
import sqlalchemy as sa

from radlens.agent.operations import (
    OperationError,
    drop_delivery,
    drop_job,
    retry_delivery,
    retry_job,
)
from radlens.db import DB_FILENAME, Database, jobs, outbox


@pytest.fixture
def db(tmp_path) -> Database:
    return Database(tmp_path / DB_FILENAME)


def _job(db: Database, state: str, attempts: int = 3) -> int:
    with db.transaction() as conn:
        return int(conn.execute(sa.insert(jobs).values(
            study_instance_uid="1.2", state=state, created_at=time.time(), attempts=attempts,
            error="boom" if state == "failed" else None).returning(jobs.c.id)).scalar_one())


def _delivery(db: Database, state: str, job: int | None = None) -> int:
    with db.transaction() as conn:
        return int(conn.execute(sa.insert(outbox).values(
            destination="pacs", path="/x.dcm", sop_instance_uid="1.2.3", sop_class_uid="1.2",
            transfer_syntax_uid="1.2", job_id=job, state=state, attempts=5,
            created_at=time.time() - 3600, next_attempt_at=time.time() + 3600)
            .returning(outbox.c.id)).scalar_one())


def _row(db: Database, table: sa.Table, row_id: int):
    return db.rows(sa.select(table).where(table.c.id == row_id))[0]


def test_a_failed_job_runs_again_with_its_attempts_counted_afresh(db):
    job = _job(db, "failed")
    retry_job(db, job)
    row = _row(db, jobs, job)
    assert (row["state"], row["attempts"]) == ("queued", 0)
    assert "radlens jobs retry" in row["error"]
    for state in ("done", "running", "queued"):
        with pytest.raises(OperationError, match=f"is {state}: only a failed job"):
            retry_job(db, _job(db, state))
    with pytest.raises(OperationError, match="no job 999"):
        retry_job(db, 999)


def test_a_dropped_job_never_runs_and_takes_its_undelivered_outputs(db):
    job = _job(db, "queued", attempts=0)
    waiting, sent = _delivery(db, "pending", job), _delivery(db, "sent", job)
    assert drop_job(db, job) == 1
    assert _row(db, jobs, job)["state"] == "failed"
    assert _row(db, outbox, waiting)["state"] == "failed"
    assert "radlens jobs drop" in _row(db, outbox, waiting)["last_error"]
    assert _row(db, outbox, sent)["state"] == "sent"
    with pytest.raises(OperationError, match="is running"):
        drop_job(db, _job(db, "running"))


def test_deliveries_are_sent_again_or_dropped(db):
    failed = _delivery(db, "failed")
    retry_delivery(db, failed)
    row = _row(db, outbox, failed)
    assert (row["state"], row["attempts"]) == ("pending", 0)
    assert row["next_attempt_at"] <= time.time() and row["created_at"] > time.time() - 60
    waiting = _delivery(db, "pending")
    drop_delivery(db, waiting)
    assert _row(db, outbox, waiting)["state"] == "failed"
    with pytest.raises(OperationError, match="was sent already"):
        drop_delivery(db, _delivery(db, "sent"))
    with pytest.raises(OperationError, match="no delivery 999"):
        drop_delivery(db, 999)
