"""Child processes of the agent, kept alive: started with a JSON config, restarted when they die.

With ``--role all`` the agent is a small supervisor: its listener processes and its sender run
apart from it (the worker processes are ``radlens.agent.jobprocess``'s), so that one of them
dying, whatever kills it, costs what it was doing and nothing else. Each child is ``python -m
<module>``; the agent writes its config as the first line of the child's stdin and may write
more lines later (commands; ``{"command": "stop"}`` ends it). The child answers with one JSON
object per line on its stdout: ``{"event": "ready"}`` once it serves, ``{"event": "failed",
"reason": ...}`` if it cannot, and events of its own, which go to ``on_event``. A child that
dies is started again at once if it had lived ``STABLE_AFTER_S``, else after a back-off (a crash
loop: a full disk, a broken install). A child watches its stdin: when the agent goes away, even
of kill -9, the pipe closes and the child ends at once, as if killed with it, so an orphan never
serves beside a restarted agent. Only the agent's word stops a child: SIGTERM and SIGINT are
ignored, because a service manager or a terminal signals every process of the node at once, and
the agent stops its children in order.

multiprocessing was checked and left for the listener and the sender: its pipes and
``Process.sentinel`` give no line protocol, and a subprocess needs no pickling of settings.
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
from typing import IO, Any

from radlens.errors import RadlensError
from radlens.logs import kv

log = logging.getLogger(__name__)

READY_TIMEOUT_S = 60.0
RESTART_DELAY_S = 1.0
RESTART_DELAY_MAX_S = 30.0
# A child that lived this long before dying is not crash-looping: restart it at once.
STABLE_AFTER_S = 10.0

EventCallback = Callable[[int, dict[str, Any]], None]
STOP = b'{"command": "stop"}\n'


class ChildProcessError(RadlensError):
    """A child process of the agent could not start."""


@dataclass
class _Child:
    index: int
    process: subprocess.Popen[bytes]
    started_at: float
    delay: float = 0.0  # how long its restart waited, for the back-off of the next one
    ready: threading.Event = field(default_factory=threading.Event)
    failure: str | None = None
    write_lock: threading.Lock = field(default_factory=threading.Lock)


class ChildProcesses:
    """``count`` children running ``module``, each told ``config``; the supervisor's side.

    ``on_event(index, message)`` is called from one reader thread per child for every line
    other than "ready" and "failed"; ``on_started(pids)`` whenever a child (re)starts serving.
    """

    def __init__(self, name: str, module: str, count: int, config: dict[str, Any], *,
                 grace_s: float, on_event: EventCallback | None = None,
                 on_started: Callable[[list[int]], None] | None = None) -> None:
        self.name = name
        self.module = module
        self.count = count
        self.config = config
        self.grace_s = grace_s
        self.on_event = on_event
        self.on_started = on_started
        self._children: dict[int, _Child] = {}
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self.restarts = 0

    @property
    def pids(self) -> list[int]:
        with self._lock:
            return [c.process.pid for c in self._children.values()]

    @property
    def alive(self) -> bool:
        """Every child runs (a child between its death and its restart counts as dead)."""
        with self._lock:
            return len(self._children) == self.count and all(
                c.process.poll() is None for c in self._children.values())

    def start(self) -> None:
        """Start every child and wait until each serves; raise ChildProcessError if one cannot
        (the ones started are stopped again)."""
        for index in range(1, self.count + 1):
            self._spawn(index)
        deadline = time.monotonic() + READY_TIMEOUT_S
        for child in list(self._children.values()):
            if not child.ready.wait(max(0.0, deadline - time.monotonic())) or child.failure:
                reason = child.failure or f"it was not ready within {READY_TIMEOUT_S:.0f} s"
                self.stop()
                raise ChildProcessError(f"{self.name} process {child.index} failed: {reason}")
        log.info(f"{self.name} processes started", extra=kv(processes=self.count,
                                                             pids=self.pids))

    def send(self, **message: Any) -> None:
        """One line to every running child's stdin; a child that is gone misses it (what it
        says must be safe to lose: its restart starts from the state database)."""
        data = (json.dumps(message) + "\n").encode()
        with self._lock:
            children = list(self._children.values())
        for child in children:
            if child.ready.is_set():
                self._write(child, data)

    @staticmethod
    def _write(child: _Child, data: bytes) -> None:
        if child.process.stdin is None:
            return
        with child.write_lock:
            try:
                child.process.stdin.write(data)
                child.process.stdin.flush()
            except (BrokenPipeError, ValueError, OSError):  # it is gone or going
                pass

    def _spawn(self, index: int, *, delay: float = 0.0) -> _Child | None:
        with self._lock:
            if self._stopping.is_set():
                return None
            process = subprocess.Popen(
                [sys.executable, "-m", self.module],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=None, close_fds=True,
            )
            child = _Child(index, process, time.monotonic(), delay)
            self._children[index] = child
        assert process.stdin is not None
        try:
            process.stdin.write((json.dumps(self.config) + "\n").encode())
            process.stdin.flush()
        except BrokenPipeError:  # it died at once: its reader reports the exit code
            pass
        threading.Thread(target=self._read, args=(child,), name=f"{self.name}-{index}",
                         daemon=True).start()
        return child

    def _read(self, child: _Child) -> None:
        """Follow one child's stdout until it ends; then restart the child unless stopping."""
        assert child.process.stdout is not None
        for line in child.process.stdout:
            try:
                message = json.loads(line)
                event = message["event"]
            except (ValueError, KeyError, TypeError):
                log.warning(f"unreadable line from {self.name} process", extra=kv(
                    index=child.index, line=line[:200].decode(errors="replace")))
                continue
            if event == "ready":
                log.info(f"{self.name} process ready", extra=kv(
                    index=child.index, pid=child.process.pid,
                    **{k: v for k, v in message.items() if k not in ("event", "pid")}))
                child.ready.set()
                if self.on_started is not None:
                    self.on_started(self.pids)
            elif event == "failed":
                child.failure = str(message.get("reason", "unknown"))
            elif self.on_event is not None:
                try:
                    self.on_event(child.index, message)
                except Exception:  # what a child reports never stops its reader
                    log.exception(f"cannot handle an event of a {self.name} process",
                                  extra=kv(event=event))
        code = child.process.wait()
        if not child.ready.is_set():
            child.failure = child.failure or f"it exited with code {code} before it was ready"
            child.ready.set()
        if self._stopping.is_set():
            return
        lived = time.monotonic() - child.started_at
        delay = 0.0 if lived > STABLE_AFTER_S else min(RESTART_DELAY_MAX_S,
                                                       max(RESTART_DELAY_S, 2 * child.delay))
        log.error(f"{self.name} process died; starting it again", extra=kv(
            index=child.index, pid=child.process.pid, exit_code=code, after_s=delay))
        if self._stopping.wait(delay):
            return
        self.restarts += 1  # counted before the new child can say it is ready
        if self._spawn(child.index, delay=delay) is None:
            self.restarts -= 1

    def stop_accepting(self) -> None:
        """Tell every child to stop (each finishes what it is doing within its grace); no
        child is restarted from now on."""
        with self._lock:
            self._stopping.set()
            children = list(self._children.values())
        for child in children:
            if child.process.poll() is None:
                self._write(child, STOP)

    def stop(self) -> None:
        """Stop every child (``stop_accepting`` if not done yet) and wait for it; a child that
        outstays the grace period is killed."""
        self.stop_accepting()
        with self._lock:
            children = list(self._children.values())
        deadline = time.monotonic() + self.grace_s + 5.0
        for child in children:
            try:
                child.process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning(f"{self.name} process did not stop in time; killed", extra=kv(
                    index=child.index, pid=child.process.pid))
                child.process.kill()
                child.process.wait()
            if child.process.stdin is not None:
                with child.write_lock:
                    child.process.stdin.close()


# -- the child's side ---------------------------------------------------------------------------
class Notifier:
    """Writes one JSON line per event to stdout; the child's threads share it."""

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


ChildServe = Callable[[dict[str, Any], Notifier, threading.Event], int]
# The exit code of a child whose agent went away: it ends at once, as if it had died with it.
EXIT_ORPHANED = 70


def run_child(serve: ChildServe, *, on_command: Callable[[dict[str, Any]], None] | None = None
              ) -> int:
    """A child's ``main``: read the config line, log as the agent does, stop on SIGTERM or when
    stdin closes, hand every later stdin line to ``on_command``; returns ``serve``'s exit code.
    """
    from radlens.config import LogSettings
    from radlens.logs import configure_logging

    stdin = sys.stdin.fileno()
    pending = b""
    while b"\n" not in pending:  # os.read, not sys.stdin: see watch_agent
        chunk = os.read(stdin, 65536)
        if not chunk:
            break
        pending += chunk
    first, _, pending = pending.partition(b"\n")
    config = json.loads(first or b"{}")
    settings = LogSettings.model_validate(config.get("log", {}))
    configure_logging(settings.level, settings.format)
    stop = threading.Event()

    def handle(line: bytes) -> None:
        if not line.strip():
            return
        try:
            message = json.loads(line)
            if message.get("command") == "stop":
                stop.set()
            elif on_command is not None:
                on_command(message)
        except Exception:
            log.exception("cannot handle a command from the agent")

    def watch_agent(pending: bytes) -> None:
        # stdin closes when the agent exits, however it exits. os.read, not sys.stdin: a
        # daemon thread blocked in a buffered read aborts the interpreter at exit.
        while True:
            while b"\n" in pending:
                line, _, pending = pending.partition(b"\n")
                handle(line)
            chunk = os.read(stdin, 65536)
            if not chunk:
                break
            pending += chunk
        # The agent is gone (killed, crashed): end now, as if killed with it. Nobody could hear
        # of what this process would finish, and a restarted agent must own the node alone:
        # the stores in flight fail at their senders, which send again; the spool's recovery
        # at the next start clears what they left.
        os._exit(EXIT_ORPHANED)

    threading.Thread(target=watch_agent, args=(pending,), name="agent-watch",
                     daemon=True).start()
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the agent stops us, in order
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # the agent says "reopen" on its SIGHUP
    return serve(config, Notifier(sys.stdout.buffer), stop)
