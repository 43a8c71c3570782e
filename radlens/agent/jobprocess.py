"""Jobs in worker processes of their own, so that no study can take the node down.

A study's analysis and writing (decoding, the model, saliency, the writers) is the only work in
radlens whose cost the sender decides: a 14 KB instance can ask pydicom for gigabytes, a clip
for minutes. So with ``worker.isolation: process`` (the default) it runs in a child process
started with ``multiprocessing``'s spawn method. The child loads the model once and keeps it
between jobs; the agent's process, which keeps the listener, the assembler and the outbox,
hands it one job at a time over a pipe and watches it: its resident memory every 100 ms
(``worker.max_memory_mb``), its time (``worker.job_timeout_s``) and whether it is alive. A child
past either limit is killed (SIGKILL), as is one that dies of anything else; that attempt of
that job fails with the reason ("exceeded 4096 MB", "killed by signal 9") and a fresh child
takes the next job. Memory is read from ``/proc`` (Linux); cgroups would be firmer but need a
privilege the agent does not have; ``RLIMIT_AS`` breaks torch, which reserves far more address
space than it uses.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from radlens.agent import analyses
from radlens.agent.analyses import FrameRecord
from radlens.agent.pipeline import RESULTS_DIR, StudyInput
from radlens.agent.queue import Job, JobQueue
from radlens.agent.worker import Deliver, Worker, write_job_outputs
from radlens.config import Settings
from radlens.errors import JobAttemptError, RadlensError, WorkerLostError
from radlens.findings import ModelRef
from radlens.history import ObservedItem
from radlens.logs import kv

log = logging.getLogger(__name__)

READY_TIMEOUT_S = 600.0  # loading torch and the models; a first start from a cold disk is slow
POLL_S = 0.1
STOP_TIMEOUT_S = 10.0


class WorkerStartError(RadlensError):
    """A worker process could not load its models: the agent cannot analyse anything."""


@dataclass(frozen=True)
class JobOutcome:
    """What a job's worker process hands back: the frames to record in the state, the DICOM
    objects to deliver (none when the model is off) and what the tasks observed for the
    patient's later studies."""

    records: list[FrameRecord]
    outputs: list[Path]
    observed: list[tuple[str, ObservedItem]] = field(default_factory=list)


def resident_mb(pid: int) -> float | None:
    """The process's resident memory (VmRSS) in MB; None where /proc does not tell."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as handle:
            for line in handle:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except (OSError, ValueError):
        return None
    return None


def death_reason(exitcode: int | None) -> str:
    if exitcode is None:
        return "the worker process stopped answering"
    if exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f"signal {-exitcode}"
        return f"the worker process was killed by signal {-exitcode} ({name})"
    return f"the worker process exited with status {exitcode}"


class JobProcess:
    """One worker process: started on first use (or by ``start``), restarted after a death."""

    def __init__(self, settings: Settings, *, index: int, llm_vision: bool = False,
                 on_started: Callable[[], None] | None = None,
                 on_lost: Callable[[str], None] | None = None) -> None:
        """``on_started()`` is told each time the process is ready (its first start and each
        restart); ``on_lost(cause)`` each time it is lost during a job ("memory", "time" or
        "died")."""
        self.settings = settings
        self.on_started = on_started
        self.on_lost = on_lost
        self.index = index
        self.llm_vision = llm_vision
        self.max_memory_mb = settings.worker.memory_limit_mb()
        self.timeout_s = settings.worker.job_timeout_s
        self._context = multiprocessing.get_context("spawn")
        self._process: Any = None
        self._conn: Connection | None = None
        self.model_ref: ModelRef | None = None
        self.starts = 0
        self.peak_mb = 0.0

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.is_alive()

    def start(self) -> ModelRef | None:
        """Start the process and wait until its models are loaded; WorkerStartError if it
        cannot (a broken model stops the agent at start-up, as it always has)."""
        parent, child = self._context.Pipe()
        process = self._context.Process(
            target=child_main, args=(child, self.settings, self.llm_vision, self.index),
            name=f"radlens-worker-{self.index}", daemon=True)
        process.start()
        child.close()
        self._process, self._conn = process, parent
        self.starts += 1
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not parent.poll(POLL_S):
            if not process.is_alive() or time.monotonic() > deadline:
                self.kill()
                raise WorkerStartError(f"worker process {self.index} did not start: "
                                       f"{death_reason(process.exitcode)}")
        try:
            kind, detail = parent.recv()
        except (EOFError, OSError):
            self.kill()
            raise WorkerStartError(f"worker process {self.index} did not start: "
                                   f"{death_reason(process.exitcode)}") from None
        if kind != "ready":
            self.kill()
            raise WorkerStartError(str(detail))
        self.model_ref = ModelRef.model_validate(detail) if detail else None
        if self.on_started is not None:
            self.on_started()
        log.info("worker process ready", extra=kv(worker=self.index, pid=process.pid,
                                                  max_memory_mb=self.max_memory_mb,
                                                  job_timeout_s=self.timeout_s))
        return self.model_ref

    def run(self, study: StudyInput) -> JobOutcome:
        """Run one job in the process (started first when it is not running). Raises
        JobAttemptError with the reason when the job failed inside the process, and
        WorkerLostError when the process had to be killed or died."""
        if not self.running:
            self.start()
        process, conn = self._process, self._conn  # ``kill`` from another thread clears them
        assert process is not None and conn is not None
        started = time.monotonic()
        try:
            conn.send(("job", study))
        except (OSError, ValueError):
            return self._lost(death_reason(process.exitcode), study)
        while True:
            try:
                ready = conn.poll(POLL_S)
            except (OSError, EOFError, ValueError):  # closed by ``kill`` meanwhile
                ready = False
            if ready:
                try:
                    kind, detail = conn.recv()
                except (EOFError, OSError, ValueError):
                    process.join(1.0)
                    return self._lost(death_reason(process.exitcode), study)
                if kind == "result":
                    records, outputs, observed = detail
                    return JobOutcome(records, outputs, observed)
                message, trace = detail
                log.error("job failed in the worker process", extra=kv(
                    job=study.job_id, study=study.study_instance_uid, error=message,
                    traceback=trace))
                raise JobAttemptError(message)
            if not process.is_alive():
                process.join(1.0)
                return self._lost(death_reason(process.exitcode), study)
            rss = resident_mb(process.pid)
            if rss is not None:
                self.peak_mb = max(self.peak_mb, rss)
                if rss > self.max_memory_mb:
                    return self._lost(f"the worker process exceeded {self.max_memory_mb} MB "
                                      f"(worker.max_memory_mb; it held {rss:.0f} MB)", study,
                                      cause="memory")
            if time.monotonic() - started > self.timeout_s:
                return self._lost(f"the job exceeded {self.timeout_s:g} s "
                                  "(worker.job_timeout_s)", study, cause="time")

    def _lost(self, reason: str, study: StudyInput, *, cause: str = "died") -> JobOutcome:
        self.kill()
        if self.on_lost is not None:
            self.on_lost(cause)
        log.error("worker process lost; the job's attempt fails and a new process takes the "
                  "next job", extra=kv(worker=self.index, job=study.job_id,
                                       study=study.study_instance_uid, reason=reason))
        raise WorkerLostError(reason)

    def kill(self) -> None:
        """SIGKILL: a process past its limits gets no chance to allocate more."""
        process, self._process = self._process, None
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        if process is not None:
            if process.is_alive():
                process.kill()
            process.join(5.0)

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> None:
        """Ask the process to stop between jobs, kill it if it does not in time."""
        if self._process is None:
            return
        if self._conn is not None:
            try:
                self._conn.send(("stop", None))
            except (OSError, ValueError):
                pass
        self._process.join(timeout_s)
        self.kill()


def child_main(conn: Connection, settings: Settings, llm_vision: bool, index: int) -> None:
    """The worker process: load the models, then run jobs until told to stop or the agent's
    end of the pipe closes. Signals from a terminal or a service manager, which reach every
    process of the node at once, are the agent's to act on: it stops its workers in order."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    _exit_with_the_agent()
    from radlens.logs import configure_logging

    configure_logging(settings.log.level, settings.log.format)
    if settings.model.threads == 0 and settings.worker.processes() > 1:
        # Each worker process takes its share of the cores, as cluster workers do.
        settings.model.threads = max(1, (os.cpu_count() or 1) // settings.worker.processes())
    try:
        from radlens.agent.service import load_tasks

        analysers = load_tasks(settings)
    except Exception as exc:  # noqa: BLE001 - the reason goes to the agent, which stops
        conn.send(("failed", str(exc) if isinstance(exc, RadlensError)
                   else f"{type(exc).__name__}: {exc}"))
        return
    from radlens.agent.pipeline import run_study
    from radlens.memory import release_freed_memory

    if analysers is not None:  # measurement's libraries, loaded with the models, not by a job
        import radlens.analysis.lesions  # noqa: F401
    results_root = settings.storage.data_dir.resolve() / RESULTS_DIR
    conn.send(("ready", analysers.model_ref.model_dump(mode="json") if analysers else None))
    log.info("worker process started", extra=kv(worker=index, pid=os.getpid()))
    while True:
        try:
            kind, study = conn.recv()
        except (EOFError, OSError):  # the agent is gone
            return
        if kind != "job":
            return
        try:
            result = run_study(study, results_root, analysers=analysers,
                               fsync=settings.storage.fsync)
            outputs: list[Path] = []
            if analysers is not None:
                outputs = write_job_outputs(study, result, analysers, results_root,
                                            llm=settings.llm, llm_vision=llm_vision,
                                            outputs=settings.outputs,
                                            fsync=settings.storage.fsync)
            conn.send(("result", (result.records, outputs, result.observed)))
        except Exception as exc:  # noqa: BLE001 - any error is this job's, told to the agent
            conn.send(("error", (f"{type(exc).__name__}: {exc}"[:2000],
                                 traceback.format_exc(limit=20)[-8000:])))
        finally:
            release_freed_memory()


def _exit_with_the_agent() -> None:
    """A worker process whose agent died (kill -9) stops at once, even mid-job: the restarted
    agent runs that job again, and two processes must never write one study's results."""
    agent = os.getppid()

    def watch() -> None:
        while True:
            time.sleep(1.0)
            if os.getppid() != agent:
                os._exit(0)

    threading.Thread(target=watch, name="radlens-agent-watch", daemon=True).start()


class ProcessWorker(Worker):
    """The worker of an agent with ``worker.isolation: process``: one slot per worker process
    (``WorkerSettings.processes``), each a thread of the agent that claims a job, runs it in
    its own worker process and ends it in the state (done with its outputs queued, or retried,
    or failed with its report). Everything the state sees is done here, in the agent; the
    process only computes and writes files, so a killed process leaves nothing half-recorded."""

    def __init__(self, queue: JobQueue, settings: Settings, *, llm_vision: bool = False,
                 deliver: Deliver | None = None,
                 on_queued: Callable[[int], None] | None = None,
                 on_finished: Callable[[Job, str], None] | None = None,
                 on_processes: Callable[[list[int], int], None] | None = None,
                 on_lost: Callable[[str], None] | None = None,
                 gate: Callable[[], str | None] | None = None,
                 on_waiting: Callable[[str | None], None] | None = None) -> None:
        """``on_processes(pids, restarts)`` is told whenever a worker process (re)starts, and
        ``on_lost(cause)`` whenever one is lost during a job."""
        super().__init__(queue, settings.storage.data_dir.resolve() / RESULTS_DIR,
                         fsync=settings.storage.fsync, outputs=settings.outputs,
                         deliver=deliver, on_queued=on_queued, on_finished=on_finished,
                         llm=settings.llm, llm_vision=llm_vision,
                         max_attempts=settings.jobs.max_attempts, gate=gate,
                         on_waiting=on_waiting)
        self.model_enabled = settings.model.enabled
        self.on_processes = on_processes
        self.processes = [JobProcess(settings, index=number + 1, llm_vision=llm_vision,
                                     on_started=self._process_started, on_lost=on_lost)
                          for number in range(settings.worker.processes())]
        self._slots = [threading.Thread(target=self._run_slot, args=(process,), daemon=True,
                                        name=f"radlens-worker-{process.index}")
                       for process in self.processes]
        self._running: dict[int, int] = {}  # worker index -> job id
        self._running_lock = threading.Lock()

    @property
    def compares_priors(self) -> bool:
        return self.model_enabled

    def start_processes(self) -> None:
        """Start every worker process, loading the models in parallel; WorkerStartError (the
        first one's) if any cannot, with every process stopped again."""
        errors: list[BaseException] = []

        def start(process: JobProcess) -> None:
            try:
                process.start()
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        starters = [threading.Thread(target=start, args=(p,)) for p in self.processes]
        for starter in starters:
            starter.start()
        for starter in starters:
            starter.join()
        if errors:
            for process in self.processes:
                process.kill()
            raise errors[0]

    @property
    def restarts(self) -> int:
        return sum(max(0, p.starts - 1) for p in self.processes)

    def _process_started(self) -> None:
        if self.on_processes is not None:
            self.on_processes(self.pids, self.restarts)

    @property
    def model_ref(self) -> ModelRef | None:
        return next((p.model_ref for p in self.processes if p.model_ref), None)

    def start(self) -> None:
        for slot in self._slots:
            slot.start()

    def stop(self, timeout_s: float) -> bool:
        """Stop claiming; wait for the jobs in flight; then stop the processes (one still
        busy is killed: its job stays running and runs again at the next start)."""
        deadline = time.monotonic() + timeout_s
        self._stop.set()
        self.queue.wakeup.set()
        for slot in self._slots:
            slot.join(timeout=max(0.0, deadline - time.monotonic()))
        finished = not any(slot.is_alive() for slot in self._slots)
        pids = self.pids
        for process in self.processes:
            process.stop(STOP_TIMEOUT_S if finished else 0.0)
        log.info("worker processes stopped", extra=kv(pids=pids, jobs_finished=finished))
        return finished

    @property
    def alive(self) -> bool:
        return any(slot.is_alive() for slot in self._slots) and not self._stop.is_set()

    @property
    def jobs_in_flight(self) -> list[int]:
        with self._running_lock:
            return list(self._running.values())

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.processes if p.pid is not None and p.running]

    def _run_slot(self, process: JobProcess) -> None:
        while not self._stop.is_set():
            job = self._claim()
            if job is None:
                continue
            with self._running_lock:
                self._running[process.index] = job.id
            try:
                self._run_in(process, job)
            except Exception:  # never lose the slot: the job's lease runs out, it runs again
                log.exception("job left unfinished", extra=kv(job=job.id))
            finally:
                with self._running_lock:
                    self._running.pop(process.index, None)

    def _run_in(self, process: JobProcess, job: Job) -> None:
        if self._abandoned(job):
            return
        log.info("job started", extra=kv(job=job.id, study=job.study_instance_uid,
                                         attempt=job.attempts, worker=process.index))
        try:
            study = self._study_input(job)
            try:
                outcome = process.run(study)
            except WorkerLostError:
                if self._stop.is_set():  # stopped by the agent's shutdown, not the job's fault
                    log.warning("job interrupted by the shutdown; it runs again at the next "
                                "start", extra=kv(job=job.id, study=job.study_instance_uid))
                    return
                raise
            if outcome.records:
                analyses.record(self.queue.db, job.id, job.study_instance_uid,
                                outcome.records)
            self._remember(job, study, outcome.observed)
            outputs = self._described(outcome.outputs)
        except Exception as exc:
            self._failed(job, exc)
            return
        self._done(job, outputs)
