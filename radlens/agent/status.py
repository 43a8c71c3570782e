"""What ``radlens status`` reports, read from SQLite whether the agent runs or not."""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import BaseModel, Field

from radlens.agent.service import LLM_STATUS_FILE, agent_is_running
from radlens.db import DB_FILENAME, open_readonly

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
        default_factory=list, description="processes serving the port, when more than one "
        "(dicom.listener_processes)")


class LlmState(BaseModel):
    """Who writes the narrative, as the agent found it at start-up."""

    provider: str
    host: str | None = None
    model: str | None = None
    ready: bool = True
    vision: bool = False
    message: str = ""
    checked_at: float | None = None


class StatusReport(BaseModel):
    data_dir: str
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


def collect_status(data_dir: Path) -> StatusReport:
    data_dir = data_dir.resolve()
    owner = agent_is_running(data_dir)
    details = {k: v for k, v in (owner or {}).items() if k in AgentState.model_fields}
    agent = AgentState(running=owner is not None, **{k: v for k, v in details.items()
                                                     if k != "running"})
    report = StatusReport(data_dir=str(data_dir), agent=agent)
    llm_file = data_dir / LLM_STATUS_FILE
    if llm_file.is_file():
        try:
            report.llm = LlmState.model_validate(json.loads(llm_file.read_text()))
        except ValueError:
            report.llm = None
    db_path = data_dir / DB_FILENAME
    if not db_path.is_file():
        return report
    conn = open_readonly(db_path)
    try:
        row = conn.execute(
            "SELECT COUNT(*) AS n, COALESCE(SUM(size_bytes), 0) AS bytes,"
            " COUNT(DISTINCT study_instance_uid) AS studies, MAX(received_at) AS last,"
            " SUM(job_id IS NULL) AS pending FROM instances"
        ).fetchone()
        report.instances, report.instance_bytes = row["n"], row["bytes"]
        report.studies, report.last_received_at = row["studies"], row["last"]
        report.pending_instances = row["pending"] or 0
        report.quarantined = conn.execute("SELECT COUNT(*) FROM quarantine").fetchone()[0]
        for state, count in conn.execute("SELECT state, COUNT(*) FROM jobs GROUP BY state"):
            report.jobs[state] = count
        for destination, state, count in conn.execute(
                "SELECT destination, state, COUNT(*) FROM outbox GROUP BY destination, state"):
            report.outbox.setdefault(destination, dict.fromkeys(OUTBOX_STATES, 0))[state] = count
        for job in conn.execute(
                "SELECT id, study_instance_uid, error, finished_at FROM jobs"
                " WHERE state = 'failed' ORDER BY id DESC LIMIT 5"):
            report.recent_failures.append(dict(job))
        for job in conn.execute(
                "SELECT id, study_instance_uid, error, attempts FROM jobs"
                " WHERE state = 'queued' AND error IS NOT NULL ORDER BY id"):
            report.retrying.append(dict(job))
        studies = [row[0] for row in conn.execute(
            "SELECT study_instance_uid FROM jobs WHERE state = 'done' GROUP BY"
            " study_instance_uid ORDER BY MAX(id) DESC LIMIT ?", (RECENT_STUDIES,))]
    finally:
        conn.close()
    report.recent_not_analysed, report.latest_job_timings = _from_findings(
        data_dir / "results", studies)
    return report


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
