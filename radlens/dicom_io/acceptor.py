"""The acceptor side of pynetdicom as radlens runs it: the AE with every storage context, the
server that accepts connections (TLS handshakes off the accept loop, connections counted per
address, an optionally shared port), and the cheap copies of contexts and reads of PDUs that
keep an association's overhead low."""

from __future__ import annotations

import copy
import socket
import socketserver
import ssl
from collections.abc import Callable
from typing import Any

from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts
from pynetdicom.presentation import PresentationContext
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.transport import ThreadedAssociationServer

from radlens.config import DicomSettings
from radlens.dicom_io.guard import ConnectionGuard, _nothing, recv_bounded
from radlens.errors import RadlensError

# pynetdicom accepts, per context, the first syntax of *our* list that the peer proposes. Keeping
# encapsulated syntaxes first means a sender offering its file's own compressed syntax is never
# asked to transcode, and what we store is what it had. Explicit VR beats implicit, little endian
# beats big.
_NATIVE = ("1.2.840.10008.1.2.1", "1.2.840.10008.1.2", "1.2.840.10008.1.2.2")
ACCEPTED_TRANSFER_SYNTAXES: tuple[str, ...] = tuple(
    [uid for uid in ALL_TRANSFER_SYNTAXES if uid not in _NATIVE] + list(_NATIVE)
)

# pynetdicom's DUL reactor sleeps this long whenever a loop found nothing to do (default 1 ms).
# C-STORE is request/response, so the sleep is paid on every instance, twice; 0.2 ms cuts that
# latency. The price, measured here: an idle association costs 8% of a core instead of 4%.
DUL_IDLE_SLEEP_S = 0.0002


class PortInUseError(RadlensError):
    """The DICOM port is held by another program."""


class ListenerServer(ThreadedAssociationServer):
    """pynetdicom's threaded server, with radlens's door: connections counted per source
    address (``guard``), TLS handshakes in the connection's own thread, and optionally a port
    shared with other processes.

    pynetdicom's server does the TLS handshake in its accept loop, on a blocking socket: one
    client that connects and never speaks stalls every new connection behind it. Here the
    accept loop only accepts; the handshake runs, under ``handshake_timeout_s``, in the thread
    socketserver starts for the connection, before the association begins.

    With ``reuse_port`` the socket is bound with SO_REUSEPORT, so several processes of the same
    user can listen on one port and the kernel spreads new connections over them. The server
    owns its own life: unlike ``AE.start_server`` it is not registered with the AE.
    """

    reuse_port: bool = False
    guard: ConnectionGuard | None = None
    tls_context: ssl.SSLContext | None = None
    handshake_timeout_s: float = 30.0
    on_handshake_failed: Callable[[str, str], None] | None = None

    def server_bind(self) -> None:
        if self.reuse_port:
            assert self.socket is not None
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        super().server_bind()

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        assert self.socket is not None
        connection, address = self.socket.accept()
        return connection, address

    def verify_request(self, request: Any, client_address: Any) -> bool:
        return self.guard is None or self.guard.admit(request, str(client_address[0]))

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        if self.tls_context is not None:
            try:
                request = self._handshake(request, client_address)
            except (ssl.SSLError, OSError) as exc:
                try:
                    request.close()
                finally:
                    if self.on_handshake_failed is not None:
                        self.on_handshake_failed(str(client_address[0]), describe_tls_error(exc))
                return
        super().process_request_thread(request, client_address)

    def _handshake(self, raw: socket.socket, client_address: Any) -> ssl.SSLSocket:
        assert self.tls_context is not None
        raw.settimeout(self.handshake_timeout_s)
        # Wrapping moves the descriptor into the TLS socket: count that one from now on, so a
        # client stuck in its handshake still counts against its address.
        address = str(client_address[0])
        if self.guard is not None:
            self.guard.hand_over(raw)
        tls_socket: ssl.SSLSocket | None = None
        try:
            tls_socket = self.tls_context.wrap_socket(raw, server_side=True,
                                                      do_handshake_on_connect=False)
        finally:
            if self.guard is not None:
                self.guard.replace(address, raw, tls_socket)
        try:
            tls_socket.do_handshake()
        except BaseException:
            tls_socket.close()
            raise
        tls_socket.settimeout(None)
        return tls_socket

    def shutdown(self) -> None:
        socketserver.BaseServer.shutdown(self)
        self.server_close()


class SharedPortListenerServer(ListenerServer):
    """A ListenerServer bound with SO_REUSEPORT."""

    reuse_port = True


def describe_tls_error(exc: BaseException) -> str:
    """A TLS failure in words: plain DICOM on the TLS port, an untrusted or missing
    certificate, a silent client."""
    if isinstance(exc, TimeoutError | socket.timeout):
        return "no TLS handshake within the timeout (a silent or non-TLS client)"
    reason = getattr(exc, "reason", None) or str(exc)
    if reason in ("WRONG_VERSION_NUMBER", "HTTP_REQUEST", "UNKNOWN_PROTOCOL"):
        return f"not a TLS client ({reason}): plain DICOM sent to the TLS port?"
    if "CERTIFICATE" in str(reason).upper():
        return f"client certificate refused ({reason})"
    return f"TLS handshake failed ({reason})"


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


def reserve_port(host: str, port: int) -> socket.socket:
    """Bind ``host:port`` (0: a free port) with SO_REUSEPORT and never listen on it.

    The agent holds this while its listener processes serve the port: no other program can bind
    it between a listener's death and its restart, and a socket that does not listen never
    receives a connection, so the kernel hands every association to a listener.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    reserved = socket.socket(family, socket.SOCK_STREAM)
    try:
        reserved.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        reserved.bind((host, port))
    except OSError as exc:
        reserved.close()
        raise PortInUseError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from exc
    return reserved


def recv_exactly(raw: socket.socket, nr_bytes: int) -> bytearray:
    """Read ``nr_bytes`` from ``raw``, or fewer if the peer closes: pynetdicom's
    ``AssociationSocket.recv`` contract, without its 4 KiB reads.

    pynetdicom reads a PDU 4 KiB at a time, so a 0.5 MB instance costs 130 system calls and as
    many hand-overs of the GIL; with several associations in one process each hand-over may
    wait for another thread. Reading into one buffer as much as the kernel holds takes a few.
    """
    return recv_bounded(raw, nr_bytes, _nothing, _nothing, nr_bytes)


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
