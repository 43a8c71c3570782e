"""The sender process: the outbox of an agent run with ``--role all``, apart from the agent.

It sends what is due every ``outbox.poll_interval_s``, and at once when the agent says a job
queued results (a "deliver" line on its stdin). It reports each batch's outcome to the agent
(for ``/metrics``) as a "result" line. Everything it needs is in the state database, so one
that dies loses nothing: the rows it had claimed are freed when the next one starts (a
destination may then see an instance twice, which C-STORE allows: same SOP Instance UID, same
bytes).
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from collections.abc import Callable
from typing import Any

from radlens.agent.children import ChildProcesses, Notifier, run_child
from radlens.audit import AuditLog
from radlens.config import (
    AuditSettings,
    Destination,
    OutboxSettings,
    Settings,
    TlsSettings,
)
from radlens.logs import kv

log = logging.getLogger("radlens.agent.sender")  # run as __main__ in its process

ResultCallback = Callable[[str, str, int], None]


class SenderProcess(ChildProcesses):
    """The agent's side: one sender process, restarted when it dies."""

    def __init__(self, settings: Settings, *, state_url: str, node_id: str,
                 on_result: ResultCallback,
                 on_started: Callable[[list[int]], None] | None = None) -> None:
        data_dir = settings.storage.data_dir.resolve()
        config = {
            "state_url": state_url,
            "fsync": settings.storage.fsync,
            "node_id": node_id,
            "calling_aet": settings.dicom.ae_title,
            "timeout_s": settings.dicom.network_timeout_s,
            "tls": settings.dicom.tls.model_dump(mode="json"),
            "outbox": settings.outbox.model_dump(mode="json"),
            "destinations": [d.model_dump(mode="json") for d in settings.delivery_destinations()],
            "audit": settings.audit.model_copy(update={
                "path": settings.audit.resolved_path(data_dir)}).model_dump(mode="json"),
            "log": settings.log.model_dump(mode="json"),
        }
        self.on_result = on_result
        super().__init__("sender", "radlens.agent.sender", 1, config,
                         grace_s=settings.dicom.network_timeout_s, on_event=self._event,
                         on_started=on_started)

    def wake(self) -> None:
        """Send what is due now rather than at the next poll."""
        self.send(command="deliver")

    def _event(self, index: int, message: dict[str, Any]) -> None:
        if message["event"] == "result":
            self.on_result(str(message["destination"]), str(message["outcome"]),
                           int(message["count"]))


# -- the sender process -------------------------------------------------------------------------
_deliver_now = threading.Event()  # this process's one wake-up, set by the agent's "deliver"


_audit_logs: list[AuditLog] = []  # this process's audit log, for the agent's "reopen"


def _command(message: dict[str, Any]) -> None:
    if message.get("command") == "deliver":
        _deliver_now.set()
    elif message.get("command") == "reopen":
        for audit_log in _audit_logs:
            audit_log.reopen()
    elif message.get("command") == "log-level":
        logging.getLogger().setLevel(str(message.get("level", "INFO")))


def serve_sender(config: dict[str, Any], notifier: Notifier, stop: threading.Event) -> int:
    """Deliver until ``stop`` is set; a batch under way is finished first."""
    from radlens.agent.outbox import Outbox
    from radlens.db import Database

    settings = OutboxSettings.model_validate(config["outbox"])
    audit_settings = AuditSettings.model_validate(config["audit"])
    assert audit_settings.path is not None  # the agent resolves it against its data folder
    audit_log = AuditLog(audit_settings.path, syslog=audit_settings.syslog)
    _audit_logs.append(audit_log)
    db = Database(str(config["state_url"]), durable=bool(config["fsync"]))
    outbox = Outbox(db, settings,
                    [Destination.model_validate(d) for d in config["destinations"]],
                    calling_aet=str(config["calling_aet"]), timeout_s=float(config["timeout_s"]),
                    node_id=str(config["node_id"]),
                    on_result=lambda destination, outcome, count: notifier.send(
                        event="result", destination=destination, outcome=outcome, count=count),
                    tls=TlsSettings.model_validate(config["tls"]), audit_log=audit_log)
    outbox.take_over()
    notifier.send(event="ready", pid=os.getpid(), destinations=len(config["destinations"]))
    threading.Thread(target=lambda: (stop.wait(), _deliver_now.set()), name="stop-watch",
                     daemon=True).start()
    while not stop.is_set():
        try:
            outbox.deliver_due()
        except Exception:  # the state or a destination failed this round; the next tries again
            log.exception("delivery round failed")
        _deliver_now.wait(settings.poll_interval_s)
        _deliver_now.clear()
    audit_log.close()
    db.close()
    log.info("sender stopped", extra=kv(pid=os.getpid()))
    return 0


def main() -> int:
    return run_child(serve_sender, on_command=_command)


if __name__ == "__main__":
    sys.exit(main())
