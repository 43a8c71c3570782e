"""``radlens tls-selfsigned`` and ``radlens audit``: certificates for a pilot, and the audit
trail as a table."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from radlens.cli_support import ConfigOption, audit_command, cli_settings, console, fail


def tls_selfsigned(
    out: Annotated[Path, typer.Option("--out", help="folder for ca.crt, server.crt/.key and "
                                      "client.crt/.key", file_okay=False)],
    hostname: Annotated[list[str] | None, typer.Option(
        "--hostname", help="another name or address the server certificate must carry "
        "(repeatable); localhost, 127.0.0.1, ::1 and this machine's name are always in")] = None,
    days: Annotated[int, typer.Option(help="validity in days", min=1, max=3650)] = 825,
    force: Annotated[bool, typer.Option(help="overwrite files already there")] = False,
) -> None:
    """Make a CA and a server and a client certificate for DICOM TLS, for a test or a pilot.

    A hospital's own PKI should issue the certificates of a node in production.
    """
    from radlens.dicom_io.tls import write_self_signed

    existing = [name for name in ("ca.crt", "server.crt", "server.key", "client.crt",
                                  "client.key") if (out / name).exists()]
    if existing and not force:
        raise fail(f"{out} already holds {', '.join(existing)}; --force overwrites them", 1)
    try:
        files = write_self_signed(out, hostnames=hostname or [], days=days)
    except OSError as exc:
        raise fail(f"cannot write certificates into {out}: {exc}", 1) from None
    console.print(f"wrote {files.ca_certificate}, {files.server_certificate}, "
                  f"{files.server_key}, {files.client_certificate}, {files.client_key}",
                  highlight=False)
    console.print("dicom.tls: certificate server.crt, private_key server.key, ca_certificates "
                  "ca.crt; give senders ca.crt (and client.crt/.key if they must show one)",
                  highlight=False)


def audit(
    since: Annotated[str, typer.Option(help="how far back: 30m, 1h, 2d, or an ISO 8601 time")]
    = "24h",
    event: Annotated[list[str] | None, typer.Option(
        help="only these events (repeatable): application-activity, association, "
             "instances-transferred, security-alert, query, export, audit-log-used")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="the entries as JSON lines")] = False,
    config: ConfigOption = None,
) -> None:
    """Print the audit trail: associations, instances in and out, security alerts."""
    from radlens import audit as audit_trail
    from radlens.audit import AuditError, parse_since, read_entries

    settings = cli_settings(config, client=True)
    path = settings.audit.resolved_path(settings.storage.data_dir.resolve())
    unknown = sorted(set(event or ()) - set(audit_trail.EVENTS))
    if unknown:
        raise fail(f"unknown event {', '.join(unknown)} (known: "
                   f"{', '.join(audit_trail.EVENTS)})", 2)
    try:
        entries = list(read_entries(path, parse_since(since), set(event or ()) or None))
    except AuditError as exc:
        raise fail(str(exc), 1) from None
    # Reading the trail is itself an audit event.
    audit_command(settings, "audit-log-used", command="radlens audit", count=len(entries),
                  path=str(path))
    if as_json:
        for entry in entries:
            sys.stdout.write(json.dumps(entry) + "\n")
        return
    table = Table(title=f"audit since {since} ({len(entries)} entries)")
    for column in ("time", "event", "outcome", "peer", "address", "details"):
        table.add_column(column, overflow="fold")
    shown = {"time", "event", "outcome", "peer_ae", "peer_address", "event_id", "event_action",
             "outcome_code", "node", "event_type"}
    for entry in entries:
        outcome = str(entry.get("outcome"))
        colour = "green" if outcome == "success" else "yellow" if outcome == "minor-failure" \
            else "red"
        details = ", ".join(f"{key}={value}" for key, value in entry.items()
                            if key not in shown and value not in (None, [], ""))
        table.add_row(str(entry.get("time")), str(entry.get("event")),
                      f"[{colour}]{outcome}[/]", str(entry.get("peer_ae") or "-"),
                      str(entry.get("peer_address") or "-"), details)
    console.print(table)
