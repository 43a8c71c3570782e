"""The DICOM listener: a pynetdicom AE whose handlers do one thing each and return a status.

Storage logic lives in ``spool.py``; heavy work never runs in a DIMSE handler. Handlers answer
Success only after the spool has made the instance durable.
"""

from __future__ import annotations

import copy
import functools
import logging
import os
import socket
import socketserver
import threading
import time
from collections.abc import Callable

from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, _config, evt
from pynetdicom.presentation import PresentationContext
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.transport import ThreadedAssociationServer

from radlens.config import DicomSettings
from radlens.dicom_io.spool import MissingUidError, Spool, StoredInstance, UnparseableDatasetError
from radlens.errors import RadlensError, SpoolError
from radlens.logs import kv

log = logging.getLogger(__name__)

STATUS_SUCCESS = 0x0000
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_CANNOT_PARSE = 0xC000
STATUS_MISSING_UIDS = 0xC001
STATUS_PROCESSING_FAILURE = 0x0110

# pynetdicom accepts, per context, the first syntax of *our* list that the peer proposes. Keeping
# encapsulated syntaxes first means a sender offering its file's own compressed syntax is never
# asked to transcode, and what we store is what it had. Explicit VR beats implicit, little endian
# beats big.
_NATIVE = ("1.2.840.10008.1.2.1", "1.2.840.10008.1.2", "1.2.840.10008.1.2.2")
ACCEPTED_TRANSFER_SYNTAXES: tuple[str, ...] = tuple(
    [uid for uid in ALL_TRANSFER_SYNTAXES if uid not in _NATIVE] + list(_NATIVE)
)

# pynetdicom's standard handlers log every PDU at INFO and cost time on every message.
_config.LOG_HANDLER_LEVEL = "none"
# pynetdicom's DUL reactor sleeps this long whenever a loop found nothing to do (default 1 ms).
# C-STORE is request/response, so the sleep is paid on every instance, twice; 0.2 ms cuts that
# latency. The price, measured here: an idle association costs 8% of a core instead of 4%.
DUL_IDLE_SLEEP_S = 0.0002


class PortInUseError(RadlensError):
    """The DICOM port is held by another program."""


class ListenerServer(ThreadedAssociationServer):
    """pynetdicom's threaded server, optionally sharing its port with other processes.

    With ``reuse_port`` the socket is bound with SO_REUSEPORT, so several processes of the same
    user can listen on one port and the kernel spreads new connections over them. The server
    owns its own life: unlike ``AE.start_server`` it is not registered with the AE.
    """

    reuse_port: bool = False

    def server_bind(self) -> None:
        if self.reuse_port:
            assert self.socket is not None
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        super().server_bind()

    def shutdown(self) -> None:
        socketserver.BaseServer.shutdown(self)
        self.server_close()


class SharedPortListenerServer(ListenerServer):
    """A ListenerServer bound with SO_REUSEPORT."""

    reuse_port = True


def check_port_free(host: str, port: int) -> None:
    """Raise PortInUseError if another program listens on ``host:port``.

    Sockets bound with SO_REUSEPORT do not fail on a port that another such socket of the same
    user holds, so an agent sharing its port with its own processes would otherwise silently
    share it with a stranger too: a plain bind first proves the port is ours.
    """
    if port == 0:
        return
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise PortInUseError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from exc


def recv_exactly(raw: socket.socket, nr_bytes: int) -> bytearray:
    """Read ``nr_bytes`` from ``raw``, or fewer if the peer closes: pynetdicom's
    ``AssociationSocket.recv`` contract, without its 4 KiB reads.

    pynetdicom reads a PDU 4 KiB at a time, so a 0.5 MB instance costs 130 system calls and as
    many hand-overs of the GIL; with several associations in one process each hand-over may
    wait for another thread. Reading into one buffer as much as the kernel holds takes a few.
    """
    buffer = bytearray(nr_bytes)
    view = memoryview(buffer)
    nr_read = 0
    while nr_read < nr_bytes:
        count = raw.recv_into(view[nr_read:], nr_bytes - nr_read)
        if not count:
            del view
            del buffer[nr_read:]
            return buffer
        nr_read += count
    return buffer


class AcceptedContext(PresentationContext):
    """A supported presentation context that copies cheaply.

    pynetdicom deep-copies the acceptor's supported contexts for every association. For 170
    storage classes with 45 transfer syntaxes each that is 9,600 pydicom UIDs, each rebuilt and
    validated against its regular expression: about 50 ms of CPU per association, paid once
    per image by a modality that opens an association per image. A context's values are
    immutable strings, so its copy shares them; only its lists are new.
    """

    def __deepcopy__(self, memo: dict[int, object]) -> AcceptedContext:
        clone = copy.copy(self)
        clone.__dict__.update({name: list(value) for name, value in vars(self).items()
                               if isinstance(value, list)})
        return clone


def accepted_contexts(ae: AE) -> list[AcceptedContext]:
    """The AE's supported contexts, as contexts that copy cheaply."""
    contexts = []
    for supported in ae.supported_contexts:
        context = AcceptedContext()
        context.abstract_syntax = supported.abstract_syntax
        context.transfer_syntax = list(supported.transfer_syntax)
        contexts.append(context)
    return contexts


def build_ae(settings: DicomSettings) -> AE:
    """An acceptor for C-ECHO and every storage SOP class in every supported transfer syntax."""
    ae = AE(ae_title=settings.ae_title)
    ae.require_called_aet = True
    ae.require_calling_aet = list(settings.allowed_calling_aets)
    ae.maximum_associations = settings.max_associations
    ae.maximum_pdu_size = settings.max_pdu_size
    ae.network_timeout = settings.network_timeout_s
    ae.acse_timeout = settings.acse_timeout_s
    ae.dimse_timeout = settings.dimse_timeout_s
    ae.add_supported_context(Verification)
    for context in AllStoragePresentationContexts:
        ae.add_supported_context(context.abstract_syntax, list(ACCEPTED_TRANSFER_SYNTAXES))
    return ae


class StorageListener:
    """Accepts associations, files each C-STORE in the spool, tells ``on_stored`` about it."""

    def __init__(self, settings: DicomSettings, spool: Spool,
                 on_stored: Callable[[StoredInstance], None], *,
                 reuse_port: bool = False) -> None:
        self.settings = settings
        self.spool = spool
        self.on_stored = on_stored
        self.reuse_port = reuse_port
        self.ae = build_ae(settings)
        self._contexts = accepted_contexts(self.ae)
        self._server: ListenerServer | None = None
        self._counts_lock = threading.Lock()
        self.associations = 0
        self.stored = 0

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("listener is not running")
        return int(self._server.server_address[1])

    @property
    def running(self) -> bool:
        """Whether the listener accepts associations (for ``/healthz``)."""
        return self._server is not None and self._server.socket.fileno() >= 0

    def start(self) -> None:
        handlers = [
            (evt.EVT_CONN_OPEN, self._on_connection_open),
            (evt.EVT_REJECTED, self._on_rejected),
            (evt.EVT_ACCEPTED, self._on_accepted),
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_C_STORE, self._on_store),
        ]
        server_class = SharedPortListenerServer if self.reuse_port else ListenerServer
        try:
            server = self.ae.make_server((self.settings.host, self.settings.port),
                                         evt_handlers=handlers, server_class=server_class,
                                         contexts=self._contexts)
        except OSError as exc:
            raise PortInUseError(f"cannot listen on {self.settings.host}:{self.settings.port}: "
                                 f"{exc.strerror or exc}") from exc
        threading.Thread(target=server.serve_forever, name=f"AcceptorServer:{self.settings.port}",
                         daemon=True).start()
        self._server = server
        log.info("listening", extra=kv(ae_title=self.settings.ae_title, host=self.settings.host,
                                       port=self.port, shared_port=self.reuse_port,
                                       pid=os.getpid()))

    def stop(self, grace_s: float) -> int:
        """Stop accepting, let associations in flight finish for ``grace_s``; returns how many
        had to be aborted."""
        if self._server is None:
            return 0
        server, self._server = self._server, None
        server.shutdown()
        connections = server.active_associations
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

    # -- handlers ------------------------------------------------------------------------------
    def _on_connection_open(self, event: evt.Event) -> None:
        dul = event.assoc.dul
        if hasattr(dul, "_run_loop_delay"):  # a private knob: without it we only lose speed
            dul._run_loop_delay = DUL_IDLE_SLEEP_S
        association_socket = event.assoc.dul.socket
        raw = getattr(association_socket, "socket", None)
        if not isinstance(raw, socket.socket):
            return
        # This association's socket reads whole PDUs (see recv_exactly).
        association_socket.recv = functools.partial(recv_exactly, raw)
        if self.settings.tcp_nodelay:
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def _on_accepted(self, event: evt.Event) -> None:
        with self._counts_lock:
            self.associations += 1
        log.debug("association accepted", extra=kv(calling_aet=event.assoc.requestor.ae_title,
                                                   address=event.assoc.requestor.address))

    def _on_rejected(self, event: evt.Event) -> None:
        log.warning(
            "association rejected",
            extra=kv(calling_aet=event.assoc.requestor.ae_title,
                     called_aet=event.assoc.acceptor.ae_title,
                     address=event.assoc.requestor.address),
        )

    def _on_echo(self, event: evt.Event) -> int:
        return STATUS_SUCCESS

    def _on_store(self, event: evt.Event) -> int:
        calling_aet = event.assoc.requestor.ae_title
        try:
            encoded = event.encoded_dataset(include_meta=True)
            transfer_syntax = str(event.context.transfer_syntax)
        except Exception as exc:  # pynetdicom could not even hand us the dataset
            log.error("cannot read C-STORE dataset", extra=kv(calling_aet=calling_aet,
                                                              error=str(exc)))
            return STATUS_PROCESSING_FAILURE
        try:
            stored = self.spool.store(encoded, calling_aet=calling_aet,
                                      transfer_syntax_uid=transfer_syntax)
        except (UnparseableDatasetError, MissingUidError) as exc:
            try:
                self.spool.quarantine(encoded, calling_aet=calling_aet, reason=str(exc))
            except SpoolError as quarantine_error:
                log.error("cannot quarantine", extra=kv(error=str(quarantine_error)))
                return STATUS_OUT_OF_RESOURCES
            if isinstance(exc, UnparseableDatasetError):
                return STATUS_CANNOT_PARSE
            return STATUS_MISSING_UIDS
        except SpoolError as exc:
            log.error("cannot store instance", extra=kv(calling_aet=calling_aet, error=str(exc)))
            return STATUS_OUT_OF_RESOURCES
        if stored.duplicate:
            log.info("instance already held", extra=kv(sop=stored.uids.sop_instance_uid,
                                                       calling_aet=calling_aet))
            return STATUS_SUCCESS
        with self._counts_lock:
            self.stored += 1
        log.debug("instance stored", extra=kv(sop=stored.uids.sop_instance_uid,
                                              study=stored.uids.study_instance_uid,
                                              calling_aet=calling_aet, bytes=stored.size_bytes))
        try:
            self.on_stored(stored)
        except Exception:  # the instance is durable; assembly is rebuilt from the state anyway
            log.exception("assembler notification failed", extra=kv(
                study=stored.uids.study_instance_uid))
        return STATUS_SUCCESS
