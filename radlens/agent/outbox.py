"""The outbox: owns the "delivered" state. Files queued per destination in the state database,
sent by ``dicom_io.scu``, retried with exponential back-off while a destination is down, and
kept across restarts. The agent's scheduler calls ``deliver_due`` every ``outbox.poll_interval_s``.
"""

from __future__ import annotations

import logging
import ssl
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import pydicom
import sqlalchemy as sa
from sqlalchemy.engine import Connection, RowMapping

from radlens import audit
from radlens.audit import AuditLog, NullAuditLog, Outcome
from radlens.config import Destination, OutboxSettings, TlsSettings
from radlens.db import Database, jobs, outbox
from radlens.dicom_io import scu
from radlens.errors import ConfigError, DestinationError, InvalidDatasetError
from radlens.logs import kv

log = logging.getLogger(__name__)

BATCH_LIMIT = 500
Sender = Callable[..., list[scu.SendResult]]


@dataclass(frozen=True)
class DeliveryReport:
    sent: int = 0
    retrying: int = 0
    failed: int = 0


def describe_file(path: Path) -> scu.OutgoingFile:
    """What the outbox needs to know of a file to send it later."""
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        return scu.OutgoingFile(
            path=path.resolve(),
            sop_class_uid=str(ds.SOPClassUID),
            sop_instance_uid=str(ds.SOPInstanceUID),
            transfer_syntax_uid=str(ds.file_meta.TransferSyntaxUID),
        )
    except Exception as exc:
        raise InvalidDatasetError(f"{path}: not a DICOM file radlens can send ({exc})") from exc


class Outbox:
    """Queues files per destination and sends the due ones.

    A sender claims the rows it sends under a lease (``FOR UPDATE SKIP LOCKED`` on PostgreSQL),
    so several senders never send the same row at once; a sender that dies mid-send leaves
    rows whose lease runs out, and another sends them (a destination may then see an instance
    twice, which C-STORE allows: same SOP Instance UID, same bytes). A state outage between
    a send and its record does not send again: the sender keeps what was delivered and
    records it when the state is back.
    """

    def __init__(self, db: Database, settings: OutboxSettings,
                 destinations: Sequence[Destination], *, calling_aet: str,
                 timeout_s: float = 30.0, sender: Sender = scu.send_files,
                 node_id: str | None = None,
                 on_result: Callable[[str, str, int], None] | None = None,
                 tls: TlsSettings | None = None, audit_log: AuditLog | None = None) -> None:
        """``on_result(destination, outcome, count)`` hears of every batch's outcome ("sent",
        "retrying", "failed"), for the node's metrics. ``tls`` is the node's own certificate
        and trust, for destinations with ``tls: true``."""
        self.tls = tls or TlsSettings()
        self.audit = audit_log or NullAuditLog()
        self._tls_contexts: dict[str, ssl.SSLContext] = {}
        self.node_id = node_id
        self.on_result = on_result
        self.db = db
        self.settings = settings
        self.destinations = {d.name: d for d in destinations}
        self.calling_aet = settings.calling_ae_title or calling_aet
        self.timeout_s = timeout_s
        self.sender = sender
        self._delivering = threading.Lock()
        self._claims_uncertain = False
        # Rows a destination took whose "sent" the state could not record (it went away): kept
        # here and recorded at the next round, so that they are not sent a second time.
        self._sent_unrecorded: dict[int, tuple[float, int | None]] = {}

    def enqueue(self, paths: Iterable[Path | scu.OutgoingFile], destination: str, *,
                job_id: int | None = None, conn: Connection | None = None) -> list[int]:
        """Queue files for a configured destination; returns the outbox row ids. Files may
        come described already (``describe_file``), so that a transaction is not kept open
        while they are read. With ``conn`` the rows are part of that transaction (a job's
        outputs and its "done" commit together), else of one of their own."""
        if destination not in self.destinations:
            known = ", ".join(self.destinations) or "none configured"
            raise ConfigError(f"unknown destination {destination!r} (known: {known})")
        files = [p if isinstance(p, scu.OutgoingFile) else describe_file(Path(p))
                 for p in paths]
        now = time.time()
        ids = []
        with nullcontext(conn) if conn is not None else self.db.transaction() as tx:
            for item in files:
                ids.append(tx.execute(sa.insert(outbox).values(
                    destination=destination, path=str(item.path),
                    sop_instance_uid=item.sop_instance_uid, sop_class_uid=item.sop_class_uid,
                    transfer_syntax_uid=item.transfer_syntax_uid, job_id=job_id,
                    state="pending", created_at=now, next_attempt_at=now,
                ).returning(outbox.c.id)).scalar_one())
        log.info("queued for delivery", extra=kv(destination=destination, files=len(ids),
                                                 job=job_id))
        return [int(i) for i in ids if i is not None]

    def backoff_s(self, attempts: int) -> float:
        """Delay before attempt ``attempts + 1``: initial, then doubling, capped."""
        delay = self.settings.retry_initial_s * (2 ** max(0, attempts - 1))
        return float(min(delay, self.settings.retry_max_s))

    def deliver_due(self, now: float | None = None) -> DeliveryReport:
        """Send every due file, one association batch per destination."""
        if not self._delivering.acquire(blocking=False):
            return DeliveryReport()
        try:
            now = time.time() if now is None else now
            self._record_sent(late=True)
            if self._claims_uncertain:
                self.release_own_claims()
            rows = self._claim_due(now)
            by_destination: dict[str, list[RowMapping]] = defaultdict(list)
            for row in rows:
                by_destination[row["destination"]].append(row)
            report = DeliveryReport()
            for name, items in by_destination.items():
                report = _add(report, self._deliver(name, items))
            return report
        except BaseException:
            # A state error (the database went away) between a claim and its outcome leaves
            # rows this sender holds under a lease: free them at the next round rather than
            # after the lease, since this sender is the only one that could be sending them.
            self._claims_uncertain = True
            raise
        finally:
            self._delivering.release()

    def _record_sent(self, *, late: bool = False) -> None:
        """Mark the rows a destination took as sent. They stay in ``_sent_unrecorded`` until
        the state has them, so a state outage here never makes radlens send them again."""
        if not self._sent_unrecorded:
            return
        with self.db.transaction() as conn:
            for row_id, (sent_at, status) in self._sent_unrecorded.items():
                conn.execute(sa.update(outbox).where(outbox.c.id == row_id).values(
                    state="sent", attempts=outbox.c.attempts + 1, sent_at=sent_at,
                    last_status=status, last_error=None, lease_until=None))
        if late:
            log.info("deliveries recorded after a state error",
                     extra=kv(rows=len(self._sent_unrecorded)))
        self._sent_unrecorded.clear()

    def take_over(self) -> None:
        """Start as this node's sender in place of one that died: the rows it had claimed are
        freed now, or at the first round if the state does not answer yet."""
        self._claims_uncertain = True
        try:
            self.release_own_claims()
        except sa.exc.SQLAlchemyError as exc:
            log.warning("cannot free the rows of an earlier sender yet",
                        extra=kv(error=str(exc).split("\n", 1)[0]))

    def release_own_claims(self) -> None:
        """Free the pending rows this sender claimed; it is not sending any of them now (after
        a state error, or when a sender process starts again in place of one that died)."""
        if self.node_id is None:  # claims without a name cannot be told apart: leases decide
            self._claims_uncertain = False
            return
        with self.db.transaction() as conn:
            released = conn.execute(sa.update(outbox).where(
                outbox.c.state == "pending", outbox.c.claimed_by == self.node_id,
                outbox.c.lease_until.is_not(None)).values(lease_until=None)).rowcount
        self._claims_uncertain = False
        if released:
            log.info("outbox rows freed after a state error", extra=kv(rows=released))

    def _claim_due(self, now: float) -> list[RowMapping]:
        """The due rows no other sender holds, claimed for this one until its lease ends."""
        o = outbox.c
        due = sa.and_(o.state == "pending", o.next_attempt_at <= now,
                      sa.or_(o.lease_until.is_(None), o.lease_until < now))
        batch = (sa.select(o.id).where(due).order_by(o.id).limit(BATCH_LIMIT)
                 .with_for_update(skip_locked=True))
        lease = max(self.timeout_s * 4, 60.0)  # an association per destination, each may wait
        with self.db.transaction() as conn:
            rows = conn.execute(
                sa.update(outbox).where(o.id.in_(batch), due)
                .values(claimed_by=self.node_id, lease_until=now + lease)
                .returning(*outbox.c)).mappings().all()
        return sorted(rows, key=lambda row: row["id"])

    def _deliver(self, name: str, rows: list[RowMapping]) -> DeliveryReport:
        destination = self.destinations.get(name)
        if destination is None:
            return self._retry(rows, f"destination {name!r} is not configured any more")
        files = [scu.OutgoingFile(Path(r["path"]), r["sop_class_uid"], r["sop_instance_uid"],
                                  r["transfer_syntax_uid"]) for r in rows]
        studies = self._studies(rows)  # for the audit trail, read before anything is sent
        try:
            results = self.sender(destination.host, destination.port, destination.ae_title, files,
                                  calling_aet=self.calling_aet, timeout_s=self.timeout_s,
                                  tls_context=self.tls_context(destination))
        except (DestinationError, ConfigError) as exc:
            self._audit_out(destination, rows, set(), studies)
            report = self._retry(rows, str(exc))
            log.warning("destination unreachable, will retry", extra=kv(
                destination=name, files=len(rows), error=str(exc),
                retry_in_s=self.backoff_s(rows[0]["attempts"] + 1)))
            return report
        by_path = {str(r.file.path): r for r in results}
        delivered, undelivered = [], []
        for row in rows:
            result = by_path.get(row["path"])
            (delivered if result is not None and result.delivered else undelivered).append(row)
        now = time.time()
        self._audit_out(destination, rows, {row["id"] for row in delivered}, studies)
        self._sent_unrecorded.update(
            {int(row["id"]): (now, by_path[row["path"]].status) for row in delivered})
        self._record_sent()
        report = DeliveryReport(sent=len(delivered))
        self._tell(name, "sent", len(delivered))
        if delivered:
            log.info("delivered", extra=kv(destination=name, files=len(delivered)))
        for row in undelivered:
            result = by_path.get(row["path"])
            error = result.error if result is not None else "not attempted"
            status = result.status if result is not None else None
            if result is not None and result.refused:
                report = _add(report, self._refused(row, error or "refused", status))
            else:
                report = _add(report, self._retry([row], error or "failed", status=status))
        return report

    def _refused(self, row: RowMapping, error: str, status: int | None) -> DeliveryReport:
        """The destination refuses this object for good: failed at once, with the reason."""
        with self.db.transaction() as conn:
            conn.execute(sa.update(outbox).where(outbox.c.id == row["id"]).values(
                state="failed", attempts=outbox.c.attempts + 1, last_status=status,
                last_error=f"refused by the destination: {error}", lease_until=None))
        log.error("delivery refused by the destination; not retried", extra=kv(
            destination=row["destination"], sop=row["sop_instance_uid"], error=error))
        self._tell(row["destination"], "failed", 1)
        return DeliveryReport(failed=1)

    def tls_context(self, destination: Destination) -> ssl.SSLContext | None:
        """The client TLS context for ``destination`` (built once), or None without TLS."""
        if not destination.tls:
            return None
        if destination.name not in self._tls_contexts:
            from radlens.dicom_io.tls import client_context

            self._tls_contexts[destination.name] = client_context(
                self.tls, destination.tls_ca_certificates,
                check_hostname=destination.tls_check_hostname)
        return self._tls_contexts[destination.name]

    def _audit_out(self, destination: Destination, rows: Sequence[RowMapping],
                   delivered: set[int], studies: dict[int, str]) -> None:
        """One "instances transferred" entry per study of the batch, with what arrived."""
        by_study: dict[str, list[RowMapping]] = defaultdict(list)
        for row in rows:
            by_study[studies.get(row["id"], "(unknown study)")].append(row)
        for study, items in sorted(by_study.items()):
            sent = sum(1 for row in items if row["id"] in delivered)
            outcome = Outcome.SUCCESS if sent == len(items) else (
                Outcome.MINOR_FAILURE if sent else Outcome.SERIOUS_FAILURE)
            self.audit.record(audit.INSTANCES_TRANSFERRED, outcome, direction="out",
                              peer_ae=destination.ae_title,
                              peer_address=f"{destination.host}:{destination.port}",
                              destination=destination.name, local_ae=self.calling_aet,
                              study=study, instances=sent, failed=len(items) - sent,
                              sop_classes=sorted({row["sop_class_uid"] for row in items}),
                              tls=destination.tls)

    def _studies(self, rows: Sequence[RowMapping]) -> dict[int, str]:
        """The Study Instance UID of each row: its job's, else read from the file. Only the
        audit trail needs it: a state error leaves the rows "(unknown study)"."""
        job_ids = {row["job_id"] for row in rows if row["job_id"] is not None}
        by_job: dict[int, str] = {}
        if job_ids:
            try:
                with self.db.read() as conn:
                    by_job = {int(r[0]): str(r[1]) for r in conn.execute(
                        sa.select(jobs.c.id, jobs.c.study_instance_uid)
                        .where(jobs.c.id.in_(job_ids)))}
            except sa.exc.SQLAlchemyError as exc:
                log.warning("cannot read the studies of an outbox batch for the audit trail",
                            extra=kv(error=str(exc).split("\n", 1)[0]))
        studies = {}
        for row in rows:
            if row["job_id"] in by_job:
                studies[row["id"]] = by_job[row["job_id"]]
                continue
            try:
                header = pydicom.dcmread(row["path"], stop_before_pixels=True,
                                         specific_tags=["StudyInstanceUID"])
                studies[row["id"]] = str(header.StudyInstanceUID)
            except Exception:  # a missing file is reported by the send itself
                continue
        return studies

    def _retry(self, rows: Sequence[RowMapping], error: str, *,
               status: int | None = None) -> DeliveryReport:
        now = time.time()
        retrying = failed = 0
        with self.db.transaction() as conn:
            for row in rows:
                attempts = row["attempts"] + 1
                limit = self.settings.max_attempts
                too_old = bool(self.settings.max_age_h) and \
                    now - row["created_at"] >= self.settings.max_age_h * 3600.0
                give_up = (bool(limit) and attempts >= limit) or too_old
                reason = error if not give_up else (
                    f"{error} (gave up after {attempts} attempts over "
                    f"{(now - row['created_at']) / 3600:.1f} h: outbox.max_attempts, "
                    "outbox.max_age_h)")
                conn.execute(sa.update(outbox).where(outbox.c.id == row["id"]).values(
                    state="failed" if give_up else "pending", attempts=attempts,
                    next_attempt_at=now + self.backoff_s(attempts), last_status=status,
                    last_error=reason, lease_until=None))
                if give_up:
                    failed += 1
                    log.error("delivery abandoned", extra=kv(
                        destination=row["destination"], sop=row["sop_instance_uid"],
                        attempts=attempts, error=error))
                else:
                    retrying += 1
        if rows:
            self._tell(rows[0]["destination"], "retrying", retrying)
            self._tell(rows[0]["destination"], "failed", failed)
        return DeliveryReport(retrying=retrying, failed=failed)

    def _tell(self, destination: str, outcome: str, count: int) -> None:
        if self.on_result is not None and count:
            self.on_result(destination, outcome, count)


def _add(a: DeliveryReport, b: DeliveryReport) -> DeliveryReport:
    return DeliveryReport(a.sent + b.sent, a.retrying + b.retrying, a.failed + b.failed)
