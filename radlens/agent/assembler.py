"""Study assembly: one apscheduler timer per study decides when a study is complete.

A study is complete when no instance has arrived for ``quiet_period_s``, or ``max_wait_s`` after
its first pending instance, whichever comes first. The assembler owns the "complete" state: it
hands the study to the job queue. Timers are rebuilt from the state database at start-up.

Re-arming on every instance would cost a scheduler call per C-STORE; instead a timer is armed once
and, when it fires early because more instances came, it re-arms itself for the new deadline.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime

from apscheduler.schedulers.base import BaseScheduler

from radlens.agent.queue import JobQueue
from radlens.logs import kv

log = logging.getLogger(__name__)

_EARLY_TOLERANCE_S = 0.005


@dataclass
class _OpenStudy:
    first_received_at: float
    last_received_at: float
    armed: bool = False
    not_before: float = 0.0  # recovered after a stop: the sender may still be sending


class StudyAssembler:
    def __init__(self, scheduler: BaseScheduler, queue: JobQueue, *, quiet_period_s: float,
                 max_wait_s: float, recovery_wait_s: float = 0.0) -> None:
        """``recovery_wait_s``: a study found pending at start-up (its transfer was cut by the
        stop) waits at least this long from the start, for its senders to reconnect and send
        the rest; arrivals push its timer on from there like any study's."""
        self.scheduler = scheduler
        self.queue = queue
        self.quiet_period_s = quiet_period_s
        self.max_wait_s = max_wait_s
        self.recovery_wait_s = recovery_wait_s
        self._open: dict[str, _OpenStudy] = {}
        self._lock = threading.Lock()

    def _deadline(self, study: _OpenStudy) -> float:
        return max(min(study.last_received_at + self.quiet_period_s,
                       study.first_received_at + self.max_wait_s), study.not_before)

    def instance_received(self, study_uid: str, received_at: float) -> None:
        with self._lock:
            study = self._open.get(study_uid)
            if study is None:
                study = self._open[study_uid] = _OpenStudy(received_at, received_at)
            study.last_received_at = max(study.last_received_at, received_at)
            if not study.armed:
                study.armed = True
                self._arm(study_uid, self._deadline(study))

    def rebuild(self, *, at_start: bool = False) -> int:
        """Arm a timer for every study with pending instances and none armed.

        Called at start-up (``at_start``: after a crash the timers are gone) and periodically
        as a sweep, so a study can never stay pending because a timer was lost. A recovered
        study's old deadline has usually passed during the stop, while its senders reconnect
        and re-send the rest, which takes them longer than a quiet period when many reconnect
        at once: at start-up it waits for the later of that deadline and ``recovery_wait_s``
        (at least one quiet period) from now, so it is not processed on the part that arrived
        before the stop; each arrival pushes the timer on as usual.
        """
        rearmed = 0
        wait = max(self.quiet_period_s, self.recovery_wait_s) if at_start \
            else self.quiet_period_s
        not_before = time.time() + wait
        pending = self.queue.pending_studies()
        with self._lock:
            for item in pending:
                if item.study_instance_uid in self._open:
                    continue
                study = _OpenStudy(item.first_received_at, item.last_received_at, armed=True,
                                   not_before=not_before)
                self._open[item.study_instance_uid] = study
                self._arm(item.study_instance_uid, self._deadline(study))
                rearmed += 1
        if rearmed:
            log.info("armed study timers from the index", extra=kv(studies=rearmed))
        return rearmed

    def open_studies(self) -> int:
        with self._lock:
            return len(self._open)

    def _arm(self, study_uid: str, deadline: float) -> None:
        self.scheduler.add_job(
            self._fire,
            trigger="date",
            run_date=datetime.fromtimestamp(deadline, tz=UTC),
            args=[study_uid],
            id=f"assemble:{study_uid}",
            replace_existing=True,
            misfire_grace_time=None,  # a timer due while we were down still fires
            coalesce=True,
            max_instances=16,  # a re-armed timer may come due while the last call finishes
        )

    def _fire(self, study_uid: str) -> None:
        with self._lock:
            study = self._open.get(study_uid)
            if study is not None:
                deadline = self._deadline(study)
                if time.time() < deadline - _EARLY_TOLERANCE_S:
                    self._arm(study_uid, deadline)  # more instances came: wait on
                    return
                del self._open[study_uid]
        try:
            self.queue.create_job_for_pending(study_uid)
        except Exception:
            # Durable state is untouched: the instances stay pending and a restart re-arms them.
            log.exception("cannot create job", extra=kv(study=study_uid))
