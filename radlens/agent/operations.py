"""What an operator may do to jobs and deliveries (``radlens jobs``, ``radlens outbox``): run a
failed job again, give a job up, send a failed delivery again, give a delivery up.

Each is one conditional update in the state, so it is safe while the agent runs: a running
agent's worker picks a job put back in the queue at its next poll, its sender a delivery made
due. A job running now cannot be dropped or retried (its worker holds it); the command says so.
"""

from __future__ import annotations

import time

import sqlalchemy as sa

from radlens.db import Database, jobs, outbox
from radlens.errors import RadlensError

DROPPED = "dropped by an operator (radlens {what} drop)"


class OperationError(RadlensError):
    """The job or delivery does not exist, or is in a state the operation does not apply to."""


def _state(db: Database, table: sa.Table, row_id: int, what: str) -> str:
    state = db.scalar(sa.select(table.c.state).where(table.c.id == row_id))
    if state is None:
        raise OperationError(f"no {what} {row_id}")
    return str(state)


def retry_job(db: Database, job_id: int) -> None:
    """A failed job back in the queue, its attempts counted afresh."""
    state = _state(db, jobs, job_id, "job")
    if state != "failed":
        raise OperationError(f"job {job_id} is {state}: only a failed job can be run again "
                             "(send the study again to analyse a done one anew)")
    with db.transaction() as conn:
        changed = conn.execute(sa.update(jobs).where(jobs.c.id == job_id,
                                                     jobs.c.state == "failed").values(
            state="queued", attempts=0, started_at=None, finished_at=None, claimed_by=None,
            lease_until=None, error="queued again by an operator (radlens jobs retry)")).rowcount
    if not changed:
        raise OperationError(f"job {job_id} changed meanwhile; look at radlens status")


def drop_job(db: Database, job_id: int) -> int:
    """A queued or failed job given up: failed, never run (again), and its undelivered
    outputs dropped too; returns how many deliveries were dropped."""
    state = _state(db, jobs, job_id, "job")
    if state not in ("queued", "failed"):
        raise OperationError(f"job {job_id} is {state}: only a queued or failed job can be "
                             "dropped")
    with db.transaction() as conn:
        changed = conn.execute(sa.update(jobs).where(
            jobs.c.id == job_id, jobs.c.state.in_(("queued", "failed"))).values(
            state="failed", finished_at=time.time(), claimed_by=None, lease_until=None,
            error=DROPPED.format(what="jobs"))).rowcount
        if not changed:
            raise OperationError(f"job {job_id} started meanwhile; look at radlens status")
        return int(conn.execute(sa.update(outbox).where(
            outbox.c.job_id == job_id, outbox.c.state == "pending").values(
            state="failed", lease_until=None,
            last_error=DROPPED.format(what="jobs"))).rowcount)


def retry_delivery(db: Database, row_id: int) -> None:
    """A failed (or waiting) delivery due now, its attempts and age counted afresh."""
    _state(db, outbox, row_id, "delivery")
    now = time.time()
    with db.transaction() as conn:
        conn.execute(sa.update(outbox).where(outbox.c.id == row_id).values(
            state="pending", attempts=0, created_at=now, next_attempt_at=now,
            lease_until=None))


def drop_delivery(db: Database, row_id: int) -> None:
    """A delivery not yet sent given up."""
    state = _state(db, outbox, row_id, "delivery")
    if state == "sent":
        raise OperationError(f"delivery {row_id} was sent already")
    with db.transaction() as conn:
        conn.execute(sa.update(outbox).where(outbox.c.id == row_id,
                                             outbox.c.state != "sent").values(
            state="failed", lease_until=None, last_error=DROPPED.format(what="outbox")))
