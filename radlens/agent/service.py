"""The agent's lifecycle: start every stage in order, stop them in reverse on SIGTERM/SIGINT.

With ``--role all`` and ``worker.isolation: process`` (the defaults) this process is a small
supervisor: the DICOM port is served by listener processes (radlens.agent.listeners), jobs run
in worker processes (radlens.agent.jobprocess) and the outbox in a sender process
(radlens.agent.sender). The supervisor keeps the study timers, the job queue and the state;
a child that dies is started again, and SIGTERM stops them in the order data flows: the
listeners finish their stores, the timers stop, the workers finish their jobs, the sender its
batch. ``worker.isolation: thread`` runs the whole node in this one process, for debugging.

Start-up recovers from any earlier crash: partial files are removed, spooled files missing from
the index are re-indexed (after an unclean stop only), interrupted jobs re-queued, study timers
re-armed from the state database, and the outbox resumes. One agent owns a data folder at a time
(an exclusive lock), so two processes can never assemble the same study twice.

With a shared state (PostgreSQL) a process may run one role of a cluster instead
(``radlens serve --role``): a listener spools and indexes; a worker sweeps quiet studies into
jobs, claims them under leases and queues their outputs; a sender delivers the outbox. Nodes of
a cluster share the data folder (shared storage) and never lock it; what keeps them apart is
the state database: conditional updates, ``FOR UPDATE SKIP LOCKED`` and leases.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import signal
import socket
import threading
import time
from collections.abc import Callable
from datetime import UTC
from pathlib import Path
from types import FrameType

from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.schedulers.background import BackgroundScheduler
from sqlalchemy.engine import Connection

from radlens import __version__, audit
from radlens.agent.assembler import StudyAssembler
from radlens.agent.children import ChildProcesses
from radlens.agent.health import HealthServer, NodeMetrics, StateCollector, state_answers
from radlens.agent.listeners import ListenerProcesses
from radlens.agent.nodes import ROLES, Node
from radlens.agent.outbox import Outbox
from radlens.agent.pipeline import RESULTS_DIR, TaskSet
from radlens.agent.queue import Job, JobQueue
from radlens.agent.sender import SenderProcess
from radlens.agent.worker import Worker
from radlens.audit import AuditLog
from radlens.config import LlmSettings, Settings
from radlens.db import Database, is_sqlite, redacted
from radlens.dicom_io.acceptor import reserve_port
from radlens.dicom_io.scp import PortInUseError, StorageListener, check_port_free
from radlens.dicom_io.scu import OutgoingFile
from radlens.dicom_io.spool import Spool, StoredInstance
from radlens.errors import RadlensError
from radlens.logs import kv

log = logging.getLogger(__name__)

LLM_STATUS_FILE = "llm-status.json"

LOCK_FILE = "radlens.lock"
# The sections of the configuration a SIGHUP applies while the node runs; any other change
# waits for a restart (and the log says which).
LIVE_SECTIONS = frozenset({"destinations", "delivery", "retention", "outbox", "log"})
CLEAN_STOP_MARKER = "clean-stop"
SWEEP_INTERVAL_S = 30.0
STALE_PARTIAL_S = 3600.0  # a cluster listener removes only partial files older than this


class AgentAlreadyRunningError(RadlensError):
    """Another radlens process holds the data folder."""


class DataDirLock:
    """An exclusive flock on ``<data>/radlens.lock`` holding the owner's pid and address."""

    def __init__(self, data_dir: Path) -> None:
        self.path = data_dir / LOCK_FILE
        self._handle: int | None = None
        self._details: dict[str, object] = {}
        self._update_lock = threading.Lock()

    def acquire(self, details: dict[str, object]) -> None:
        handle = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(handle)
            owner = read_lock_details(self.path)
            raise AgentAlreadyRunningError(
                f"another radlens agent (pid {owner.get('pid', '?')}) is using "
                f"{self.path.parent}"
            ) from None
        os.ftruncate(handle, 0)
        os.write(handle, json.dumps(details).encode())
        os.fsync(handle)
        self._handle = handle
        self._details = dict(details)

    def update(self, **details: object) -> None:
        """Add to the details ``radlens status`` reads (the owner holds the lock throughout)."""
        with self._update_lock:
            if self._handle is None:
                return
            self._details.update(details)
            os.ftruncate(self._handle, 0)
            os.pwrite(self._handle, json.dumps(self._details).encode(), 0)

    def release(self) -> None:
        if self._handle is not None:
            os.ftruncate(self._handle, 0)
            fcntl.flock(self._handle, fcntl.LOCK_UN)
            os.close(self._handle)
            self._handle = None


def read_lock_details(path: Path) -> dict[str, object]:
    try:
        return dict(json.loads(path.read_text() or "{}"))
    except (OSError, ValueError):
        return {}


def agent_is_running(data_dir: Path) -> dict[str, object] | None:
    """The running agent's details if one holds the data folder, else None."""
    path = data_dir / LOCK_FILE
    if not path.exists():
        return None
    handle = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return read_lock_details(path)
    else:
        fcntl.flock(handle, fcntl.LOCK_UN)
        return None
    finally:
        os.close(handle)


def load_tasks(settings: Settings) -> TaskSet | None:
    """Every enabled task's model, loaded once at start-up so a broken one fails loudly there,
    and the router over their scopes. None when no task is enabled: images are decoded and
    described, not analysed."""
    from radlens.agent.routing import Router
    from radlens.tasks.base import TaskError
    from radlens.tasks.registry import all_tasks, configure, problems

    try:
        configure(settings)
    except TaskError as exc:
        raise RadlensError(str(exc)) from exc
    for problem in problems():
        log.error("task plug-in not loaded", extra=kv(problem=problem))
    enabled = [task for task in all_tasks() if task.enabled(settings)]
    for task in all_tasks():
        if task not in enabled:
            log.info("task disabled: its images are not analysed", extra=kv(task=task.name))
    if not enabled:
        log.info("no task enabled: images are decoded but not analysed")
        return None
    # Tasks share the lesion model's device; with the model stage on Ray the workers keep the
    # CPU and the actors the GPUs. (torch is imported here, not above: a node with every task
    # disabled never loads it, which spares each worker process about 250 MB.)
    from radlens.models.device import resolve_device

    try:
        device = ("cpu" if settings.compute.backend == "ray"
                  else str(resolve_device(settings.model.device)))
    except ValueError as exc:  # cuda asked for, none present
        raise RadlensError(f"model.device: {exc}") from exc
    loaded = {}
    for task in enabled:
        try:
            loaded[task.name] = task.load(settings, device=device)
        except TaskError as exc:
            raise RadlensError(str(exc)) from exc
        model = loaded[task.name].model_ref
        log.info("task loaded", extra=kv(task=task.name, origin=task.origin, name=model.name,
                                         version=model.version, device=device,
                                         ood_threshold=loaded[task.name].ood_threshold))
    scopes = {name: task.scope for name, task in loaded.items()}
    return TaskSet(loaded, Router(settings.routing, scopes), tuple(settings.model.saliency))


def check_llm(settings: LlmSettings, data_dir: Path) -> bool:
    """Check the narrative's LLM once at start-up; log it and leave it for ``radlens status``.
    Returns whether the model takes images. The agent runs either way: without the LLM the
    template writes the narrative."""
    if settings.provider == "template":
        state = {"provider": "template", "ready": True, "vision": False,
                 "message": "deterministic template (llm.provider: template)"}
    else:
        from radlens.reporting.ollama import OllamaNarrator

        found = OllamaNarrator(settings).status()
        state = {"provider": "ollama", "host": found.host, "model": found.model,
                 "ready": found.ready, "vision": found.vision, "message": found.message}
        (log.info if found.ready else log.warning)(
            "narrative LLM " + ("ready" if found.ready else "unavailable"),
            extra=kv(host=found.host, model=found.model, vision=found.vision,
                     detail=found.message))
    state["checked_at"] = time.time()
    (data_dir / LLM_STATUS_FILE).write_text(json.dumps(state))
    return bool(state["vision"])


class Agent:
    """Listener -> spool -> assembler -> jobs -> worker -> outbox, wired together; or, with a
    ``role`` other than "all", the part of them that role runs."""

    def __init__(self, settings: Settings, role: str = "all", *,
                 reload_settings: Callable[[], Settings] | None = None) -> None:
        """``reload_settings`` reads the configuration again (SIGHUP); without it a SIGHUP
        only reopens the audit trail."""
        self.reload_settings = reload_settings
        if role not in ROLES:
            raise RadlensError(f"unknown role {role!r} (one of {', '.join(ROLES)})")
        self.settings = settings
        self.role = role
        self.data_dir = settings.storage.data_dir.resolve()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.state_url = settings.state.resolved_url(self.data_dir)
        self._lock = DataDirLock(self.data_dir)
        self._stopping = threading.Event()
        self._reopening = threading.Event()
        self.db: Database | None = None
        self.node: Node | None = None
        self.listener: StorageListener | None = None
        self.listener_processes: ListenerProcesses | None = None
        self.worker: Worker | None = None
        self.outbox: Outbox | None = None
        self.sender: SenderProcess | None = None
        # Listener, worker and sender in processes of their own under this one (see above).
        self.supervised = role == "all" and settings.worker.isolation == "process"
        self._reserved_ports: list[socket.socket] = []
        self._sweeping = threading.Lock()
        self.metrics = NodeMetrics()
        self.health: HealthServer | None = None
        self.audit = AuditLog(settings.audit.resolved_path(self.data_dir),
                              syslog=settings.audit.syslog)

    def _runs(self, *roles: str) -> bool:
        return self.role == "all" or self.role in roles

    def start(self) -> None:
        s = self.settings
        if self.role != "all" and is_sqlite(self.state_url):
            raise RadlensError(
                f"--role {self.role} is one part of a cluster, whose nodes share one state: "
                "set state.url to a PostgreSQL database (a SQLite file cannot be shared "
                "between nodes); --role all runs every part in one process")
        if self.role == "all":
            self._lock.acquire({"pid": os.getpid(), "ae_title": s.dicom.ae_title,
                                "host": s.dicom.host, "port": s.dicom.port,
                                "version": __version__, "started_at": time.time()})
        try:
            self._start_stages()
        except BaseException:
            # What did start is stopped again: a half-started node must not linger as a
            # process that serves nothing (its threads would keep it alive).
            try:
                self._stop_stages(0.0, clean=False)
            except Exception:
                log.exception("cannot stop what had started")
            self._lock.release()
            raise

    def _start_stages(self) -> None:
        s = self.settings
        self.db = Database(self.state_url, durable=s.storage.fsync)
        self.node = Node(self.db, self.role).register()
        self.scheduler = BackgroundScheduler(
            timezone=UTC, executors={"default": ThreadPoolExecutor(max_workers=8)})
        self.queue = JobQueue(self.db, self.data_dir, node_id=self.node.id,
                              lease_s=s.cluster.lease_s)
        self.assembler: StudyAssembler | None = None
        if self.role == "all":
            self.assembler = StudyAssembler(self.scheduler, self.queue,
                                            quiet_period_s=s.assembly.quiet_period_s,
                                            max_wait_s=s.assembly.max_wait_s,
                                            recovery_wait_s=s.assembly.recovery_wait_s)
        if self._runs("worker", "sender"):
            self.outbox = Outbox(self.db, s.outbox, s.delivery_destinations(),
                                 calling_aet=s.dicom.ae_title,
                                 timeout_s=s.dicom.network_timeout_s, node_id=self.node.id,
                                 on_result=self.metrics.delivered, tls=s.dicom.tls,
                                 audit_log=self.audit)
        if self._runs("worker"):
            self.worker = self._make_worker()
        shared_port = s.dicom.listener_processes > 1
        if self._runs("listener"):
            self.spool = Spool(self.data_dir, self.db, fsync=s.storage.fsync,
                               min_free_mb=s.storage.min_free_mb,
                               identical_resend=s.assembly.identical_resend)
            if not self.supervised:
                self.listener = StorageListener(s.dicom, self.spool, on_stored=self._on_stored,
                                                reuse_port=shared_port, audit=self.audit)
            self._recover_spool()
        if self.role == "all" and is_sqlite(self.state_url):
            # The only node: whatever ran when it stopped was its own. In a cluster a dead
            # node's jobs come back when their leases run out.
            self.queue.requeue_interrupted()
        self.scheduler.start()
        self.scheduler.add_job(self._heartbeat, "interval", seconds=s.cluster.heartbeat_interval_s,
                               id="heartbeat", coalesce=True, max_instances=1)
        if self.assembler is not None:
            self.assembler.rebuild(at_start=True)
            self.scheduler.add_job(self.assembler.rebuild, "interval",
                                   seconds=SWEEP_INTERVAL_S, id="assembly-sweep",
                                   coalesce=True, max_instances=1)
        elif self.role == "worker":
            self.scheduler.add_job(self._sweep, "interval", seconds=s.cluster.sweep_interval_s,
                                   id="assembly-sweep", coalesce=True, max_instances=1)
        if self._runs("sender") and self.outbox is not None and not self.supervised:
            self.scheduler.add_job(self.outbox.deliver_due, "interval",
                                   seconds=s.outbox.poll_interval_s, id="outbox",
                                   coalesce=True, max_instances=1)
        if self._runs("worker"):
            self._schedule_retention()
        if s.cohort.schedule and self.role == "all":
            from apscheduler.triggers.cron import CronTrigger

            self.scheduler.add_job(self._scheduled_cohort, CronTrigger.from_crontab(
                s.cohort.schedule, timezone=UTC), id="cohort", coalesce=True, max_instances=1)
            log.info("cohort analysis scheduled", extra=kv(crontab=s.cohort.schedule))
        if self.worker is not None:
            self.worker.start()
        if self.supervised:
            self._start_children()
        elif self.listener is not None:
            if shared_port:
                if not s.dicom.tls.only:
                    check_port_free(s.dicom.host, s.dicom.port)
                if s.dicom.tls.enabled:
                    check_port_free(s.dicom.host, s.dicom.tls.port)
            self.listener.start()
            if shared_port:
                self.listener_processes = ListenerProcesses(
                    s.dicom.listener_processes - 1, dicom=s.dicom, storage=s.storage,
                    state_url=self.db.url, logging_settings=s.log, port=self.listener.port,
                    identical_resend=s.assembly.identical_resend,
                    tls_port=self.listener.tls_port, audit_settings=s.audit,
                    on_stored=self._helper_stored,
                    on_listening=lambda pids: self._lock.update(
                        listener_pids=[os.getpid(), *pids]))
                self.listener_processes.start()
        if s.metrics.port is not None:
            self._serve_health()
        self.audit.record(audit.APPLICATION_ACTIVITY, event_type=audit.APPLICATION_START,
                          local_ae=s.dicom.ae_title, role=self.role, port=self.port)
        log.info("radlens agent started", extra=kv(version=__version__, role=self.role,
                                                   node=self.node.id,
                                                   data_dir=str(self.data_dir),
                                                   state=redacted(self.state_url),
                                                   destinations=len(s.destinations)))

    def _schedule_retention(self) -> None:
        """The retention sweep: in full every ``retention.interval_s`` (the first a minute
        after start), and at once whenever a check finds the disk budget short."""
        from datetime import datetime, timedelta

        from radlens.agent.retention import RetentionSweeper

        assert self.db is not None
        r = self.settings.retention
        self.retention = RetentionSweeper(self.db, self.data_dir, r, audit_log=self.audit)
        self.scheduler.add_job(self._sweep_retention, "interval", seconds=r.interval_s,
                               id="retention-sweep", coalesce=True, max_instances=1,
                               next_run_time=datetime.now(UTC) + timedelta(
                                   seconds=min(60.0, r.interval_s)))
        self.scheduler.add_job(self._check_retention, "interval", seconds=r.check_interval_s,
                               id="retention-check", coalesce=True, max_instances=1)

    def _sweep_retention(self) -> None:
        with self._sweeping:
            try:
                self.retention.sweep()
            except Exception:  # the next sweep tries again; nothing is half-removed
                log.exception("retention sweep failed")

    def _check_retention(self) -> None:
        try:
            short = self.retention.needs_sweep()
        except Exception:
            log.exception("cannot check the disk budget")
            return
        if short:
            self._sweep_retention()

    def _job_gate(self) -> str | None:
        """Why jobs must wait now: too little free disk for a job's results."""
        need = self.settings.worker.min_free_mb
        if not need:
            return None
        try:
            free = shutil.disk_usage(self.data_dir).free // 2**20
        except OSError as exc:
            return f"cannot read the data folder's free space: {exc}"
        if free < need:
            return (f"{free} MB free on the data folder's disk, under worker.min_free_mb "
                    f"({need} MB): jobs wait until the retention sweep or an operator frees "
                    "space")
        return None

    @property
    def port(self) -> int | None:
        """The DICOM port this node serves (the TLS port when TLS is all there is)."""
        if self.listener is not None:
            return self.listener.port
        if self._reserved_ports:
            return int(self._reserved_ports[0].getsockname()[1])
        return None

    def _start_children(self) -> None:
        """The supervisor's children besides the workers: the sender, then the listeners on
        the port this process reserves (so the port is answered only once all can run)."""
        s = self.settings
        assert self.db is not None and self.node is not None
        if s.delivery_destinations():
            self.sender = SenderProcess(s, state_url=self.db.url, node_id=self.node.id,
                                        on_result=self.metrics.delivered,
                                        on_started=lambda pids: self._lock.update(
                                            sender_pids=pids,
                                            sender_restarts=self._restarts(self.sender)))
            self.sender.start()
        tls = s.dicom.tls
        ports = ([] if tls.only else [s.dicom.port]) + ([tls.port] if tls.enabled else [])
        for port in ports:
            check_port_free(s.dicom.host, port)
            self._reserved_ports.append(reserve_port(s.dicom.host, port))
        served = [int(r.getsockname()[1]) for r in self._reserved_ports]
        self.listener_processes = ListenerProcesses(
            s.dicom.listener_processes, dicom=s.dicom, storage=s.storage,
            state_url=self.db.url, logging_settings=s.log,
            port=s.dicom.port if tls.only else served[0],
            tls_port=served[-1] if tls.enabled else None, audit_settings=s.audit,
            identical_resend=s.assembly.identical_resend, on_stored=self._helper_stored,
            on_listening=lambda pids: self._lock.update(
                listener_pids=pids, listener_restarts=self._restarts(self.listener_processes)))
        self.listener_processes.start()

    @staticmethod
    def _restarts(children: ChildProcesses | None) -> int:
        return 0 if children is None else children.restarts

    def _make_worker(self) -> Worker:
        """The worker: with ``worker.isolation: process`` its jobs run in worker processes,
        started here (their models loaded) so that a broken model stops the start-up."""
        s = self.settings
        llm_vision = check_llm(s.llm, self.data_dir)
        if s.worker.isolation == "process":
            from radlens.agent.jobprocess import ProcessWorker

            worker = ProcessWorker(self.queue, s, llm_vision=llm_vision, gate=self._job_gate,
                                   on_waiting=lambda reason: self._lock.update(
                                       worker_waiting=reason),
                                   deliver=self._queue_results,
                                   on_queued=self._results_queued,
                                   on_finished=self._job_finished,
                                   on_processes=lambda pids, restarts: self._lock.update(
                                       worker_pids=pids, worker_restarts=restarts),
                                   on_lost=lambda cause: self.metrics.workers_lost.labels(
                                       cause).inc())
            worker.start_processes()
            return worker
        return Worker(self.queue, self.data_dir / RESULTS_DIR, analysers=load_tasks(s),
                      fsync=s.storage.fsync, outputs=s.outputs, deliver=self._queue_results,
                      on_queued=self._results_queued, on_finished=self._job_finished,
                      llm=s.llm, llm_vision=llm_vision, max_attempts=s.jobs.max_attempts,
                      concurrency=s.worker.processes(), gate=self._job_gate,
                      on_waiting=lambda reason: self._lock.update(worker_waiting=reason))

    def _recover_spool(self) -> None:
        """The spool after a crash: partial files removed, files missing from the index
        indexed. A cluster's listeners share the spool, so there a partial file is removed only
        once it is older than any store in flight could be, and the index is checked at every
        start (the clean-stop marker of a shared folder says nothing about this node)."""
        if self.role == "all":
            self.spool.remove_partials()
            marker = self.data_dir / CLEAN_STOP_MARKER
            if not marker.exists():  # the last run did not stop cleanly (or this is the first)
                self.spool.reconcile()
            marker.unlink(missing_ok=True)
            return
        self.spool.remove_partials(older_than_s=STALE_PARTIAL_S)
        self.spool.reconcile()

    def _serve_health(self) -> None:
        """``/healthz`` and ``/metrics`` (see radlens.agent.health): healthy while the state
        answers and every part this role runs is alive."""
        s = self.settings
        assert self.db is not None and self.node is not None
        self.metrics.registry.register(StateCollector(self.db, s.cluster.heartbeat_interval_s))
        checks = {"state": state_answers(self.db),
                  "scheduler": lambda: bool(self.scheduler.running)}
        if self.listener is not None:
            checks["listener"] = lambda: self.listener is not None and self.listener.running
        elif self.listener_processes is not None:
            checks["listener"] = lambda: self.listener_processes is not None and \
                self.listener_processes.alive
        if self.sender is not None:
            checks["sender"] = lambda: self.sender is not None and self.sender.alive
        if self.worker is not None:
            checks["worker"] = lambda: self.worker is not None and self.worker.alive
        try:
            self.health = HealthServer(s.metrics.host, s.metrics.port or 0, role=self.role,
                                       node_id=self.node.id, registry=self.metrics.registry,
                                       checks=checks).start()
        except OSError as exc:
            raise PortInUseError(f"cannot serve metrics on {s.metrics.host}:{s.metrics.port}: "
                                 f"{exc.strerror or exc}") from exc

    def _job_finished(self, job: Job, outcome: str) -> None:
        self.metrics.jobs_finished.labels(outcome).inc()
        try:
            last = self.queue.last_received(job)
        except Exception:  # metrics never cost a job
            log.exception("cannot read the study's turnaround", extra=kv(job=job.id))
            return
        if last is not None:
            self.metrics.turnaround.observe(max(0.0, time.time() - last))

    def _heartbeat(self) -> None:
        """Tell the other nodes this one is alive, and keep the leases of its jobs."""
        try:
            if self.node is not None:
                self.node.heartbeat()
            if self.worker is not None:
                self.queue.renew(self.worker.jobs_in_flight)
        except Exception:  # the state is unreachable for now; the next beat tries again
            log.exception("heartbeat failed")

    def _sweep(self) -> None:
        s = self.settings
        try:
            self.queue.sweep(s.assembly.quiet_period_s, s.assembly.max_wait_s)
        except Exception:
            log.exception("study sweep failed")

    def _helper_stored(self, study_uid: str, received_at: float, duplicate: bool) -> None:
        if not duplicate:
            self.metrics.received.inc()
        if self.assembler is not None:
            self.assembler.instance_received(study_uid, received_at)

    def _queue_results(self, conn: Connection, job_id: int, files: list[OutgoingFile]
                       ) -> None:
        """Queue a job's outputs, in the job's own transaction (see ``Worker``), for the
        destinations the delivery rules choose, each the kinds it takes (radlens.agent.delivery).
        """
        assert self.outbox is not None
        from pydicom.uid import KeyObjectSelectionDocumentStorage as note_class

        from radlens.agent.delivery import plan

        source, sources = self.queue.study_source(conn, job_id, self.data_dir)
        chosen = plan(self.settings, source)
        for missing in chosen.missing:
            log.warning("a delivery rule names the sender, which has no return address",
                        extra=kv(job=job_id, missing=missing))
        # A rejection note goes only where the objects it withdraws went (or are going).
        received = (self.queue.destinations_of_earlier_jobs(conn, job_id)
                    if any(f.sop_class_uid == note_class for f in files) else set())
        for destination in chosen.destinations:
            outgoing = [f for f in chosen.files_for(destination, files, sources)
                        if f.sop_class_uid != note_class or destination.name in received]
            if outgoing:
                self.outbox.enqueue(outgoing, destination.name, job_id=job_id, conn=conn)

    def _results_queued(self, job_id: int) -> None:
        """A node that also sends wakes its outbox; a worker leaves the rows to the senders."""
        if self.sender is not None:
            self.sender.wake()
        elif (self.settings.delivery_destinations() and self._runs("sender")
              and self.outbox is not None):
            self.scheduler.add_job(self.outbox.deliver_due, id=f"deliver-{job_id}",
                                   replace_existing=True)

    def _scheduled_cohort(self) -> None:
        from radlens.analysis.cohort import analyse_agent

        out = self.data_dir / "cohort" / time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        try:
            report = analyse_agent(self.db.url, out, latent=self.settings.cohort.latent)
        except ValueError as exc:
            log.info("scheduled cohort analysis skipped", extra=kv(reason=str(exc)))
            return
        from radlens.reporting.cohort_report import write_cohort_report

        narrative = write_cohort_report(out, report, self.settings.llm,
                                        vision_capable=self.worker.llm_vision)
        log.info("cohort analysis written", extra=kv(out=str(out), images=report["images"],
                                                     best=report["best"],
                                                     author=narrative.author))

    def _on_stored(self, stored: StoredInstance) -> None:
        if not stored.duplicate:
            self.metrics.received.inc()
        if self.assembler is not None:
            # Every arrival pushes the study's timer, a duplicate's too: a sender re-sending
            # after a crash is still sending that study, whatever it re-sends first.
            self.assembler.instance_received(stored.uids.study_instance_uid, time.time())

    def stop(self) -> None:
        """Stop accepting, finish stores in flight, then the timers, the worker, the sender,
        the database."""
        grace = self.settings.dicom.shutdown_grace_s
        log.info("stopping", extra=kv(grace_s=grace, role=self.role))
        try:
            self._stop_stages(grace, clean=True)
        finally:
            self.audit.record(audit.APPLICATION_ACTIVITY, event_type=audit.APPLICATION_STOP,
                              local_ae=self.settings.dicom.ae_title, role=self.role)
            self.audit.close()
            self._lock.release()
        log.info("radlens agent stopped")

    def _stop_stages(self, grace: float, *, clean: bool) -> None:
        """Stop whatever of the stages runs, in the order data flows. ``clean``: a stop after a
        full start, which the next start may trust (no spool check needed)."""
        helpers = self.listener_processes
        if helpers is not None:
            helpers.stop_accepting()
        if self.listener is not None:
            self.listener.stop(grace)
        if helpers is not None:
            helpers.stop()
        if hasattr(self, "scheduler") and self.scheduler.running:
            self.scheduler.shutdown(wait=True)
        if self.health is not None:
            self.health.stop()
        if self.worker is not None and not self.worker.stop(grace):
            log.warning("worker still busy at shutdown; its jobs re-run at next start",
                        extra=kv(jobs=self.worker.jobs_in_flight))
        if self.sender is not None:
            self.sender.stop()
        for reserved in self._reserved_ports:
            reserved.close()
        if self.db is not None:
            if self.node is not None:
                try:
                    self.node.stopped()
                except Exception:
                    log.exception("cannot record the node's stop")
            self.db.close()
            if self.role == "all" and clean:
                (self.data_dir / CLEAN_STOP_MARKER).touch()

    def request_stop(self, signum: int | None = None, frame: FrameType | None = None) -> None:
        self._stopping.set()

    def request_reopen(self, signum: int | None = None, frame: FrameType | None = None) -> None:
        self._reopening.set()

    def reload(self) -> None:
        """SIGHUP: read the configuration again and apply what can change while the node runs
        (destinations, delivery rules, retention, the outbox's back-off, the log level); name
        what needs a restart. A configuration that does not load changes nothing."""
        if self.reload_settings is None:
            return
        try:
            fresh = self.reload_settings()
        except (RadlensError, ValueError) as exc:
            log.error("configuration not reloaded; the node goes on as it was",
                      extra=kv(error=str(exc)))
            return
        old, new = self.settings.model_dump(mode="json"), fresh.model_dump(mode="json")
        changed = sorted(key for key in new if new[key] != old.get(key))
        restart = [key for key in changed if key not in LIVE_SECTIONS]
        if old["log"]["format"] != new["log"]["format"]:
            restart.append("log.format")  # the handlers are set up once
        for key in changed:
            if key in LIVE_SECTIONS:
                setattr(self.settings, key, getattr(fresh, key))
        if "log" in changed:
            logging.getLogger().setLevel(self.settings.log.level)
            if self.listener_processes is not None:
                self.listener_processes.send(command="log-level",
                                             level=self.settings.log.level)
        if hasattr(self, "retention"):
            self.retention.settings = self.settings.retention
        if self.outbox is not None and {"destinations", "outbox"} & set(changed):
            self.outbox.destinations = {d.name: d for d in self.settings.delivery_destinations()}
            self.outbox.settings = self.settings.outbox
        if self.supervised and {"destinations", "outbox", "log"} & set(changed):
            self._restart_sender()
        (log.warning if restart else log.info)("configuration reloaded", extra=kv(
            applied=[key for key in changed if key in LIVE_SECTIONS],
            needs_restart=restart))

    def _restart_sender(self) -> None:
        """A sender with the new destinations (its batch under way finishes first)."""
        if self.sender is not None:
            self.sender.stop()
            self.sender = None
        assert self.db is not None and self.node is not None
        if self.settings.delivery_destinations():
            self.sender = SenderProcess(self.settings, state_url=self.db.url,
                                        node_id=self.node.id,
                                        on_result=self.metrics.delivered,
                                        on_started=lambda pids: self._lock.update(
                                            sender_pids=pids,
                                            sender_restarts=self._restarts(self.sender)))
            self.sender.start()
        else:
            self._lock.update(sender_pids=[])

    def reopen_logs(self) -> None:
        """After logrotate moved the audit trail aside (SIGHUP): every process of the node
        writes its next entry to a new file at ``audit.path``."""
        self.audit.reopen()
        for children in (self.listener_processes, self.sender):
            if children is not None:
                children.send(command="reopen")
        log.info("audit trail reopened", extra=kv(path=str(self.audit.path)))

    def run_until_signalled(self) -> None:
        signal.signal(signal.SIGTERM, self.request_stop)
        signal.signal(signal.SIGINT, self.request_stop)
        signal.signal(signal.SIGHUP, self.request_reopen)
        self.start()
        try:
            while not self._stopping.wait(1.0):
                if self._reopening.is_set():
                    self._reopening.clear()
                    self.reopen_logs()
                    self.reload()
        finally:
            self.stop()
