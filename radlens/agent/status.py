"""What ``radlens status`` reports, read from the state database whether the agent runs or not."""

from __future__ import annotations

import json
import time
from pathlib import Path

import sqlalchemy as sa
from pydantic import BaseModel, Field
from sqlalchemy.engine import Connection

from radlens.agent.nodes import heard_since
from radlens.agent.service import LLM_STATUS_FILE, agent_is_running
from radlens.config import RetentionSettings
from radlens.db import (
    Database,
    instances,
    jobs,
    nodes,
    open_readonly,
    outbox,
    quarantine,
    redacted,
    state_url,
)

JOB_STATES = ("queued", "running", "done", "failed")
OUTBOX_STATES = ("pending", "sent", "failed")


class AgentState(BaseModel):
    running: bool
    pid: int | None = None
    ae_title: str | None = None
    host: str | None = None
    port: int | None = None
    version: str | None = None
    listener_pids: list[int] = Field(
        default_factory=list, description="the processes serving the DICOM port "
        "(dicom.listener_processes; with worker.isolation: thread the agent is the first)")
    listener_restarts: int = Field(default=0, description="listener processes started again "
                                   "after one died")
    sender_pids: list[int] = Field(default_factory=list, description="the process that "
                                   "delivers the outbox, when destinations are configured")
    sender_restarts: int = Field(default=0, description="sender processes started again after "
                                 "one died")
    worker_waiting: str | None = Field(default=None, description="why jobs wait, queued (too "
                                       "little free disk), while they do")
    worker_pids: list[int] = Field(
        default_factory=list, description="the worker processes that run jobs "
        "(worker.isolation: process)")
    worker_restarts: int = Field(default=0, description="worker processes started again after "
                                 "one was killed at a limit or died")


class LlmState(BaseModel):
    """Who writes the narrative, as the agent found it at start-up."""

    provider: str
    host: str | None = None
    model: str | None = None
    ready: bool = True
    vision: bool = False
    message: str = ""
    checked_at: float | None = None


class NodeState(BaseModel):
    id: str
    role: str
    host: str
    pid: int
    started_at: float
    heartbeat_at: float
    stopped_at: float | None = None
    alive: bool = Field(description="not stopped, and its heartbeat is recent (three intervals)")


class StatusReport(BaseModel):
    data_dir: str
    state: str = Field(default="", description="the state database, without its password")
    agent: AgentState
    instances: int = 0
    instance_bytes: int = 0
    studies: int = 0
    pending_instances: int = Field(default=0, description="received, study not yet complete")
    last_received_at: float | None = None
    quarantined: int = 0
    jobs: dict[str, int] = Field(default_factory=lambda: dict.fromkeys(JOB_STATES, 0))
    outbox: dict[str, dict[str, int]] = Field(
        default_factory=dict, description="per destination, counts by state")
    recent_failures: list[dict[str, object]] = Field(default_factory=list)
    retrying: list[dict[str, object]] = Field(
        default_factory=list, description="queued again after a failed attempt")
    recent_not_analysed: list[dict[str, object]] = Field(
        default_factory=list, description="images of the latest jobs the model did not "
        "analyse (outside its scope, unlike its training images, unusable), with the reason")
    latest_job_timings: dict[str, object] = Field(
        default_factory=dict, description="the latest done job's study and its seconds per "
        "stage, from its findings.json")
    llm: LlmState | None = None
    nodes: list[NodeState] = Field(
        default_factory=list, description="processes serving this state, newest first: those "
        "running, and those stopped in the last hour")
    running: list[dict[str, object]] = Field(
        default_factory=list, description="jobs running, with the node holding each and its "
        "lease")
    disk: dict[str, float] = Field(
        default_factory=dict, description="MB the data folder holds by kind (spool, results, "
        "quarantine, state) and MB free on its disk")
    next_sweep: dict[str, object] = Field(
        default_factory=dict, description="what the next retention sweep would remove "
        "(retention.*): studies whose instances or results go, and the MB it frees")


def collect_status(data_dir: Path, url: str | None = None, *,
                   heartbeat_interval_s: float = 5.0,
                   retention: RetentionSettings | None = None) -> StatusReport:
    """What the agent of ``data_dir`` holds and does; ``url``: its state database (default
    the SQLite file in ``data_dir``); a node is alive while its heartbeat is younger than three
    ``heartbeat_interval_s``."""
    data_dir = data_dir.resolve()
    owner = agent_is_running(data_dir)
    details = {k: v for k, v in (owner or {}).items() if k in AgentState.model_fields}
    agent = AgentState(running=owner is not None, **{k: v for k, v in details.items()
                                                     if k != "running"})
    url = url or state_url(None, data_dir)
    report = StatusReport(data_dir=str(data_dir), state=redacted(url), agent=agent)
    llm_file = data_dir / LLM_STATUS_FILE
    if llm_file.is_file():
        try:
            report.llm = LlmState.model_validate(json.loads(llm_file.read_text()))
        except ValueError:
            report.llm = None
    db = open_readonly(url)
    if db is None:
        return report
    try:
        with db.read() as conn:
            studies = _from_state(conn, report)
            _nodes(conn, report, time.time(), heartbeat_interval_s)
        _retention(db, data_dir, retention or RetentionSettings(), report)
    finally:
        db.close()
    report.recent_not_analysed, report.latest_job_timings = _from_findings(
        data_dir / "results", studies)
    return report


def _retention(db: Database, data_dir: Path, settings: RetentionSettings,
               report: StatusReport) -> None:
    from radlens.agent.retention import RetentionSweeper

    sweeper = RetentionSweeper(db, data_dir, settings)
    use = sweeper.disk_use()
    report.disk = {kind: round(value / 2**20, 1) for kind, value in (
        ("spool", use.spool_bytes), ("results", use.results_bytes),
        ("quarantine", use.quarantine_bytes), ("state", use.state_bytes),
        ("total", use.total_bytes), ("free", use.free_bytes))}
    report.next_sweep = sweeper.plan(use=use).summary()


def _from_state(conn: Connection, report: StatusReport) -> list[str]:
    """Fill ``report`` from the state database; returns the latest done studies, newest
    first."""
    i = instances.c
    row = conn.execute(sa.select(
        sa.func.count().label("n"), sa.func.coalesce(sa.func.sum(i.size_bytes), 0).label("bytes"),
        sa.func.count(sa.distinct(i.study_instance_uid)).label("studies"),
        sa.func.max(i.received_at).label("last"),
        sa.func.sum(sa.case((i.job_id.is_(None), 1), else_=0)).label("pending"),
    )).mappings().one()
    report.instances, report.instance_bytes = int(row["n"]), int(row["bytes"])
    report.studies, report.last_received_at = int(row["studies"]), row["last"]
    report.pending_instances = int(row["pending"] or 0)
    report.quarantined = conn.execute(
        sa.select(sa.func.count()).select_from(quarantine)).scalar_one()
    for state, count in conn.execute(
            sa.select(jobs.c.state, sa.func.count()).group_by(jobs.c.state)):
        report.jobs[state] = count
    for destination, state, count in conn.execute(
            sa.select(outbox.c.destination, outbox.c.state, sa.func.count())
            .group_by(outbox.c.destination, outbox.c.state)):
        report.outbox.setdefault(destination, dict.fromkeys(OUTBOX_STATES, 0))[state] = count
    j = jobs.c
    report.recent_failures += [dict(job) for job in conn.execute(
        sa.select(j.id, j.study_instance_uid, j.error, j.finished_at)
        .where(j.state == "failed").order_by(j.id.desc()).limit(5)).mappings()]
    report.retrying += [dict(job) for job in conn.execute(
        sa.select(j.id, j.study_instance_uid, j.error, j.attempts)
        .where(j.state == "queued", j.error.is_not(None)).order_by(j.id)).mappings()]
    return [uid for (uid,) in conn.execute(
        sa.select(j.study_instance_uid).where(j.state == "done")
        .group_by(j.study_instance_uid).order_by(sa.func.max(j.id).desc())
        .limit(RECENT_STUDIES))]


def _nodes(conn: Connection, report: StatusReport, now: float, heartbeat_s: float) -> None:
    n = nodes.c
    for row in conn.execute(sa.select(nodes).where(
            sa.or_(n.stopped_at.is_(None), n.stopped_at > now - NODES_STOPPED_SHOWN_S))
            .order_by(n.started_at.desc())).mappings():
        alive = row["stopped_at"] is None and row["heartbeat_at"] > heard_since(now, heartbeat_s)
        report.nodes.append(NodeState(**row, alive=alive))
    j = jobs.c
    report.running = [dict(row) for row in conn.execute(
        sa.select(j.id, j.study_instance_uid, j.attempts, j.claimed_by, j.lease_until)
        .where(j.state == "running").order_by(j.id)).mappings()]


NODES_STOPPED_SHOWN_S = 3600.0
RECENT_STUDIES = 20
RECENT_NOT_ANALYSED = 10


def _from_findings(results: Path, studies: list[str]
                   ) -> tuple[list[dict[str, object]], dict[str, object]]:
    """From the latest studies' findings.json, newest first, each read once: why images were
    not analysed (at most ``RECENT_NOT_ANALYSED``), and the newest study's stage times."""
    found: list[dict[str, object]] = []
    timings: dict[str, object] = {}
    for newest, study in enumerate(studies):
        try:
            findings = json.loads((results / study / "findings.json").read_text())
        except (OSError, ValueError):
            continue
        if newest == 0 and findings.get("timings"):
            timings = {"study": study, "job": findings.get("job_id"),
                       "seconds": findings["timings"]}
        items = [(image["ref"]["sop_instance_uid"], image["not_analysed"])
                 for image in findings.get("images", []) if image.get("not_analysed")]
        items += [(skipped["ref"]["sop_instance_uid"], skipped["reason"])
                  for skipped in findings.get("skipped", [])]
        found += [{"study": study, "sop": sop, "reason": reason} for sop, reason in items]
        if len(found) >= RECENT_NOT_ANALYSED:
            break
    return found[:RECENT_NOT_ANALYSED], timings
