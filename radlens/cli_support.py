"""What every ``radlens`` command shares: the consoles, the common options, configuration loading
and the one-line failure. Errors: one line on stderr, exit 2 for usage/config, 1 for failure."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from radlens.config import Settings, load_settings
from radlens.errors import ConfigError
from radlens.logs import configure_logging

console = Console()
err = Console(stderr=True)

ConfigOption = Annotated[
    Path | None,
    typer.Option("--config", "-c", help="YAML configuration file (default: built-in defaults; "
                 "RADLENS_CONFIG and RADLENS_* variables also apply).",
                 dir_okay=False),
]
LogFormatOption = Annotated[
    str | None, typer.Option("--log-format", help="text or json (overrides log.format)")]


def fail(message: str, code: int) -> typer.Exit:
    err.print(f"radlens: {message}", markup=False, highlight=False, soft_wrap=True)
    return typer.Exit(code)


def cli_settings(config: Path | None, log_format: str | None = None, *,
              client: bool = False) -> Settings:
    try:
        settings = load_settings(config)
        if log_format is not None:
            settings.log.format = log_format  # type: ignore[assignment]
    except ConfigError as exc:
        raise fail(f"config error: {exc}", 2) from None
    except ValueError as exc:  # validate_assignment on --log-format
        raise fail(f"config error: log.format: {exc.errors()[0]['msg']}", 2) from None  # type: ignore[attr-defined]
    configure_logging(settings.log.level, settings.log.format, quiet_network=client)
    return settings


def audit_command(settings: Settings, kind: str, **fields: object) -> None:
    """Record a command that reads or exports results in the audit trail (Query, Export)."""
    from radlens import audit

    path = settings.audit.resolved_path(settings.storage.data_dir.resolve())
    if not path.parent.is_dir():  # no agent has run here: nothing was there to read
        return
    log = audit.AuditLog(path, syslog=settings.audit.syslog)
    try:
        log.record(audit.EVENTS[kind], **fields)  # type: ignore[arg-type]
    finally:
        log.close()
