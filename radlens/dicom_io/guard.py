"""What stands at the door of the listener: who may connect, how much they may hold, how much
they may send.

- A source address holds at most ``dicom.max_connections_per_address`` connections, counted
  from the accept: a sender that opens connections and never speaks cannot take the
  association slots of everyone else (it also loses each one after ``acse_timeout_s``).
- A peer (``dicom.peers``) binds a calling AE title to the networks it may call from, and may
  have its own association limit.
- No PDU may be larger than the maximum we announced (``dicom.max_pdu_size``): a PDU header
  that declares 2 GB is a protocol violation and ends the connection before anything is read.
- No instance may be larger than ``dicom.max_instance_mb``: once its fragments pass that size
  they are dropped as they arrive, and the C-STORE is answered "Out of Resources".

pynetdicom logs a peer's broken connection or malformed PDU with a full traceback; those are
the peer's errors, handled, so ``QuietPeerErrors`` makes each one line.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from io import BytesIO
from typing import Any

from radlens.config import DicomSettings, Peer
from radlens.logs import kv

log = logging.getLogger(__name__)

NOTICE_INTERVAL_S = 10.0  # at most one log line and audit entry per refused address this often
# With max_pdu_size 0 ("unlimited") a PDU still may not exceed this, unless an instance may.
UNBOUNDED_PDU_CAP = 256 * 1024 * 1024
# An A-ASSOCIATE-RQ may be larger than the announced P-DATA maximum (many contexts).
MIN_PDU_CAP = 1024 * 1024

# A-ASSOCIATE-RJ (result, source, diagnostic) as pynetdicom sends them
REJECT_CALLING_AE = (0x01, 0x01, 0x03)
REJECT_LOCAL_LIMIT = (0x02, 0x03, 0x02)


class QuietPeerErrors(logging.Filter):
    """One line instead of a traceback for errors pynetdicom's transport layers hit on a
    peer's bad traffic (connection reset, short or undecodable PDU, invalid DIMSE message).
    Tracebacks from event handlers (radlens's own code) are left alone."""

    LOGGERS = ("pynetdicom.dul", "pynetdicom.transport", "pynetdicom.dimse", "pynetdicom.acse",
               "pynetdicom.pdu", "pynetdicom.pdu_items", "pynetdicom.dimse_messages")

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and record.exc_info[1] is not None:
            error = record.exc_info[1]
            record.msg = f"peer traffic error: {type(error).__name__}: {error}"
            record.args = None
            record.exc_info = None
            record.exc_text = None
            record.levelno, record.levelname = logging.WARNING, "WARNING"
        elif record.levelno >= logging.ERROR:  # "connection closed before the PDU ended"
            record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True

    @classmethod
    def install(cls) -> None:
        for name in cls.LOGGERS:
            logger = logging.getLogger(name)
            if not any(isinstance(f, cls) for f in logger.filters):
                logger.addFilter(cls())


def pdu_cap(settings: DicomSettings) -> int:
    """The largest PDU body a peer may send us."""
    if settings.max_pdu_size:
        return max(settings.max_pdu_size + 1024, MIN_PDU_CAP)
    if settings.max_instance_mb:
        return settings.max_instance_mb * 1024 * 1024 + MIN_PDU_CAP
    return UNBOUNDED_PDU_CAP


class PduTooLargeError(OSError):
    """A peer declared a PDU larger than we accept; the connection is closed unread."""


def recv_bounded(raw: socket.socket, cap: int, on_refused: Callable[[int], None],
                 on_closed: Callable[[], None], nr_bytes: int) -> bytearray:
    """Read ``nr_bytes`` from ``raw`` (pynetdicom's ``AssociationSocket.recv`` contract, in as
    few system calls as the kernel allows), refusing any read larger than ``cap`` before a
    byte of it is allocated. ``on_closed`` hears that the connection ended (the peer closed
    it, it broke, or it was refused)."""
    if nr_bytes > cap:
        on_refused(nr_bytes)
        on_closed()
        raise PduTooLargeError(f"the peer declared a PDU of {nr_bytes} bytes; at most {cap} "
                               "are accepted")
    buffer = bytearray(nr_bytes)
    view = memoryview(buffer)
    nr_read = 0
    while nr_read < nr_bytes:
        try:
            count = raw.recv_into(view[nr_read:], nr_bytes - nr_read)
        except OSError:
            on_closed()
            raise
        if not count:
            del view
            del buffer[nr_read:]
            on_closed()
            return buffer
        nr_read += count
    return buffer


def _nothing(*_: object) -> None:
    return None


@dataclass
class _OpenConnections:
    sockets: list[socket.socket] = field(default_factory=list)
    refused: int = 0
    noticed_at: float = 0.0


class ConnectionGuard:
    """Counts the connections each source address holds, across the listener's ports."""

    def __init__(self, settings: DicomSettings,
                 on_refused: Callable[[str, int, int], None] | None = None) -> None:
        """``on_refused(address, held, refused_since_last)`` hears of refusals, at most once
        per address every NOTICE_INTERVAL_S."""
        self.limit = settings.max_connections_per_address
        self.on_refused = on_refused
        self._by_address: dict[str, _OpenConnections] = {}
        self._handing_over: set[int] = set()  # sockets being wrapped in TLS right now
        self._lock = threading.Lock()

    def _open(self, connection: socket.socket) -> bool:
        return connection.fileno() >= 0 or id(connection) in self._handing_over

    def admit(self, connection: socket.socket, address: str) -> bool:
        """Whether a new connection from ``address`` may be served; if so it is counted until
        it closes."""
        if not self.limit:
            return True
        notice: tuple[int, int] | None = None
        with self._lock:
            entry = self._by_address.setdefault(address, _OpenConnections())
            entry.sockets = [s for s in entry.sockets if self._open(s)]
            if len(entry.sockets) < self.limit:
                entry.sockets.append(connection)
                return True
            entry.refused += 1
            now = time.monotonic()
            if now - entry.noticed_at >= NOTICE_INTERVAL_S:
                notice = (len(entry.sockets), entry.refused)
                entry.noticed_at, entry.refused = now, 0
        if notice is not None and self.on_refused is not None:
            self.on_refused(address, *notice)
        return False

    def hand_over(self, old: socket.socket) -> None:
        """``old`` is about to be wrapped in TLS, which takes its descriptor: keep counting it
        until ``replace`` names the socket that wraps it."""
        with self._lock:
            self._handing_over.add(id(old))

    def replace(self, address: str, old: socket.socket, new: socket.socket | None) -> None:
        """Count ``new`` (the TLS socket) in place of ``old`` (the raw socket it wraps); with
        None the wrapping failed and ``old`` counts as what it is (closed)."""
        with self._lock:
            self._handing_over.discard(id(old))
            entry = self._by_address.get(address)
            if entry is not None and new is not None:
                entry.sockets = [new if s is old else s for s in entry.sockets]

    def held(self, address: str) -> int:
        with self._lock:
            entry = self._by_address.get(address)
            return 0 if entry is None else sum(1 for s in entry.sockets if self._open(s))


class PeerPolicy:
    """``dicom.peers``: the networks a calling AE title may call from, and its own limit."""

    def __init__(self, peers: list[Peer]) -> None:
        self.peers = {peer.ae_title: peer for peer in peers}

    def refusal(self, calling_ae: str, address: str,
                established_by_ae: Callable[[str], int]) -> tuple[tuple[int, int, int],
                                                                      str] | None:
        """The A-ASSOCIATE-RJ and the reason to refuse this association, or None."""
        peer = self.peers.get(calling_ae.strip())
        if peer is None:
            return None
        if peer.addresses:
            try:
                source = ipaddress.ip_address(address.split("%", 1)[0])
            except ValueError:
                return REJECT_CALLING_AE, f"source address {address!r} is not an IP address"
            if source.version == 6 and source.ipv4_mapped is not None:
                source = source.ipv4_mapped
            if not any(source in network for network in peer.addresses):
                return REJECT_CALLING_AE, (f"calling AE title {peer.ae_title} may not call "
                                           f"from {address}")
        if peer.max_associations is not None:
            held = established_by_ae(peer.ae_title)
            if held >= peer.max_associations:
                return REJECT_LOCAL_LIMIT, (f"{peer.ae_title} already holds {held} "
                                            f"associations (its limit)")
        return None


class MessageGuard:
    """Stands between an association's DUL and its DIMSE decoding.

    - It caps each message's dataset: it counts the dataset bytes as P-DATA arrive; past
      ``max_bytes`` (0: no cap) the message's data so far is dropped and its later fragments
      are passed on empty, so the message still completes (and is answered) but memory stays
      bounded. ``oversized`` holds the Message IDs answered that way.
    - A message pynetdicom cannot decode (a command set without a Command Field, say) raises
      inside pynetdicom's reactor and kills the association's thread, leaving its connection
      open; here it ends the association with an A-ABORT instead, as pynetdicom does for the
      invalid messages it does catch.
    """

    def __init__(self, assoc: Any, max_bytes: int,
                 on_exceeded: Callable[[int | None], None],
                 on_invalid: Callable[[Exception], None]) -> None:
        self.max_bytes = max_bytes
        self.on_exceeded = on_exceeded
        self.on_invalid = on_invalid
        self.oversized: set[int] = set()
        self._dimse = assoc.dimse
        self._dul = assoc.dul
        self._receive = self._dimse.receive_primitive
        self._bytes = 0
        self._dropping = False
        self._dimse.receive_primitive = self.receive

    def receive(self, primitive: Any) -> None:
        if self._dimse.message is None:  # a new message starts
            self._bytes, self._dropping = 0, False
        try:
            if self.max_bytes:
                self._limit(primitive)
            self._receive(primitive)
        except Exception as exc:  # the peer's malformed message, not our bug
            self._dimse.message = None
            self.on_invalid(exc)
            self._dul.event_queue.put("Evt19")  # invalid PDU: A-ABORT, close

    def _limit(self, primitive: Any) -> None:
        items = primitive.presentation_data_value_list
        if not self._dropping:
            self._bytes += sum(len(data) - 1 for _, data in items if data and not data[0] & 1)
            if self._bytes > self.max_bytes:
                self._dropping = True
                message = self._dimse.message
                command = getattr(message, "command_set", None)
                message_id = getattr(command, "MessageID", None)
                if message_id is not None:
                    self.oversized.add(int(message_id))
                if message is not None and isinstance(getattr(message, "data_set", None),
                                                      BytesIO):
                    message.data_set = BytesIO()
                self.on_exceeded(message_id)
        if self._dropping:
            primitive.presentation_data_value_list = [
                [context_id, data if data and data[0] & 1 else bytes(data[:1])]
                for context_id, data in items]


def notice_refused_connection(address: str, held: int, refused: int) -> None:
    log.warning("connection refused: too many from one address", extra=kv(
        address=address, held=held, refused=refused))
