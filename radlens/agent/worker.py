"""The worker: owns the "processed" state. Claims queued jobs and runs the pipeline on each.

One bad study never stops it: any error is recorded on the job (state failed) and in the log.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from radlens.agent import analyses
from radlens.agent.pipeline import Analyser, StudyInput, run_study
from radlens.agent.queue import Job, JobQueue
from radlens.logs import kv

log = logging.getLogger(__name__)


class Worker:
    def __init__(self, queue: JobQueue, results_root: Path, *, analyser: Analyser | None = None,
                 fsync: bool = True, poll_interval_s: float = 2.0) -> None:
        self.queue = queue
        self.analyser = analyser
        self.results_root = results_root
        self.fsync = fsync
        self.poll_interval_s = poll_interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="radlens-worker", daemon=True)
        self.current_job: int | None = None

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout_s: float) -> bool:
        """Ask the worker to stop after its current job; True if it stopped in time."""
        self._stop.set()
        self.queue.wakeup.set()
        self._thread.join(timeout=timeout_s)
        return not self._thread.is_alive()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.queue.wakeup.clear()
            try:
                job = self.queue.claim_next()
            except Exception:
                log.exception("cannot claim a job")
                job = None
            if job is None:
                self.queue.wakeup.wait(self.poll_interval_s)
                continue
            self.process(job)

    def process(self, job: Job) -> None:
        self.current_job = job.id
        log.info("job started", extra=kv(job=job.id, study=job.study_instance_uid,
                                         attempt=job.attempts))
        try:
            study = StudyInput(job_id=job.id, revision=self.queue.revision(job),
                               study_instance_uid=job.study_instance_uid,
                               instances=self.queue.instances(job))
            result = run_study(study, self.results_root, analyser=self.analyser,
                               fsync=self.fsync)
            if result.records:
                analyses.record(self.queue.db, job.id, job.study_instance_uid, result.records)
        except Exception as exc:
            log.exception("job failed", extra=kv(job=job.id, study=job.study_instance_uid))
            self.queue.finish(job.id, error=f"{type(exc).__name__}: {exc}")
        else:
            self.queue.finish(job.id)
            log.info("job done", extra=kv(job=job.id, study=job.study_instance_uid))
        finally:
            self.current_job = None
