"""The audit trail: who sent what, who was refused, what left the node.

One JSON object a line, appended to ``audit.path`` (and optionally sent to a syslog collector
as RFC 5424), with the events of the DICOM audit messages (Application Activity, DICOM Instances
Transferred, Security Alert, Query, Export, Audit Log Used) and their coded event IDs, types and
outcome indicators, so a hospital's audit repository can map them. An entry carries UIDs, AE
titles and addresses, never a patient's name or ID.

Several processes (listener helpers) append to one file: each entry is one ``write`` on a
descriptor opened with O_APPEND, which a local file system keeps whole.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import IntEnum
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from radlens.errors import RadlensError
from radlens.logs import kv

log = logging.getLogger(__name__)


class AuditError(RadlensError):
    """The audit log cannot be opened or read."""


class Outcome(IntEnum):
    """DICOM's EventOutcomeIndicator."""

    SUCCESS = 0
    MINOR_FAILURE = 4
    SERIOUS_FAILURE = 8
    MAJOR_FAILURE = 12

    @property
    def label(self) -> str:
        return self.name.lower().replace("_", "-")


@dataclass(frozen=True)
class EventKind:
    """An audit event: our name for it, DICOM's EventID (DCM code and meaning) and action."""

    name: str
    code: str
    meaning: str
    action: str  # EventActionCode: C create, R read, U update, D delete, E execute


APPLICATION_ACTIVITY = EventKind("application-activity", "110100", "Application Activity", "E")
AUDIT_LOG_USED = EventKind("audit-log-used", "110101", "Audit Log Used", "R")
INSTANCES_TRANSFERRED = EventKind("instances-transferred", "110104",
                                  "DICOM Instances Transferred", "C")
EXPORT = EventKind("export", "110106", "Export", "R")
# Received instances or results removed (the retention sweep): DICOM Instances Accessed, Delete.
INSTANCES_DELETED = EventKind("instances-deleted", "110103", "DICOM Instances Accessed", "D")
QUERY = EventKind("query", "110112", "Query", "E")
SECURITY_ALERT = EventKind("security-alert", "110113", "Security Alert", "E")
# An association accepted or refused: DICOM's User Authentication event (a Login attempt by a
# node), so a refusal is also a Security Alert of type Node Authentication.
ASSOCIATION = EventKind("association", "110114", "User Authentication", "E")
EVENTS = {kind.name: kind for kind in (APPLICATION_ACTIVITY, AUDIT_LOG_USED, INSTANCES_TRANSFERRED,
                                       EXPORT, QUERY, SECURITY_ALERT, ASSOCIATION,
                                       INSTANCES_DELETED)}

# EventTypeCode values (DCM) used with the events above
APPLICATION_START = ("110120", "Application Start")
APPLICATION_STOP = ("110121", "Application Stop")
LOGIN = ("110122", "Login")
NODE_AUTHENTICATION = ("110126", "Node Authentication")
USE_OF_RESTRICTED_FUNCTION = ("110132", "Use of Restricted Function")

# Fields an entry may carry besides the fixed ones; anything else is a programming error.
_FIELDS = frozenset({
    "peer_ae", "peer_address", "local_ae", "reason", "direction", "study", "instances",
    "sop_classes", "destination", "tls", "port", "command", "count", "path", "role",
    "bytes", "failed", "cipher", "tls_version", "client_certificate", "what",
})


class AuditLog:
    """Appends audit entries; never raises into the caller (a failing audit write is logged
    at ERROR, the DICOM service goes on)."""

    def __init__(self, path: Path, *, node: str | None = None, syslog: str | None = None,
                 app_name: str = "radlens") -> None:
        self.path = path
        self.node = node or f"{socket.gethostname()}:{os.getpid()}"
        self.app_name = app_name
        self._lock = threading.Lock()
        self._fd: int | None = None
        self._syslog = SyslogSender(syslog, app_name) if syslog else None

    def _open(self) -> int:
        if self._fd is None:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
            except OSError as exc:
                raise AuditError(f"cannot open the audit log {self.path}: {exc}") from exc
        return self._fd

    def record(self, kind: EventKind, outcome: Outcome = Outcome.SUCCESS, *,
               event_type: tuple[str, str] | None = None, **fields: Any) -> dict[str, Any]:
        """Append one entry and return it. ``fields`` are the event's participants and
        objects (peer_ae, peer_address, study, instances, reason, ...)."""
        unknown = set(fields) - _FIELDS
        if unknown:
            raise ValueError(f"unknown audit fields: {', '.join(sorted(unknown))}")
        entry: dict[str, Any] = {
            "time": datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "event": kind.name,
            "outcome": outcome.label,
            "peer_ae": fields.pop("peer_ae", None),
            "peer_address": fields.pop("peer_address", None),
            "event_id": f"DCM {kind.code} {kind.meaning}",
            "event_action": kind.action,
            "outcome_code": int(outcome),
            "node": self.node,
        }
        if event_type is not None:
            entry["event_type"] = f"DCM {event_type[0]} {event_type[1]}"
        entry.update({key: value for key, value in fields.items() if value is not None})
        line = (json.dumps(entry, separators=(",", ":"), default=str) + "\n").encode()
        with self._lock:
            try:
                os.write(self._open(), line)
            except (OSError, AuditError) as exc:
                log.error("cannot write the audit log", extra=kv(path=str(self.path),
                                                                 error=str(exc)))
        if self._syslog is not None:
            self._syslog.send(entry)
        return entry

    def reopen(self) -> None:
        """Close the file so that the next entry opens ``path`` anew: after logrotate moved it
        aside (SIGHUP), entries go to the new file, none is lost in between."""
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
        if self._syslog is not None:
            self._syslog.close()


class SyslogSender:
    """RFC 5424 messages to a collector over UDP, or TCP with octet counting (RFC 6587), in
    the security/authorization facility (10). A collector that is down loses the syslog copy,
    never the file's."""

    FACILITY = 10

    def __init__(self, address: str, app_name: str) -> None:
        parts = urlsplit(address)
        if parts.hostname is None or parts.port is None or parts.scheme not in ("udp", "tcp"):
            raise AuditError(f"syslog address {address!r} is not udp://host:port or tcp://…")
        self.address = (parts.hostname, parts.port)
        self.tcp = parts.scheme == "tcp"
        self.app_name = app_name
        self.hostname = socket.gethostname()
        self._socket: socket.socket | None = None
        self._lock = threading.Lock()

    def format(self, entry: dict[str, Any]) -> bytes:
        severity = 5 if entry["outcome_code"] == 0 else 4  # notice, warning
        pri = self.FACILITY * 8 + severity
        body = json.dumps(entry, separators=(",", ":"), default=str)
        return (f"<{pri}>1 {entry['time']} {self.hostname} {self.app_name} {os.getpid()} "
                f"{entry['event']} - {body}").encode()

    def send(self, entry: dict[str, Any]) -> None:
        message = self.format(entry)
        with self._lock:
            try:
                if self._socket is None and self.tcp:
                    self._socket = socket.create_connection(self.address, timeout=5)
                elif self._socket is None:
                    family = socket.AF_INET6 if ":" in self.address[0] else socket.AF_INET
                    self._socket = socket.socket(family, socket.SOCK_DGRAM)
                if self.tcp:
                    self._socket.sendall(str(len(message)).encode() + b" " + message)
                else:
                    self._socket.sendto(message, self.address)
            except OSError as exc:
                log.warning("cannot send the audit entry to syslog", extra=kv(
                    address=f"{self.address[0]}:{self.address[1]}", error=str(exc)))
                if self._socket is not None:
                    self._socket.close()
                    self._socket = None

    def close(self) -> None:
        with self._lock:
            if self._socket is not None:
                self._socket.close()
                self._socket = None


class NullAuditLog(AuditLog):
    """Records nothing: for code paths run without an agent (unit tests of a listener)."""

    def __init__(self) -> None:
        super().__init__(Path(os.devnull), node="-")

    def record(self, kind: EventKind, outcome: Outcome = Outcome.SUCCESS, *,
               event_type: tuple[str, str] | None = None, **fields: Any) -> dict[str, Any]:
        return {}


def parse_since(text: str) -> datetime:
    """``30m``, ``1h``, ``2d`` back from now, or an ISO 8601 time (UTC when it has no zone)."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
    text = text.strip()
    if text and text[-1] in units and text[:-1].replace(".", "", 1).isdigit():
        return datetime.now(UTC) - timedelta(seconds=float(text[:-1]) * units[text[-1]])
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise AuditError(f"--since takes 30m, 1h, 2d or an ISO 8601 time, not {text!r}") from None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def read_entries(path: Path, since: datetime | None = None,
                 events: set[str] | None = None) -> Iterator[dict[str, Any]]:
    """The entries of ``path`` at or after ``since`` (of the ``events`` named), in file order.
    A line that is not an entry (a torn write after a crash) is skipped with a warning."""
    try:
        handle = path.open(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        raise AuditError(f"no audit log at {path} (nothing recorded yet, or audit.path "
                         "points elsewhere)") from None
    except OSError as exc:
        raise AuditError(f"cannot read the audit log {path}: {exc}") from exc
    with handle:
        for number, line in enumerate(handle, 1):
            try:
                entry = json.loads(line)
                moment = datetime.fromisoformat(str(entry["time"]).replace("Z", "+00:00"))
            except (ValueError, KeyError, TypeError):
                log.warning("unreadable audit line skipped", extra=kv(path=str(path),
                                                                      line=number))
                continue
            if since is not None and moment < since:
                continue
            if events and entry.get("event") not in events:
                continue
            yield entry
