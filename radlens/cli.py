"""The ``radlens`` command. Errors: one line on stderr, exit 2 for usage/config, 1 for failure."""

from __future__ import annotations

import json
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

import typer
import yaml
from rich.table import Table

from radlens import __version__
from radlens import cli_operations as operations
from radlens import cli_research as research
from radlens import cli_security as security
from radlens.cli_support import (
    ConfigOption,
    LogFormatOption,
    audit_command,
    cli_settings,
    console,
    err,
    fail,
)
from radlens.config import Settings
from radlens.errors import ConfigError, RadlensError

app = typer.Typer(
    name="radlens",
    help="A DICOM node that explains what it sees. Research use only, not for diagnostic use. "
         "Documentation: README.md and docs/ in the radlens source (docs/configuration.md: "
         "every setting; docs/contracts.md: what the node does in each situation).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
config_app = typer.Typer(help="Inspect the configuration.", no_args_is_help=True)
app.add_typer(config_app, name="config")

@app.command()
def serve(
    config: ConfigOption = None,
    log_format: LogFormatOption = None,
    role: Annotated[str, typer.Option(
        help="all: every part in this process (the default). In a cluster on a PostgreSQL "
             "state: listener (receive and spool), worker (assemble studies, run the model, "
             "write results) or sender (deliver the outbox)")] = "all",
) -> None:
    """Run the agent: the DICOM listener, study assembly, the worker and the outbox."""
    from radlens.agent.service import Agent

    settings = cli_settings(config, log_format)

    def reload_settings() -> Settings:  # SIGHUP: the same file and overrides, read again
        from radlens.config import load_settings

        fresh = load_settings(config)
        if log_format is not None:
            fresh.log.format = log_format  # type: ignore[assignment]
        return fresh

    try:
        Agent(settings, role=role, reload_settings=reload_settings).run_until_signalled()
    except OSError as exc:
        raise fail(f"cannot start: {exc}", 1) from None
    except RadlensError as exc:
        raise fail(str(exc), 1) from None


@app.command()
def echo(
    host: Annotated[str, typer.Argument(help="host of the remote node")],
    port: Annotated[int, typer.Argument(help="its DICOM port")],
    aet: Annotated[str, typer.Argument(help="its AE title (called AE)")],
    calling_aet: Annotated[str | None, typer.Option(help="our AE title (default dicom.ae_title)")]
    = None,
    timeout: Annotated[float, typer.Option(help="seconds")] = 10.0,
    tls: Annotated[bool, typer.Option("--tls", help="DICOM TLS, showing dicom.tls.certificate "
                                      "and trusting dicom.tls.ca_certificates")] = False,
    ca: Annotated[Path | None, typer.Option(help="with --tls: trust this CA bundle instead",
                                            dir_okay=False, exists=True)] = None,
    config: ConfigOption = None,
) -> None:
    """Send a C-ECHO to a DICOM node."""
    from radlens.dicom_io.scu import echo as send_echo
    from radlens.dicom_io.tls import client_context

    settings = cli_settings(config, client=True)
    started = time.perf_counter()
    try:
        context = client_context(settings.dicom.tls, ca) if tls else None
        status = send_echo(host, port, aet, calling_aet=calling_aet or settings.dicom.ae_title,
                           timeout_s=timeout, tls_context=context)
    except ConfigError as exc:
        raise fail(f"config error: {exc}", 2) from None
    except RadlensError as exc:
        raise fail(f"C-ECHO failed: {exc}", 1) from None
    elapsed_ms = (time.perf_counter() - started) * 1000
    if status != 0:
        raise fail(f"C-ECHO to {aet}@{host}:{port} answered 0x{status:04X}", 1)
    console.print(f"C-ECHO to {aet}@{host}:{port}: Success in {elapsed_ms:.0f} ms")


@app.command()
def status(
    config: ConfigOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
) -> None:
    """Counts of instances, studies, jobs and deliveries, whether the agent runs or not."""
    from radlens.agent.status import collect_status

    settings = cli_settings(config)
    report = collect_status(settings.storage.data_dir,
                            settings.state.resolved_url(settings.storage.data_dir),
                            heartbeat_interval_s=settings.cluster.heartbeat_interval_s,
                            retention=settings.retention)
    audit_command(settings, "query", command="radlens status")
    if as_json:
        console.print_json(report.model_dump_json())
        return
    agent = report.agent
    running = (f"[green]running[/] pid {agent.pid}, {agent.ae_title}@{agent.host}:{agent.port}"
               if agent.running else "[yellow]not running[/]")
    console.print(f"radlens {__version__}  agent: {running}")
    if agent.running:
        for kind, pids, restarts in (("listener", agent.listener_pids, agent.listener_restarts),
                                     ("worker", agent.worker_pids, agent.worker_restarts),
                                     ("sender", agent.sender_pids, agent.sender_restarts)):
            if pids and pids != [agent.pid]:
                console.print(f"{kind} processes: {len(pids)} (pids "
                              f"{', '.join(map(str, pids))}; restarted {restarts} times)")
    if agent.running and agent.worker_waiting:
        console.print(f"[yellow]jobs wait[/]: {agent.worker_waiting}", highlight=False)
    console.print(f"data: {report.data_dir}")
    console.print(f"state: {report.state}")
    if report.disk:
        disk = report.disk
        console.print(f"disk: {disk['total']:.1f} MB held (spool {disk['spool']:.1f}, results "
                      f"{disk['results']:.1f}, quarantine {disk['quarantine']:.1f}, state "
                      f"{disk['state']:.1f}); {disk['free']:.0f} MB free", highlight=False)
        console.print(f"next retention sweep: {operations.describe_sweep(report.next_sweep)}",
                      highlight=False)
    last = (datetime.fromtimestamp(report.last_received_at, UTC).strftime("%Y-%m-%d %H:%M:%SZ")
            if report.last_received_at else "never")
    table = Table(title="received", show_header=False)
    table.add_row("instances", f"{report.instances} ({report.instance_bytes / 2**20:.1f} MiB)")
    table.add_row("studies", str(report.studies))
    table.add_row("waiting for study completion", str(report.pending_instances))
    table.add_row("quarantined", str(report.quarantined))
    table.add_row("last received", last)
    console.print(table)
    jobs = Table(title="jobs")
    for state in report.jobs:
        jobs.add_column(state, justify="right")
    jobs.add_row(*(str(n) for n in report.jobs.values()))
    console.print(jobs)
    deliveries = Table(title="outbox")
    deliveries.add_column("destination")
    for state in ("pending", "sent", "failed"):
        deliveries.add_column(state, justify="right")
    for name, counts in report.outbox.items():
        deliveries.add_row(name, *(str(counts.get(s, 0)) for s in ("pending", "sent", "failed")))
    if report.outbox:
        console.print(deliveries)
    else:
        console.print("outbox: nothing queued")
    if report.nodes:
        node_table = Table(title="nodes")
        for column in ("node", "role", "host", "pid", "last heartbeat", ""):
            node_table.add_column(column)
        for node in report.nodes:
            beat = datetime.fromtimestamp(node.heartbeat_at, UTC).strftime("%H:%M:%SZ")
            state = ("[green]alive[/]" if node.alive else
                     "stopped" if node.stopped_at else "[red]silent[/]")
            node_table.add_row(node.id, node.role, node.host, str(node.pid), beat, state)
        console.print(node_table)
    for job in report.running:
        console.print(f"job {job['id']} running on {job['claimed_by'] or '?'} (attempt "
                      f"{job['attempts']})", highlight=False)
    for failure in report.recent_failures:
        console.print(f"[red]job {failure['id']} failed[/]: {failure['error']}", highlight=False)
    for job in report.retrying:
        console.print(f"[yellow]job {job['id']} will be retried[/] (attempt {job['attempts']} "
                      f"failed): {job['error']}", highlight=False)
    if report.latest_job_timings:
        seconds = report.latest_job_timings["seconds"]
        assert isinstance(seconds, dict)
        console.print(f"latest job {report.latest_job_timings['job']}: " + ", ".join(
            f"{stage} {value:.2f} s" for stage, value in seconds.items()), highlight=False)
    if report.recent_not_analysed:
        skipped = Table(title="not analysed (latest studies)")
        for column in ("study", "object", "reason"):
            skipped.add_column(column, overflow="fold")
        for item in report.recent_not_analysed:
            skipped.add_row(str(item["study"]), str(item["sop"]), str(item["reason"]))
        console.print(skipped)
    if report.llm is not None:
        colour = "green" if report.llm.ready else "yellow"
        console.print(f"narrative: [{colour}]{report.llm.provider}[/] - ", end="")
        console.print(report.llm.message, markup=False, highlight=False, soft_wrap=True)


@app.command()
def forward(
    paths: Annotated[list[Path], typer.Argument(help="DICOM files or folders", exists=True)],
    to: Annotated[str, typer.Option("--to", help="destination name from the configuration")],
    config: ConfigOption = None,
) -> None:
    """Queue DICOM files for a destination; the running agent delivers them, with retries."""
    from radlens.agent.outbox import Outbox
    from radlens.db import Database

    settings = cli_settings(config, client=True)
    files = sorted(p for path in paths for p in ([path] if path.is_file() else path.rglob("*"))
                   if p.is_file())
    data_dir = settings.storage.data_dir.resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    db = Database(settings.state.resolved_url(data_dir), durable=settings.storage.fsync)
    outbox = Outbox(db, settings.outbox, settings.destinations, calling_aet=settings.dicom.ae_title)
    try:
        ids = outbox.enqueue(files, to)
    except ConfigError as exc:
        raise fail(f"config error: {exc}", 2) from None
    except RadlensError as exc:
        raise fail(str(exc), 1) from None
    finally:
        db.close()
    destination = settings.destination(to)
    audit_command(settings, "export", command="radlens forward", destination=to,
                  peer_ae=destination.ae_title,
                  peer_address=f"{destination.host}:{destination.port}", count=len(ids))
    console.print(f"queued {len(ids)} file(s) for {to}")


@app.command()
def process(
    paths: Annotated[list[Path], typer.Argument(help="DICOM files or folders", exists=True)],
    out: Annotated[Path, typer.Option(help="results/<StudyUID>/ go here")],
    config: ConfigOption = None,
    as_json: Annotated[bool, typer.Option(
        "--json", help="print a JSON summary on stdout instead of the tables: every study "
                       "with its outcome, every file that could not be read with the reason")]
    = False,
) -> None:
    """Run the agent's pipeline on files or folders, without the network: findings.json, SEG,
    SR, saliency map and overlay per study, as `radlens serve` writes them. A file that cannot
    be read costs only itself: it is listed with the reason and the rest is processed. Exit
    status 1 when any file was unreadable or any study failed, 0 otherwise."""
    from rich.progress import Progress

    from radlens.agent.offline import collect_studies, process_study
    from radlens.agent.service import load_tasks

    settings = cli_settings(config)
    try:
        analysers = load_tasks(settings)
    except RadlensError as exc:
        raise fail(str(exc), 1) from None
    if analysers is None:
        raise fail("no task is enabled (model.enabled, density.enabled...): nothing to "
                   "process", 2)
    studies, unreadable = collect_studies(paths)
    table = Table(title="processed")
    for column in ("study", "revision", "lesions", "SEG", "SR", "maps", "overlays", "outcome"):
        table.add_column(column)
    processed = []
    with Progress(console=err) as progress:
        task = progress.add_task("studies", total=len(studies))
        for study_uid, instances in studies.items():
            done = process_study(study_uid, instances, out / "results", analysers, settings)
            processed.append(done)
            table.add_row(study_uid, str(done.revision), str(done.lesions),
                          str(len(done.outputs.seg)), str(len(done.outputs.sr)),
                          str(len(done.outputs.parametric_map)), str(len(done.outputs.overlay)),
                          "failed" if done.error else "done")
            progress.advance(task)
    failed = [done for done in processed if done.error]
    status = 1 if (failed or unreadable or not studies) else 0
    if as_json:
        console.print_json(json.dumps(process_summary(processed, unreadable, status)))
    else:
        console.print(table)
        console.print(summary_table(processed, unreadable))
        if unreadable:
            console.print(unreadable_table(unreadable))
    for item in unreadable:  # one line each, whole, for grep and for the log
        err.print(f"not read: {item.path}: {item.reason}", markup=False, highlight=False,
                  soft_wrap=True)
    if not studies:
        raise fail("no DICOM study found in the given paths", 1)
    if failed or unreadable:
        problems = []
        if unreadable:
            problems.append(f"{len(unreadable)} file(s) could not be read (listed above)")
        if failed:
            problems.append(f"{len(failed)} of {len(processed)} studies failed (an SR saying "
                            "so was written for each; the log has the reason)")
        raise fail("; ".join(problems), status)


def unreadable_table(unreadable: list) -> Table:
    """Every file the batch could not read, with the reason: a PACS export routinely holds a
    few, and each one must be findable afterwards."""
    table = Table(title="not read")
    table.add_column("file", overflow="fold")
    table.add_column("reason", overflow="fold")
    for item in unreadable:
        table.add_row(str(item.path), item.reason)
    return table


def process_summary(processed: list, unreadable: list, status: int) -> dict[str, object]:
    """``radlens process --json``: what a script needs to act on a batch."""
    from radlens.agent.offline import outcome_counts

    return {
        "exit_status": status,
        "studies": [{
            "study_instance_uid": done.study_instance_uid, "revision": done.revision,
            "outcome": "failed" if done.error else "done", "error": done.error,
            "lesions": done.lesions,
            "findings": str(done.findings_path) if done.findings_path else None,
            "outputs": {kind: [str(p) for p in getattr(done.outputs, kind)]
                        for kind in ("seg", "sr", "parametric_map", "overlay", "pdf")},
        } for done in processed],
        "unreadable": [{"path": str(item.path), "reason": item.reason} for item in unreadable],
        "summary": outcome_counts(processed, unreadable),
    }


def summary_table(processed: list, unreadable: list) -> Table:
    """Files, studies, images analysed, and what was not analysed, counted by reason."""
    from radlens.agent.offline import outcome_counts

    counts = outcome_counts(processed, unreadable)
    table = Table(title="summary")
    table.add_column("what")
    table.add_column("count", justify="right")
    for what, count in counts.items():
        table.add_row(what, str(count))
    return table


@app.command()
def route(
    paths: Annotated[list[Path], typer.Argument(help="DICOM files or folders", exists=True)],
    calling_aet: Annotated[str | None, typer.Option(
        help="calling AE title the images would arrive from (routing rules may use it)")]
    = None,
    config: ConfigOption = None,
) -> None:
    """Say for each file which tasks would read it and why, and where each study's outputs
    would go."""
    from radlens.agent.offline import iter_files
    from radlens.agent.routing import ImageFacts, Router
    from radlens.dicom_io.nesting import read_bounded
    from radlens.models.cards import ModelError
    from radlens.tasks.base import TaskError
    from radlens.tasks.registry import all_tasks, configure

    settings = cli_settings(config)
    cards: dict[str, dict] = {}
    try:
        configure(settings)
    except TaskError as exc:
        raise fail(str(exc), 1) from None
    try:
        enabled = [task for task in all_tasks() if task.enabled(settings)]
        for task in enabled:
            cards[task.name] = task.card(settings)
        scopes = {task.name: task.scope(settings) for task in enabled}
    except (ModelError, OSError, ValueError) as exc:
        raise fail(f"cannot read a model's card: {exc}", 1) from None
    router = Router(settings.routing, scopes)
    table = Table(title="routing (" + (", ".join(
        f"{name}: {c.get('name')} {c.get('version')}" for name, c in cards.items())
        or "no task enabled") + ")")
    for column in ("file", "modality", "body part", "tasks", "why"):
        table.add_column(column, overflow="fold")
    try:
        files = list(iter_files(paths))
    except FileNotFoundError as exc:
        raise fail(str(exc), 2) from None
    studies: dict[str, list] = {}  # study UID -> [modalities, description]
    for path in files:
        try:
            ds = read_bounded(path, stop_before_pixels=True)
            facts = ImageFacts.from_dataset(ds)
        except Exception as exc:
            table.add_row(str(path), "", "", "none", f"not DICOM radlens can read ({exc})")
            continue
        if not enabled:
            chosen, reason = (), "no task is enabled (model.enabled, density.enabled...)"
        else:
            decision = router.route(facts, calling_aet)
            chosen, reason = decision.tasks, decision.reason
        # The model's name beside each task; versions are in the table's title.
        shown = ", ".join(f"{name} ({cards[name].get('name')})" for name in chosen) or "none"
        table.add_row(str(path), facts.modality or "-", facts.body_part or "-", shown, reason)
        study = studies.setdefault(str(ds.get("StudyInstanceUID", "?")), [set(), ""])
        study[0].add(facts.modality or "")
        study[1] = study[1] or str(ds.get("StudyDescription", "") or "")
    console.print(table)
    _print_delivery(settings, studies, calling_aet)


def _print_delivery(settings: Settings, studies: dict[str, list], calling_aet: str | None
                    ) -> None:
    """Where each study's outputs would go (delivery rules, each destination's kinds)."""
    from radlens.agent.delivery import StudySource, plan

    table = Table(title="delivery")
    for column in ("study", "destination", "gets", "why"):
        table.add_column(column, overflow="fold")
    for study, (modalities, description) in studies.items():
        chosen = plan(settings, StudySource(frozenset({calling_aet} if calling_aet else ()),
                                            frozenset(m for m in modalities if m),
                                            description))
        if not chosen.destinations:
            table.add_row(study, "none", "", chosen.reason)
        for destination in chosen.destinations:
            table.add_row(study, f"{destination.name} ({destination.ae_title}@"
                          f"{destination.host}:{destination.port})",
                          ", ".join(destination.outputs), chosen.reason)
        for missing in chosen.missing:
            table.add_row(study, missing, "", chosen.reason)
    console.print(table)


app.command()(research.phantoms)
app.add_typer(research.models_app, name="models")
app.command()(research.export)
app.command()(research.train)
app.command()(research.evaluate)
app.command("calibrate-ood")(research.calibrate_ood)
app.command()(research.cohort)
app.command("export-nifti")(research.export_nifti)
app.add_typer(research.dataset_app, name="dataset")
app.command()(operations.retention)
app.add_typer(operations.jobs_app, name="jobs")
app.add_typer(operations.outbox_app, name="outbox")
app.command("tls-selfsigned")(security.tls_selfsigned)
app.command()(security.audit)


@config_app.command("show")
def config_show(
    config: ConfigOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="JSON instead of YAML")] = False,
) -> None:
    """Print the effective configuration (defaults, file and environment merged)."""
    settings = cli_settings(config)
    data = settings.model_dump(mode="json")
    if as_json:
        sys.stdout.write(json.dumps(data, indent=2) + "\n")
    else:
        sys.stdout.write(yaml.safe_dump(data, sort_keys=False))


@app.command()
def conformance(
    out: Annotated[Path | None, typer.Option("--out", help="write it here (Markdown) instead "
                                             "of printing it")] = None,
) -> None:
    """The DICOM Conformance Statement, written from the code's own lists."""
    from radlens.conformance_statement import conformance_statement

    text = conformance_statement()
    if out is None:
        sys.stdout.write(text)
    else:
        out.write_text(text)
        console.print(f"written: {out}")


@app.command()
def version() -> None:
    """Print the radlens version."""
    console.print(__version__)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
