"""Commands for running a node for a long time: ``radlens retention``, ``radlens jobs``,
``radlens outbox``. Each works whether the agent runs or not (the state database is shared),
and each change is recorded in the audit trail."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Annotated, Any, TypeVar

import sqlalchemy as sa
import typer
from rich.table import Table

from radlens.cli_support import ConfigOption, audit_command, cli_settings, console, fail
from radlens.config import Settings
from radlens.db import Database

jobs_app = typer.Typer(help="List failed jobs, run one again, or give one up.",
                       no_args_is_help=True)
outbox_app = typer.Typer(help="List deliveries, send a failed one again, or give one up.",
                         no_args_is_help=True)

T = TypeVar("T")
IdArgument = Annotated[int, typer.Argument(help="the id radlens status or list shows")]


def _when(timestamp: float | None) -> str:
    return ("" if timestamp is None else
            datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%d %H:%M:%SZ"))


@contextmanager
def _state(settings: Settings, *, write: bool) -> Iterator[Database]:
    from radlens.db import open_readonly

    data_dir = settings.storage.data_dir.resolve()
    url = settings.state.resolved_url(data_dir)
    db = Database(url, durable=settings.storage.fsync) if write else open_readonly(url)
    if db is None:
        raise fail(f"no state database in {data_dir}: nothing was received here yet", 1)
    try:
        yield db
    finally:
        db.close()


def describe_sweep(summary: dict[str, object]) -> str:
    """One line for what a retention sweep removes (or would)."""
    parts = [f"received instances of {summary['spool_studies']} studies",
             f"results of {summary['results_studies']} studies",
             f"{summary['quarantined_files']} quarantined files",
             f"state rows of {summary['state_jobs']} jobs"]
    line = f"frees {summary['frees_mb']} MB: " + ", ".join(parts)
    if summary.get("budget"):
        line += f" (disk budget: {summary['budget']})"
    return line


def retention(
    config: ConfigOption = None,
    sweep: Annotated[bool, typer.Option("--sweep", help="remove it now (the agent does this "
                                        "every retention.interval_s)")] = False,
) -> None:
    """What the retention sweep removes (retention.*), or with --sweep, remove it now."""
    from radlens.agent.retention import RetentionSweeper
    from radlens.audit import AuditLog

    settings = cli_settings(config)
    data_dir = settings.storage.data_dir.resolve()
    audit_log = (AuditLog(settings.audit.resolved_path(data_dir), syslog=settings.audit.syslog)
                 if sweep else None)
    try:
        with _state(settings, write=sweep) as db:
            sweeper = RetentionSweeper(db, data_dir, settings.retention, audit_log=audit_log)
            result = sweeper.sweep() if sweep else sweeper.plan()
    finally:
        if audit_log is not None:
            audit_log.close()
    audit_command(settings, "query", command="radlens retention" + (" --sweep" if sweep else ""))
    table = Table(title="removed" if sweep else "the next sweep removes")
    for column in ("what", "study", "finished", "MB"):
        table.add_column(column)
    for kind, studies in (("received instances", result.spool), ("results", result.results)):
        for study in studies:
            size = study.spool_bytes if kind == "received instances" else study.results_bytes
            table.add_row(kind, study.study_instance_uid, _when(study.finished_at),
                          f"{size / 2**20:.1f}")
    console.print(table)
    console.print(("removed: " if sweep else "") + describe_sweep(result.summary()),
                  highlight=False)


def _operate(config: ConfigOption, command: str, action: Callable[[Database], T]) -> T:
    """Run one operation on the state; its refusal is a one-line error, exit 1."""
    from radlens.agent.operations import OperationError

    settings = cli_settings(config)
    with _state(settings, write=True) as db:
        try:
            outcome = action(db)
        except OperationError as exc:
            raise fail(str(exc), 1) from None
    audit_command(settings, "application-activity", command=command)
    return outcome


def _list_rows(config: ConfigOption, table: sa.Table, state: str, limit: int, title: str,
               columns: tuple[str, ...], cells: Callable[[Any], list[str]]) -> None:
    """One state's rows of ``table``, newest first, as a table of ``columns``."""
    settings = cli_settings(config)
    with _state(settings, write=False) as db:
        rows = db.rows(sa.select(table).where(table.c.state == state)
                       .order_by(table.c.id.desc()).limit(limit))
    shown = Table(title=f"{state} {title}")
    for column in columns:
        shown.add_column(column, overflow="fold")
    for row in rows:
        shown.add_row(*cells(row))
    console.print(shown)


@jobs_app.command("list")
def jobs_list(
    config: ConfigOption = None,
    state: Annotated[str, typer.Option(help="queued, running, done or failed")] = "failed",
    limit: Annotated[int, typer.Option(help="newest first, at most this many")] = 50,
) -> None:
    """Jobs in one state, newest first, with their errors."""
    from radlens.db import jobs

    _list_rows(config, jobs, state, limit, "jobs",
               ("job", "study", "attempts", "finished", "error"),
               lambda row: [str(row["id"]), row["study_instance_uid"], str(row["attempts"]),
                            _when(row["finished_at"]), row["error"] or ""])


@jobs_app.command("retry")
def jobs_retry(job: IdArgument, config: ConfigOption = None) -> None:
    """Put a failed job back in the queue (its attempts counted afresh)."""
    from radlens.agent.operations import retry_job

    _operate(config, f"radlens jobs retry {job}", lambda db: retry_job(db, job))
    console.print(f"job {job} queued again")


@jobs_app.command("drop")
def jobs_drop(job: IdArgument, config: ConfigOption = None) -> None:
    """Give a queued or failed job up, with its undelivered outputs."""
    from radlens.agent.operations import drop_job

    dropped = _operate(config, f"radlens jobs drop {job}", lambda db: drop_job(db, job))
    console.print(f"job {job} dropped, and {dropped} undelivered outputs with it")


@outbox_app.command("list")
def outbox_list(
    config: ConfigOption = None,
    state: Annotated[str, typer.Option(help="pending, sent or failed")] = "failed",
    limit: Annotated[int, typer.Option(help="newest first, at most this many")] = 50,
) -> None:
    """Deliveries in one state, newest first, with the destination's last answer."""
    from radlens.db import outbox

    _list_rows(config, outbox, state, limit, "deliveries",
               ("id", "destination", "job", "SOP instance", "attempts", "last error"),
               lambda row: [str(row["id"]), row["destination"], str(row["job_id"] or ""),
                            row["sop_instance_uid"], str(row["attempts"]),
                            row["last_error"] or ""])


@outbox_app.command("retry")
def outbox_retry(delivery: IdArgument, config: ConfigOption = None) -> None:
    """Send a failed delivery again now (its attempts and age counted afresh)."""
    from radlens.agent.operations import retry_delivery

    _operate(config, f"radlens outbox retry {delivery}",
             lambda db: retry_delivery(db, delivery))
    console.print(f"delivery {delivery} due now")


@outbox_app.command("drop")
def outbox_drop(delivery: IdArgument, config: ConfigOption = None) -> None:
    """Give a delivery up."""
    from radlens.agent.operations import drop_delivery

    _operate(config, f"radlens outbox drop {delivery}", lambda db: drop_delivery(db, delivery))
    console.print(f"delivery {delivery} dropped")
