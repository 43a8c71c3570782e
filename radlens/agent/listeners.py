"""More processes on the DICOM port, so that concurrent senders use every core.

With ``dicom.listener_processes: N`` the agent serves the port itself and starts N-1 helper
processes (``python -m radlens.agent.listeners``) that bind the same port with SO_REUSEPORT; the
kernel spreads new associations over all of them. Each helper owns nothing but the "received"
step: it files instances in the shared spool and state index exactly as the agent does
(durable before Success), then tells the agent, one JSON line on its stdout, which study grew.
Study assembly, jobs and the outbox stay in the agent.

A lost line costs nothing: the instance is already durable and pending in the index, a study
timer picks up every pending instance of its study when it fires, and the assembly sweep arms
a timer for any pending study it finds. A helper that dies (even of kill -9) is started again;
the associations it was serving fail at their senders, which send again. A helper watches its
stdin: when the agent goes away, even without a word, it stops too.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from radlens.config import AuditSettings, DicomSettings, LogSettings, StorageSettings
from radlens.errors import RadlensError
from radlens.logs import kv

log = logging.getLogger(__name__)

READY_TIMEOUT_S = 60.0
RESTART_DELAY_S = 1.0
RESTART_DELAY_MAX_S = 30.0
# A helper that lived this long before dying is not crash-looping: restart it at once.
STABLE_AFTER_S = 10.0

StoredCallback = Callable[[str, float], None]


class ListenerProcessError(RadlensError):
    """A listener process could not start."""


@dataclass
class _Helper:
    index: int
    process: subprocess.Popen[bytes]
    started_at: float
    delay: float = 0.0  # how long its restart waited, for the back-off of the next one
    ready: threading.Event = field(default_factory=threading.Event)
    failure: str | None = None


class ListenerProcesses:
    """The agent's side: start ``count`` helpers on ``port``, restart any that dies, stop them.

    ``on_stored(study_uid, received_at)`` is called from a reader thread per helper for every
    instance a helper stored; ``on_listening(pids)`` whenever a helper (re)starts listening.
    """

    def __init__(self, count: int, *, dicom: DicomSettings, storage: StorageSettings,
                 state_url: str, logging_settings: LogSettings, port: int,
                 on_stored: StoredCallback,
                 on_listening: Callable[[list[int]], None] | None = None,
                 tls_port: int | None = None,
                 audit_settings: AuditSettings | None = None,
                 identical_resend: str = "ignore") -> None:
        self.count = count
        served = dicom.model_copy(update={"port": port})
        if tls_port is not None:
            served.tls = dicom.tls.model_copy(update={"port": tls_port})
        audit_settings = audit_settings or AuditSettings()
        self.config = {
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
        self.grace_s = dicom.shutdown_grace_s
        self.on_stored = on_stored
        self.on_listening = on_listening
        self._helpers: dict[int, _Helper] = {}
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self.restarts = 0

    @property
    def pids(self) -> list[int]:
        with self._lock:
            return [h.process.pid for h in self._helpers.values()]

    def start(self) -> None:
        """Start every helper and wait until each listens; raise ListenerProcessError if one
        cannot (the ones started are stopped again)."""
        for index in range(1, self.count + 1):
            self._spawn(index)
        deadline = time.monotonic() + READY_TIMEOUT_S
        for helper in list(self._helpers.values()):
            if not helper.ready.wait(max(0.0, deadline - time.monotonic())) or helper.failure:
                reason = helper.failure or "it did not listen within " \
                                            f"{READY_TIMEOUT_S:.0f} s"
                self.stop()
                raise ListenerProcessError(f"listener process {helper.index} failed: {reason}")
        log.info("listener processes started", extra=kv(processes=self.count, pids=self.pids))

    def _spawn(self, index: int, *, delay: float = 0.0) -> _Helper | None:
        with self._lock:
            if self._stopping.is_set():
                return None
            process = subprocess.Popen(
                [sys.executable, "-m", "radlens.agent.listeners"],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=None, close_fds=True,
            )
            helper = _Helper(index, process, time.monotonic(), delay)
            self._helpers[index] = helper
        assert process.stdin is not None
        try:
            process.stdin.write((json.dumps(self.config) + "\n").encode())
            process.stdin.flush()
        except BrokenPipeError:  # it died at once: its reader reports the exit code
            pass
        threading.Thread(target=self._read, args=(helper,), name=f"listener-{index}",
                         daemon=True).start()
        return helper

    def _read(self, helper: _Helper) -> None:
        """Follow one helper's stdout until it ends; then restart the helper unless stopping."""
        assert helper.process.stdout is not None
        for line in helper.process.stdout:
            try:
                message = json.loads(line)
                event = message["event"]
            except (ValueError, KeyError, TypeError):
                log.warning("unreadable line from listener process", extra=kv(
                    index=helper.index, line=line[:200].decode(errors="replace")))
                continue
            if event == "stored":
                try:
                    self.on_stored(str(message["study"]), float(message["received_at"]))
                except Exception:  # the instance is durable; the sweep finds it anyway
                    log.exception("assembler notification failed", extra=kv(
                        study=message.get("study")))
            elif event == "ready":
                log.info("listener process listening", extra=kv(
                    index=helper.index, pid=helper.process.pid, port=message.get("port")))
                helper.ready.set()
                if self.on_listening is not None:
                    self.on_listening(self.pids)
            elif event == "failed":
                helper.failure = str(message.get("reason", "unknown"))
        code = helper.process.wait()
        if not helper.ready.is_set():
            helper.failure = helper.failure or f"it exited with code {code} before listening"
            helper.ready.set()
        if self._stopping.is_set():
            return
        lived = time.monotonic() - helper.started_at
        # A crash loop (a full disk, a broken install) backs off; a rare death restarts at once.
        delay = 0.0 if lived > STABLE_AFTER_S else min(RESTART_DELAY_MAX_S,
                                                       max(RESTART_DELAY_S, 2 * helper.delay))
        log.error("listener process died; starting it again", extra=kv(
            index=helper.index, pid=helper.process.pid, exit_code=code, after_s=delay))
        if self._stopping.wait(delay):
            return
        if self._spawn(helper.index, delay=delay) is not None:
            self.restarts += 1

    def stop_accepting(self) -> None:
        """Tell every helper to stop accepting and finish its stores (dicom.shutdown_grace_s);
        no helper is restarted from now on."""
        with self._lock:
            self._stopping.set()
            helpers = list(self._helpers.values())
        for helper in helpers:
            if helper.process.poll() is None:
                helper.process.send_signal(signal.SIGTERM)

    def stop(self) -> None:
        """Stop every helper (``stop_accepting`` if not done yet) and wait for it; a helper
        that outstays the grace period is killed."""
        self.stop_accepting()
        with self._lock:
            helpers = list(self._helpers.values())
        deadline = time.monotonic() + self.grace_s + 5.0
        for helper in helpers:
            try:
                helper.process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("listener process did not stop in time; killed", extra=kv(
                    index=helper.index, pid=helper.process.pid))
                helper.process.kill()
                helper.process.wait()
            if helper.process.stdin is not None:
                helper.process.stdin.close()


# -- the helper process -------------------------------------------------------------------------
class _Notifier:
    """Writes one JSON line per event to stdout; association threads share it."""

    def __init__(self, stream: IO[bytes]) -> None:
        self._stream = stream
        self._lock = threading.Lock()

    def send(self, **message: Any) -> None:
        data = (json.dumps(message) + "\n").encode()
        with self._lock:
            try:
                self._stream.write(data)
                self._stream.flush()
            except (BrokenPipeError, ValueError):  # the agent is gone: stdin's EOF stops us
                pass


def serve_helper(config: dict[str, Any], notifier: _Notifier, stop: threading.Event) -> int:
    """Run one helper until ``stop`` is set; returns the process exit code."""
    from radlens.audit import AuditLog
    from radlens.db import Database
    from radlens.dicom_io.scp import StorageListener
    from radlens.dicom_io.spool import Spool, StoredInstance

    dicom = DicomSettings.model_validate(config["dicom"])
    storage = StorageSettings.model_validate(config["storage"])
    data_dir = Path(storage.data_dir)
    db = Database(str(config["state_url"]), durable=storage.fsync)
    spool = Spool(data_dir, db, fsync=storage.fsync, min_free_mb=storage.min_free_mb,
                  identical_resend=str(config.get("identical_resend", "ignore")))

    def on_stored(stored: StoredInstance) -> None:
        notifier.send(event="stored", study=stored.uids.study_instance_uid,
                      received_at=time.time())  # every arrival pushes the study's timer

    audit_settings = AuditSettings.model_validate(config.get("audit", {}))
    audit_log = AuditLog(audit_settings.resolved_path(data_dir), syslog=audit_settings.syslog)
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


def main() -> int:
    from radlens.logs import configure_logging

    config = json.loads(sys.stdin.buffer.readline() or b"{}")
    settings = LogSettings.model_validate(config.get("log", {}))
    configure_logging(settings.level, settings.format)
    stop = threading.Event()

    def watch_agent() -> None:  # stdin closes when the agent exits, however it exits
        # os.read, not sys.stdin: a daemon thread blocked in a buffered read aborts the
        # interpreter at exit
        while os.read(sys.stdin.fileno(), 4096):
            pass
        stop.set()

    threading.Thread(target=watch_agent, name="agent-watch", daemon=True).start()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the agent; it stops us
    return serve_helper(config, _Notifier(sys.stdout.buffer), stop)


if __name__ == "__main__":
    sys.exit(main())
