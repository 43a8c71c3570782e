"""The processes that serve the DICOM port.

With ``--role all`` the agent itself never accepts an association: it starts
``dicom.listener_processes`` listener processes (``python -m radlens.agent.listeners``, see
``radlens.agent.children``) that bind the port with SO_REUSEPORT, and the kernel spreads new
associations over them. The agent keeps the port bound without listening, so that no other
program can take it while a listener restarts. Each listener owns nothing but the "received"
step: it files instances in the spool and state index (durable before Success), then tells the
agent, one JSON line on its stdout, which study grew. Study assembly, jobs and the outbox stay
with the agent.

A lost line costs nothing: the instance is already durable and pending in the index, a study
timer picks up every pending instance of its study when it fires, and the assembly sweep arms
a timer for any pending study it finds. A listener that dies (even of kill -9) is started again;
the associations it was serving fail at their senders, which send again.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from radlens.agent.children import ChildProcesses, Notifier, run_child
from radlens.audit import AuditLog
from radlens.config import AuditSettings, DicomSettings, LogSettings, StorageSettings
from radlens.errors import RadlensError

log = logging.getLogger(__name__)

StoredCallback = Callable[[str, float, bool], None]


class ListenerProcesses(ChildProcesses):
    """The agent's side: ``count`` listeners on ``port`` (and ``tls_port``), restarted when
    they die. ``on_stored(study_uid, received_at, duplicate)`` hears of every instance one
    stored; ``on_listening(pids)`` of every (re)start."""

    def __init__(self, count: int, *, dicom: DicomSettings, storage: StorageSettings,
                 state_url: str, logging_settings: LogSettings, port: int,
                 on_stored: StoredCallback,
                 on_listening: Callable[[list[int]], None] | None = None,
                 tls_port: int | None = None,
                 audit_settings: AuditSettings | None = None,
                 identical_resend: str = "ignore") -> None:
        served = dicom.model_copy(update={"port": port})
        if tls_port is not None:
            served.tls = dicom.tls.model_copy(update={"port": tls_port})
        audit_settings = audit_settings or AuditSettings()
        config = {
            "dicom": served.model_dump(mode="json"),
            "audit": audit_settings.model_copy(update={
                "path": audit_settings.resolved_path(storage.data_dir.resolve())
            }).model_dump(mode="json"),
            "storage": storage.model_copy(
                update={"data_dir": storage.data_dir.resolve()}).model_dump(mode="json"),
            "state_url": state_url,
            "identical_resend": identical_resend,
            "log": logging_settings.model_dump(mode="json"),
        }
        self.on_stored = on_stored
        super().__init__("listener", "radlens.agent.listeners", count, config,
                         grace_s=dicom.shutdown_grace_s, on_event=self._event,
                         on_started=on_listening)

    def _event(self, index: int, message: dict[str, Any]) -> None:
        if message["event"] == "stored":
            self.on_stored(str(message["study"]), float(message["received_at"]),
                           bool(message.get("duplicate", False)))


# -- the listener process -----------------------------------------------------------------------
def serve_listener(config: dict[str, Any], notifier: Notifier, stop: threading.Event) -> int:
    """Run one listener until ``stop`` is set; returns the process exit code. Associations in
    flight get ``dicom.shutdown_grace_s`` to finish."""
    from radlens.db import Database
    from radlens.dicom_io.scp import StorageListener
    from radlens.dicom_io.spool import Spool, StoredInstance

    dicom = DicomSettings.model_validate(config["dicom"])
    storage = StorageSettings.model_validate(config["storage"])
    data_dir = Path(storage.data_dir)
    db = Database(str(config["state_url"]), durable=storage.fsync)
    spool = Spool(data_dir, db, fsync=storage.fsync, min_free_mb=storage.min_free_mb,
                  identical_resend=str(config.get("identical_resend", "ignore")))

    def on_stored(stored: StoredInstance) -> None:  # every arrival pushes the study's timer
        notifier.send(event="stored", study=stored.uids.study_instance_uid,
                      received_at=time.time(), duplicate=stored.duplicate)

    audit_settings = AuditSettings.model_validate(config.get("audit", {}))
    audit_log = AuditLog(audit_settings.resolved_path(data_dir), syslog=audit_settings.syslog)
    _audit_logs.append(audit_log)
    try:
        listener = StorageListener(dicom, spool, on_stored, reuse_port=True, audit=audit_log)
        listener.start()
    except RadlensError as exc:
        notifier.send(event="failed", reason=str(exc))
        return 1
    notifier.send(event="ready", port=listener.port, pid=os.getpid())
    stop.wait()
    listener.stop(dicom.shutdown_grace_s)
    audit_log.close()
    db.close()
    return 0


_audit_logs: list[AuditLog] = []  # this process's audit log, for the agent's "reopen"


def _command(message: dict[str, Any]) -> None:
    if message.get("command") == "reopen":
        for audit_log in _audit_logs:
            audit_log.reopen()
    elif message.get("command") == "log-level":
        logging.getLogger().setLevel(str(message.get("level", "INFO")))


def main() -> int:
    return run_child(serve_listener, on_command=_command)


if __name__ == "__main__":
    sys.exit(main())
