"""The DICOM listener: a pynetdicom AE whose handlers do one thing each and return a status.

Storage logic lives in ``spool.py``; heavy work never runs in a DIMSE handler. Handlers answer
Success only after the spool has made the instance durable.
"""

from __future__ import annotations

import functools
import logging
import os
import socket
import ssl
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pynetdicom import _config, evt

from radlens import audit
from radlens.audit import AuditLog, NullAuditLog, Outcome
from radlens.config import DicomSettings
from radlens.dicom_io.acceptor import (  # noqa: F401 (re-exported: the listener's parts)
    ACCEPTED_TRANSFER_SYNTAXES,
    DUL_IDLE_SLEEP_S,
    ListenerServer,
    PortInUseError,
    SharedPortListenerServer,
    accepted_contexts,
    build_ae,
    check_port_free,
    recv_exactly,
)
from radlens.dicom_io.guard import (
    ConnectionGuard,
    MessageGuard,
    PeerPolicy,
    QuietPeerErrors,
    notice_refused_connection,
    pdu_cap,
    recv_bounded,
)
from radlens.dicom_io.spool import MissingUidError, Spool, StoredInstance, UnparseableDatasetError
from radlens.dicom_io.tls import describe_peer, server_context
from radlens.errors import SpoolError
from radlens.logs import kv

log = logging.getLogger(__name__)

STATUS_SUCCESS = 0x0000
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_CANNOT_PARSE = 0xC000
STATUS_MISSING_UIDS = 0xC001
STATUS_PROCESSING_FAILURE = 0x0110

# pynetdicom's standard handlers log every PDU at INFO and cost time on every message.
_config.LOG_HANDLER_LEVEL = "none"
# A peer's broken connection or PDU is the peer's error, handled: one log line, not a traceback.
QuietPeerErrors.install()


@dataclass
class _AssociationRecord:
    """What one association did, for its audit entries when it ends."""

    address: str
    tls: dict[str, str | None] | None = None
    calling_ae: str | None = None
    messages: MessageGuard | None = None
    stored: Counter[str] = field(default_factory=Counter)  # per study
    failed: Counter[str] = field(default_factory=Counter)
    sop_classes: dict[str, set[str]] = field(default_factory=dict)
    refused: str | None = None  # our own refusal's reason (peers), already audited
    flushed: bool = False


class StorageListener:
    """Accepts associations, files each C-STORE in the spool, tells ``on_stored`` about it.

    It serves the plain DICOM port, the TLS port (``dicom.tls``), or both, with one AE: the
    same checks, counters and audit trail on each.
    """

    def __init__(self, settings: DicomSettings, spool: Spool,
                 on_stored: Callable[[StoredInstance], None], *,
                 reuse_port: bool = False, audit: AuditLog | None = None) -> None:
        self.settings = settings
        self.spool = spool
        self.on_stored = on_stored
        self.reuse_port = reuse_port
        self.audit = audit or NullAuditLog()
        self.ae = build_ae(settings)
        self._contexts = accepted_contexts(self.ae)
        self._tls_context = server_context(settings.tls) if settings.tls.enabled else None
        self._peers = PeerPolicy(settings.peers)
        self._guard = ConnectionGuard(settings, on_refused=self._on_connection_refused)
        self._pdu_cap = pdu_cap(settings)
        self._servers: dict[str, ListenerServer] = {}
        self._counts_lock = threading.Lock()
        self.associations = 0
        self.stored = 0

    @property
    def port(self) -> int:
        """The plain DICOM port (the TLS port when TLS is all there is)."""
        server = self._servers.get("plain") or self._servers.get("tls")
        if server is None:
            raise RuntimeError("listener is not running")
        return int(server.server_address[1])

    @property
    def tls_port(self) -> int | None:
        server = self._servers.get("tls")
        return None if server is None else int(server.server_address[1])

    @property
    def running(self) -> bool:
        """Whether the listener accepts associations (for ``/healthz``)."""
        return bool(self._servers) and all(server.socket.fileno() >= 0
                                           for server in self._servers.values())

    def start(self) -> None:
        handlers = [
            (evt.EVT_CONN_OPEN, self._on_connection_open),
            (evt.EVT_CONN_CLOSE, self._on_ended),
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_REJECTED, self._on_rejected),
            (evt.EVT_ACCEPTED, self._on_accepted),
            (evt.EVT_RELEASED, self._on_ended),
            (evt.EVT_ABORTED, self._on_ended),
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_C_STORE, self._on_store),
        ]
        tls = self.settings.tls
        endpoints: list[tuple[str, int]] = []
        if not tls.only:
            endpoints.append(("plain", self.settings.port))
        if tls.enabled:
            endpoints.append(("tls", tls.port))
        server_class = SharedPortListenerServer if self.reuse_port else ListenerServer
        for name, port in endpoints:
            try:
                server = self.ae.make_server((self.settings.host, port), evt_handlers=handlers,
                                             server_class=server_class,
                                             contexts=self._contexts)
            except OSError as exc:
                for started in self._servers.values():
                    started.shutdown()
                self._servers.clear()
                raise PortInUseError(f"cannot listen on {self.settings.host}:{port}: "
                                     f"{exc.strerror or exc}") from exc
            assert isinstance(server, ListenerServer)
            server.guard = self._guard
            if name == "tls":
                server.tls_context = self._tls_context
                server.handshake_timeout_s = self.settings.acse_timeout_s
                server.on_handshake_failed = self._on_handshake_failed
            threading.Thread(target=server.serve_forever, name=f"AcceptorServer:{port}",
                             daemon=True).start()
            self._servers[name] = server
        log.info("listening", extra=kv(ae_title=self.settings.ae_title, host=self.settings.host,
                                       port=None if tls.only else self.port,
                                       tls_port=self.tls_port, shared_port=self.reuse_port,
                                       pid=os.getpid()))

    def stop(self, grace_s: float) -> int:
        """Stop accepting, let associations in flight finish for ``grace_s``; returns how many
        had to be aborted."""
        if not self._servers:
            return 0
        servers, self._servers = list(self._servers.values()), {}
        connections = []
        for server in servers:
            server.shutdown()
            connections += server.active_associations
        # A connection that never sent an A-ASSOCIATE-RQ (a health check, a port scan) has no
        # store in flight: drop it now rather than wait out its ACSE timeout.
        idle = [a for a in connections if not a.is_established]
        in_flight = [a for a in connections if a.is_established]
        for assoc in idle:
            assoc.abort()
        deadline = time.monotonic() + grace_s
        for assoc in in_flight:
            assoc.join(timeout=max(0.0, deadline - time.monotonic()))
        aborted = 0
        for assoc in in_flight:
            if assoc.is_alive():
                assoc.abort()
                aborted += 1
        log.info("listener stopped", extra=kv(finished=len(in_flight) - aborted, aborted=aborted,
                                              dropped_unassociated=len(idle),
                                              associations=self.associations,
                                              stored=self.stored, pid=os.getpid()))
        return aborted

    # -- the door ------------------------------------------------------------------------------
    def _on_connection_refused(self, address: str, held: int, refused: int) -> None:
        notice_refused_connection(address, held, refused)
        self.audit.record(audit.SECURITY_ALERT, Outcome.MINOR_FAILURE,
                          event_type=audit.NODE_AUTHENTICATION, peer_address=address,
                          count=refused, local_ae=self.settings.ae_title,
                          reason=f"too many connections from one address ({held} held; "
                                 "dicom.max_connections_per_address)")

    def _on_handshake_failed(self, address: str, reason: str) -> None:
        log.warning("TLS connection refused", extra=kv(address=address, reason=reason))
        self.audit.record(audit.SECURITY_ALERT, Outcome.MINOR_FAILURE,
                          event_type=audit.NODE_AUTHENTICATION, peer_address=address,
                          local_ae=self.settings.ae_title, tls=True, reason=reason)

    def _record(self, event: evt.Event) -> _AssociationRecord:
        record = getattr(event.assoc, "radlens_record", None)
        if record is None:  # an event before EVT_CONN_OPEN cannot happen; be safe anyway
            record = _AssociationRecord(address=str(event.assoc.requestor.address))
            event.assoc.radlens_record = record
        return record

    # -- handlers ------------------------------------------------------------------------------
    def _on_connection_open(self, event: evt.Event) -> None:
        dul = event.assoc.dul
        if hasattr(dul, "_run_loop_delay"):  # a private knob: without it we only lose speed
            dul._run_loop_delay = DUL_IDLE_SLEEP_S
        association_socket = event.assoc.dul.socket
        raw = getattr(association_socket, "socket", None)
        record = _AssociationRecord(address=str(event.assoc.requestor.address))
        event.assoc.radlens_record = record
        if isinstance(raw, ssl.SSLSocket):
            record.tls = describe_peer(raw)
        record.messages = MessageGuard(
            event.assoc, self.settings.max_instance_mb * 1024 * 1024,
            functools.partial(self._on_instance_too_large, record),
            functools.partial(self._on_invalid_message, record))
        if not isinstance(raw, socket.socket):
            return
        # This association's socket reads whole PDUs, none larger than we accept.
        association_socket.recv = functools.partial(
            recv_bounded, raw, self._pdu_cap, functools.partial(self._on_pdu_too_large, record),
            functools.partial(self._on_connection_lost, event.assoc))
        if self.settings.tcp_nodelay:
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    @staticmethod
    def _on_connection_lost(assoc: Any) -> None:
        """The connection ended. An association thread still waiting for its A-ASSOCIATE-RQ
        would wait out the whole ACSE timeout, holding one of max_associations: wake it
        (pynetdicom reads None as "no request came") so that it ends now."""
        if not assoc.is_established and getattr(assoc.requestor, "primitive", None) is None:
            assoc.dul.to_user_queue.put(None)

    def _on_pdu_too_large(self, record: _AssociationRecord, length: int) -> None:
        reason = (f"PDU of {length} bytes declared, more than the {self._pdu_cap} accepted; "
                  "connection closed")
        log.warning("oversized PDU refused", extra=kv(address=record.address,
                                                      calling_aet=record.calling_ae,
                                                      bytes=length, limit=self._pdu_cap))
        self.audit.record(audit.SECURITY_ALERT, Outcome.SERIOUS_FAILURE,
                          event_type=audit.USE_OF_RESTRICTED_FUNCTION, peer_ae=record.calling_ae,
                          peer_address=record.address, local_ae=self.settings.ae_title,
                          bytes=length, reason=reason)

    def _on_instance_too_large(self, record: _AssociationRecord, message_id: int | None) -> None:
        log.warning("instance larger than dicom.max_instance_mb: its data is dropped as it "
                    "arrives and the store refused", extra=kv(
                        address=record.address, calling_aet=record.calling_ae,
                        message_id=message_id, limit_mb=self.settings.max_instance_mb))

    def _on_invalid_message(self, record: _AssociationRecord, error: Exception) -> None:
        log.warning("invalid DIMSE message; association aborted", extra=kv(
            address=record.address, calling_aet=record.calling_ae,
            error=f"{type(error).__name__}: {error}"))

    def _on_requested(self, event: evt.Event) -> None:
        assoc = event.assoc
        record = self._record(event)
        calling = str(assoc.requestor.primitive.calling_ae_title).strip()
        record.calling_ae = calling

        def established_by(ae_title: str) -> int:
            return sum(1 for server in list(self._servers.values())
                       for other in server.active_associations
                       if other is not assoc and other.is_established
                       and str(other.requestor.ae_title).strip() == ae_title)

        refusal = self._peers.refusal(calling, record.address, established_by)
        if refusal is None:
            return
        (result, source, diagnostic), reason = refusal
        record.refused = reason
        log.warning("association refused", extra=kv(calling_aet=calling,
                                                    address=record.address, reason=reason))
        self._audit_refusal(record, calling, reason)
        assoc.acse.send_reject(result, source, diagnostic)
        assoc.kill()

    def _audit_refusal(self, record: _AssociationRecord, calling: str, reason: str) -> None:
        common = dict(peer_ae=calling, peer_address=record.address,
                      local_ae=self.settings.ae_title, reason=reason,
                      tls=record.tls is not None)
        self.audit.record(audit.ASSOCIATION, Outcome.MINOR_FAILURE, event_type=audit.LOGIN,
                          **common)
        self.audit.record(audit.SECURITY_ALERT, Outcome.MINOR_FAILURE,
                          event_type=audit.NODE_AUTHENTICATION, **common)

    def _on_accepted(self, event: evt.Event) -> None:
        with self._counts_lock:
            self.associations += 1
        record = self._record(event)
        calling = str(event.assoc.requestor.ae_title).strip()
        record.calling_ae = calling
        log.debug("association accepted", extra=kv(calling_aet=calling, address=record.address))
        self.audit.record(audit.ASSOCIATION, Outcome.SUCCESS, event_type=audit.LOGIN,
                          peer_ae=calling, peer_address=record.address,
                          local_ae=self.settings.ae_title, tls=record.tls is not None,
                          **(record.tls or {}))

    def _on_rejected(self, event: evt.Event) -> None:
        record = self._record(event)
        calling = str(event.assoc.requestor.primitive.calling_ae_title).strip()
        called = str(event.assoc.requestor.primitive.called_ae_title).strip()
        if called != self.settings.ae_title:
            reason = f"called AE title {called!r} is not {self.settings.ae_title!r}"
        elif self.ae.require_calling_aet and calling not in self.ae.require_calling_aet:
            reason = f"calling AE title {calling!r} is not in dicom.allowed_calling_aets"
        else:
            reason = "too many associations at once (dicom.max_associations)"
        log.warning("association rejected", extra=kv(calling_aet=calling, called_aet=called,
                                                     address=record.address, reason=reason))
        self._audit_refusal(record, calling, reason)

    def _on_ended(self, event: evt.Event) -> None:
        """Released, aborted or closed: one "instances transferred" entry per study."""
        record = getattr(event.assoc, "radlens_record", None)
        if record is None or record.flushed:
            return
        record.flushed = True
        for study in sorted(set(record.stored) | set(record.failed)):
            failed = record.failed.get(study, 0)
            self.audit.record(
                audit.INSTANCES_TRANSFERRED,
                Outcome.SUCCESS if not failed else Outcome.MINOR_FAILURE,
                peer_ae=record.calling_ae, peer_address=record.address, direction="in",
                local_ae=self.settings.ae_title, study=study,
                instances=record.stored.get(study, 0), failed=failed,
                sop_classes=sorted(record.sop_classes.get(study, ())),
                tls=record.tls is not None)

    def _on_echo(self, event: evt.Event) -> int:
        return STATUS_SUCCESS

    def _on_store(self, event: evt.Event) -> int:
        record = self._record(event)
        status, study = self._store(event, record)
        key = study or "(unknown study)"
        if status == STATUS_SUCCESS:
            record.stored[key] += 1
        else:
            record.failed[key] += 1
        sop_class = getattr(event.request, "AffectedSOPClassUID", None)
        if sop_class:
            record.sop_classes.setdefault(key, set()).add(str(sop_class))
        return status

    def _store(self, event: evt.Event, record: _AssociationRecord) -> tuple[int, str | None]:
        calling_aet = event.assoc.requestor.ae_title
        limit = record.messages
        if limit is not None and int(event.request.MessageID) in limit.oversized:
            limit.oversized.discard(int(event.request.MessageID))
            log.warning("instance refused: larger than dicom.max_instance_mb", extra=kv(
                calling_aet=calling_aet, address=record.address,
                sop=str(event.request.AffectedSOPInstanceUID),
                limit_mb=self.settings.max_instance_mb))
            return STATUS_OUT_OF_RESOURCES, None
        try:
            encoded = event.encoded_dataset(include_meta=True)
            transfer_syntax = str(event.context.transfer_syntax)
        except Exception as exc:  # pynetdicom could not even hand us the dataset
            log.error("cannot read C-STORE dataset", extra=kv(calling_aet=calling_aet,
                                                              error=str(exc)))
            return STATUS_PROCESSING_FAILURE, None
        try:
            stored = self.spool.store(encoded, calling_aet=calling_aet,
                                      transfer_syntax_uid=transfer_syntax)
        except (UnparseableDatasetError, MissingUidError) as exc:
            try:
                self.spool.quarantine(encoded, calling_aet=calling_aet, reason=str(exc))
            except SpoolError as quarantine_error:
                log.error("cannot quarantine", extra=kv(error=str(quarantine_error)))
                return STATUS_OUT_OF_RESOURCES, None
            if isinstance(exc, UnparseableDatasetError):
                return STATUS_CANNOT_PARSE, None
            return STATUS_MISSING_UIDS, None
        except SpoolError as exc:
            log.error("cannot store instance", extra=kv(calling_aet=calling_aet, error=str(exc)))
            return STATUS_OUT_OF_RESOURCES, None
        study = stored.uids.study_instance_uid
        if stored.duplicate:
            log.info("instance already held", extra=kv(sop=stored.uids.sop_instance_uid,
                                                       calling_aet=calling_aet))
            return STATUS_SUCCESS, study
        with self._counts_lock:
            self.stored += 1
        log.debug("instance stored", extra=kv(sop=stored.uids.sop_instance_uid, study=study,
                                              calling_aet=calling_aet, bytes=stored.size_bytes))
        try:
            self.on_stored(stored)
        except Exception:  # the instance is durable; assembly is rebuilt from the state anyway
            log.exception("assembler notification failed", extra=kv(study=study))
        return STATUS_SUCCESS, study
