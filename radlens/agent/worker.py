"""The worker: owns the "processed" state. Claims queued jobs and runs the pipeline on each.

A job runs in two steps: the model stage (decode, inference, saliency, measurement, findings)
on the worker's thread, then the writers (narrative, SEG, SR, maps, overlay, PDF) and the
hand-over to the outbox. With ``concurrency`` 2 the writers of one study run on a thread of
their own while the next study is in the model (torch leaves the GIL while it computes); the
model stage waits for a free slot, so at most ``concurrency`` studies are in memory. A job is
done only when its writers are. One bad study never stops it: any error is recorded on the
job (retried, then failed) and in the log.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from radlens import history
from radlens.agent import analyses
from radlens.agent.outbox import describe_file
from radlens.agent.pipeline import StudyInput, StudyResult, TaskSet, run_study
from radlens.agent.queue import Job, JobInstance, JobQueue
from radlens.config import LlmSettings, OutputSettings
from radlens.dicom_io.scu import OutgoingFile
from radlens.errors import JobAttemptError
from radlens.findings import ModelRef
from radlens.history import ObservedItem, PatientHistory
from radlens.logs import kv
from radlens.memory import release_freed_memory

# deliver(conn, job_id, files): queue a job's outputs in the outbox, inside the transaction
# that marks the job done (or failed), so they are queued exactly once.
Deliver = Callable[[Connection, int, list[OutgoingFile]], None]

log = logging.getLogger(__name__)


class Worker:
    def __init__(self, queue: JobQueue, results_root: Path, *, analysers: TaskSet | None = None,
                 fsync: bool = True, poll_interval_s: float = 2.0,
                 outputs: OutputSettings | None = None, deliver: Deliver | None = None,
                 on_queued: Callable[[int], None] | None = None,
                 on_finished: Callable[[Job, str], None] | None = None,
                 llm: LlmSettings | None = None, llm_vision: bool = False,
                 max_attempts: int = 3, concurrency: int = 1,
                 gate: Callable[[], str | None] | None = None,
                 on_waiting: Callable[[str | None], None] | None = None) -> None:
        """``deliver(conn, job_id, files)`` hands each job's DICOM outputs to the outbox in
        the transaction that ends the job, and ``on_queued(job_id)`` is told afterwards, as is
        ``on_finished(job, "done" | "failed")`` of every job this worker ended; a job
        that raises is retried until it has run ``max_attempts`` times; ``concurrency``
        studies may be in flight (the writers of one while the next is in the model).
        ``gate()`` is asked before each claim: a reason (the disk is nearly full) keeps the jobs
        queued until it returns None; ``on_waiting(reason | None)`` hears when that changes."""
        if concurrency < 1:
            raise ValueError(f"concurrency must be at least 1, not {concurrency}")
        self.max_attempts = max_attempts
        self.concurrency = concurrency
        self._writers = (ThreadPoolExecutor(max_workers=concurrency - 1,
                                            thread_name_prefix="radlens-writers")
                         if concurrency > 1 else None)
        self._slots = threading.Semaphore(concurrency - 1)
        self._in_writers: dict[int, Future[None]] = {}
        self._in_writers_lock = threading.Lock()
        self.queue = queue
        self.llm = llm or LlmSettings()
        self.llm_vision = llm_vision
        self.outputs = outputs or OutputSettings()
        self.deliver = deliver
        self.on_queued = on_queued
        self.on_finished = on_finished
        self.analysers = analysers
        self.results_root = results_root
        self.fsync = fsync
        self.poll_interval_s = poll_interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="radlens-worker", daemon=True)
        self.current_job: int | None = None
        self.gate = gate
        self.on_waiting = on_waiting
        self.waiting: str | None = None
        self._gate_lock = threading.Lock()

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout_s: float) -> bool:
        """Ask the worker to stop after its current job and the writers in flight; True if
        everything stopped in time (a job cut short stays running and re-runs at start-up)."""
        deadline = time.monotonic() + timeout_s
        self._stop.set()
        self.queue.wakeup.set()
        if self._thread.ident is not None:  # not started: a start-up that failed
            self._thread.join(timeout=timeout_s)
        if self._writers is not None:
            with self._in_writers_lock:
                pending = list(self._in_writers.values())
            wait(pending, timeout=max(0.0, deadline - time.monotonic()))
            self._writers.shutdown(wait=False, cancel_futures=True)
            if any(not future.done() for future in pending):
                return False
        return not self._thread.is_alive()

    @property
    def alive(self) -> bool:
        """Whether the worker's thread runs (for ``/healthz``)."""
        return self._thread.is_alive() and not self._stop.is_set()

    @property
    def jobs_in_flight(self) -> list[int]:
        """Jobs in the model stage or in the writers, for the log at shutdown."""
        with self._in_writers_lock:
            jobs = list(self._in_writers)
        return ([self.current_job] if self.current_job is not None else []) + jobs

    def _claim(self) -> Job | None:
        """The next job, or None after waiting a poll interval (or a wake-up) for one."""
        self.queue.wakeup.clear()
        if self._held():
            self.queue.wakeup.wait(self.poll_interval_s)
            return None
        try:
            job = self.queue.claim_next()
        except Exception:
            log.exception("cannot claim a job")
            job = None
        if job is None:
            self.queue.wakeup.wait(self.poll_interval_s)
        return job

    def _held(self) -> bool:
        """Whether the gate keeps jobs queued now; says so once when that changes."""
        try:
            reason = self.gate() if self.gate is not None else None
        except Exception:  # a gate that cannot tell does not stop the worker
            log.exception("cannot check whether jobs may start")
            reason = None
        with self._gate_lock:
            changed, self.waiting = reason != self.waiting, reason
        if changed:
            if reason is not None:
                log.warning("jobs wait, queued", extra=kv(reason=reason))
            else:
                log.info("jobs start again")
            if self.on_waiting is not None:
                self.on_waiting(reason)
        return reason is not None

    def _abandoned(self, job: Job) -> bool:
        """Every earlier attempt ended with its node (killed, out of memory, powered off)
        before the job could fail properly: fail it now rather than take the next node too."""
        if job.attempts <= self.max_attempts:
            return False
        self._failed(job, RuntimeError(
            f"abandoned after {job.attempts - 1} attempts: the node running it stopped "
            "each time"))
        return True

    def _run(self) -> None:
        while not self._stop.is_set():
            job = self._claim()
            if job is None:
                continue
            try:
                self.process(job)
            except Exception:  # never lose the worker: the job's lease runs out, it runs again
                log.exception("job left unfinished", extra=kv(job=job.id))
                self.current_job = None

    def process(self, job: Job) -> None:
        """Run one job: the model stage here, the writers here too or, with concurrency > 1,
        on the writers' thread once a slot is free."""
        if self._abandoned(job):
            return
        self.current_job = job.id
        log.info("job started", extra=kv(job=job.id, study=job.study_instance_uid,
                                         attempt=job.attempts))
        try:
            study = self._study_input(job)
            result = run_study(study, self.results_root, analysers=self.analysers,
                               fsync=self.fsync)
            with result.times.stage("findings"):
                if result.records:
                    analyses.record(self.queue.db, job.id, job.study_instance_uid,
                                    result.records)
                self._remember(job, study, result.observed)
        except Exception as exc:
            self._failed(job, exc)
            self.current_job = None
            release_freed_memory()
            return
        self.current_job = None
        if self.analysers is None:
            self._done(job)
            return
        if self._writers is None:
            self._complete(job, study, result)
            return
        self._slots.acquire()  # the model waits while every slot's writers are busy
        with self._in_writers_lock:
            future = self._writers.submit(self._complete, job, study, result)
            self._in_writers[job.id] = future
        future.add_done_callback(lambda _, job_id=job.id: self._release_slot(job_id))

    @property
    def compares_priors(self) -> bool:
        """Whether jobs run tasks, which may compare with the patient's earlier studies."""
        return self.analysers is not None

    def _study_input(self, job: Job) -> StudyInput:
        """What the pipeline reads of a job: its instances, and the patient's earlier
        observations once there are tasks to compare with them."""
        instances = self.queue.instances(job)
        return StudyInput(job_id=job.id, revision=self.queue.revision(job),
                          study_instance_uid=job.study_instance_uid, instances=instances,
                          history=self._patient_history(job, instances))

    def _patient_history(self, job: Job, instances: list[JobInstance]) -> PatientHistory | None:
        """The patient's earlier observations; a problem reading them costs the comparison
        with a prior study, never the job."""
        if not self.compares_priors:
            return None
        try:
            return history.load(self.queue.db, job.study_instance_uid,
                                [instance.path for instance in instances])
        except Exception:  # noqa: BLE001 - logged; the study is read without its history
            log.exception("the patient's earlier studies could not be read",
                          extra=kv(job=job.id, study=job.study_instance_uid))
            return None

    def _remember(self, job: Job, study: StudyInput,
                  observed: list[tuple[str, ObservedItem]]) -> None:
        """What the tasks observed, for the patient's later studies."""
        if study.history is not None and study.history.subject is not None:
            history.record(self.queue.db, job.id, study.history, observed)

    def _release_slot(self, job_id: int) -> None:
        with self._in_writers_lock:
            self._in_writers.pop(job_id, None)
        self._slots.release()

    def _complete(self, job: Job, study: StudyInput, result: StudyResult) -> None:
        """The writers and the hand-over to the outbox; then the job is done."""
        try:
            outputs = self._described(self._write_outputs(study, result))
        except Exception as exc:
            self._failed(job, exc)
        else:
            self._done(job, outputs)
        finally:
            release_freed_memory()  # the study's arrays, before the next job

    def _described(self, paths: list[Path]) -> list[OutgoingFile]:
        """The outputs as the outbox queues them, each file read once and before the job's
        transaction, which holds the database's write lock."""
        return [describe_file(path) for path in paths] if self.deliver is not None else []

    def _done(self, job: Job, outputs: list[OutgoingFile] | None = None) -> None:
        if self._finish(job, outputs):
            log.info("job done", extra=kv(job=job.id, study=job.study_instance_uid))

    def _finish(self, job: Job, outputs: list[OutgoingFile] | None,
                error: str | None = None) -> bool:
        """The job done or failed, its outputs queued for delivery in the same transaction.
        False when another node took the job over meanwhile: its run answers instead."""
        deliver = self.deliver
        also = ((lambda conn: deliver(conn, job.id, outputs))
                if outputs and deliver is not None else None)
        try:
            finished = self.queue.finish(job.id, error=error, also=also)
        except sa.exc.SQLAlchemyError as exc:
            # Nothing was committed: no lease renewal from here on, so the job runs again
            # (its outputs are rewritten, and queued then, once).
            log.error("cannot end the job: the state database did not answer; it will run "
                      "again once its lease runs out", extra=kv(job=job.id, error=str(exc)))
            return False
        if not finished:
            return False
        if also is not None and self.on_queued is not None:
            self.on_queued(job.id)
        if self.on_finished is not None:
            self.on_finished(job, "failed" if error else "done")
        return True

    @property
    def model_ref(self) -> ModelRef | None:
        """The lesion model, named in failure reports."""
        return self.analysers.model_ref if self.analysers else None

    def _failed(self, job: Job, exc: Exception) -> None:
        error = failure_reason(exc)
        if job.attempts < self.max_attempts:
            log.error("job failed; it will be retried", exc_info=exc, extra=kv(
                job=job.id, study=job.study_instance_uid, attempt=job.attempts,
                max_attempts=self.max_attempts))
            try:
                self.queue.retry(job.id, error=error)
            except sa.exc.SQLAlchemyError as state_error:
                log.error("cannot queue the job again: the state database did not answer; it "
                          "will run again once its lease runs out",
                          extra=kv(job=job.id, error=str(state_error)))
        else:
            log.error("job failed for good", exc_info=exc, extra=kv(
                job=job.id, study=job.study_instance_uid, attempts=job.attempts))
            self._finish(job, self._failure_report(job, error), error=error)

    def _failure_report(self, job: Job, error: str) -> list[OutgoingFile]:
        """A job that failed for good still answers the sender: an SR saying the analysis
        failed and why, so nobody waits for results that will not come."""
        from radlens.dicom_io.writers import write_failure_report

        self._record_failure(job, error)
        try:
            instances = self.queue.instances(job)
            path = write_failure_report(
                job.study_instance_uid, self.queue.revision(job),
                {i.sop_instance_uid: i.path for i in instances},
                self.results_root / job.study_instance_uid, error,
                model=self.model_ref, fsync=self.fsync)
            return self._described([path]) if path is not None else []
        except Exception:  # the failure is recorded on the job all the same
            log.exception("cannot write the failure report", extra=kv(job=job.id))
            return []

    def _record_failure(self, job: Job, error: str) -> None:
        """The reason in the study's findings.json: added to what this revision's model stage
        wrote before it failed, or on its own."""
        from radlens import __version__
        from radlens.agent.pipeline import FINDINGS_FILE, write_findings
        from radlens.findings import StudyFindings

        try:
            revision = self.queue.revision(job)
            path = self.results_root / job.study_instance_uid / FINDINGS_FILE
            findings = None
            if path.is_file():
                try:
                    findings = StudyFindings.model_validate_json(path.read_bytes())
                except ValueError:
                    findings = None
            if findings is None or findings.revision != revision:
                findings = StudyFindings(study_instance_uid=job.study_instance_uid,
                                         job_id=job.id, revision=revision,
                                         radlens_version=__version__, model=self.model_ref)
            write_findings(findings.model_copy(update={"failure": error}), self.results_root,
                           fsync=self.fsync)
        except Exception:  # the failure is recorded on the job all the same
            log.exception("cannot record the failure in findings.json", extra=kv(job=job.id))

    def _write_outputs(self, study: StudyInput, result: StudyResult) -> list[Path]:
        assert self.analysers is not None
        return write_job_outputs(study, result, self.analysers, self.results_root,
                                 llm=self.llm, llm_vision=self.llm_vision,
                                 outputs=self.outputs, fsync=self.fsync)


def failure_reason(exc: Exception) -> str:
    """The reason a job records: a worker process's own words as they are, else the type and
    the message."""
    if isinstance(exc, JobAttemptError):
        return str(exc)[:2000]
    return f"{type(exc).__name__}: {exc}"[:2000]


def write_job_outputs(study: StudyInput, result: StudyResult, analysers: TaskSet,
                      results_root: Path, *, llm: LlmSettings, llm_vision: bool,
                      outputs: OutputSettings, fsync: bool) -> list[Path]:
    """Narrative, then SEG, SR and maps next to findings.json; returns the DICOM objects
    to deliver. Written before the job is marked done, so a crash here re-runs the job
    rather than losing its answer. The narrative waits at most ``llm.timeout_s``."""
    from radlens.dicom_io.writers import overlay_pngs, write_outputs
    from radlens.reporting.ollama import narrate

    sources = {i.sop_instance_uid: i.path for i in study.instances}
    study_dir = results_root / study.study_instance_uid
    methods = analysers.saliency_methods
    with result.times.stage("narrative"):
        narrative = narrate(result.findings, llm, vision_capable=llm_vision,
                            images=lambda: overlay_pngs(result.findings, sources,
                                                        study_dir, methods))
    written = write_outputs(result.findings, sources, study_dir, narrative,
                            settings=outputs, saliency_methods=methods,
                            fsync=fsync, times=result.times)
    result.finish(results_root, fsync=fsync)
    return list(written.all)
