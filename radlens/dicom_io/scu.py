"""Sending: C-ECHO and C-STORE to a remote node, files sent byte for byte as stored."""

from __future__ import annotations

import logging
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from pynetdicom import AE, _config, evt
from pynetdicom.association import Association
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from radlens.errors import DestinationError

log = logging.getLogger(__name__)

# Stream each file's encoded dataset as it is on disk instead of decoding and re-encoding it.
_config.STORE_SEND_CHUNKED_DATASET = True

MAX_CONTEXTS_PER_ASSOCIATION = 128
# Success and the C-STORE warning statuses: the peer has the instance.
DELIVERED_STATUSES = frozenset({0x0000, 0xB000, 0xB006, 0xB007, 0x0107, 0x0116})
# Failures that sending again cannot change (the peer refuses this object, not the moment):
# SOP class not supported, not authorized, invalid or duplicate instance, unrecognised
# operation or mistyped argument (PS3.7 C), a data set that does not match its SOP class and
# "cannot understand" (PS3.4 B.2.3). Out of Resources (0xA7xx), Processing Failure (0x0110) and
# Resource Limitation (0x0213) are the peer's moment: they are retried.
REFUSAL_STATUSES = frozenset({0x0111, 0x0117, 0x0122, 0x0124, 0x0211, 0x0212})


def is_refusal(status: int) -> bool:
    """Whether a C-STORE failure status refuses the object for good (see REFUSAL_STATUSES)."""
    return status in REFUSAL_STATUSES or 0xA900 <= status <= 0xA9FF \
        or 0xC000 <= status <= 0xCFFF


def status_meaning(status: int) -> str:
    """The standard's words for a C-STORE status (from pynetdicom's tables)."""
    from pynetdicom.status import GENERAL_STATUS, STORAGE_SERVICE_CLASS_STATUS

    found = STORAGE_SERVICE_CLASS_STATUS.get(status) or GENERAL_STATUS.get(status)
    if found is None and 0xC000 <= status <= 0xCFFF:
        found = STORAGE_SERVICE_CLASS_STATUS.get(0xC000)
    return f"{found[0]}: {found[1]}" if found else "a status the standard does not define"


class ContextsRefusedError(DestinationError):
    """The destination accepted no presentation context of an association: a refusal."""


@dataclass(frozen=True)
class OutgoingFile:
    path: Path
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax_uid: str


@dataclass(frozen=True)
class SendResult:
    file: OutgoingFile
    status: int | None
    error: str | None = None
    refused: bool = False  # the peer refuses this object for good: sending again cannot help

    @property
    def delivered(self) -> bool:
        return self.status in DELIVERED_STATUSES


def _ae(calling_aet: str, timeout_s: float) -> AE:
    ae = AE(ae_title=calling_aet)
    ae.acse_timeout = timeout_s
    ae.dimse_timeout = timeout_s
    ae.network_timeout = timeout_s
    ae.connection_timeout = timeout_s
    return ae


def _associate(ae: AE, host: str, port: int, called_aet: str,
               tls_context: ssl.SSLContext | None = None) -> Association:
    """Associate, or raise DestinationError saying why (with the peer's rejection reason).
    With ``tls_context`` the connection is DICOM TLS, checked against ``host``."""
    responses: list[object] = []

    def keep_response(event: evt.Event) -> None:
        responses.append(event.primitive)

    where = f"{called_aet}@{host}:{port}" + (" (TLS)" if tls_context is not None else "")
    tls_args = (tls_context, host) if tls_context is not None else None
    assoc = ae.associate(host, port, ae_title=called_aet, tls_args=tls_args,
                         evt_handlers=[(evt.EVT_ACSE_RECV, keep_response)])
    if assoc.is_established:
        return assoc
    if assoc.is_rejected:
        reason = next((getattr(r, "reason_str", None) for r in responses
                       if getattr(r, "reason_str", None)), None)
        raise DestinationError(f"association rejected by {where}" +
                               (f": {reason}" if reason else ""))
    if assoc.rejected_contexts and not assoc.accepted_contexts:
        # pynetdicom aborts an association whose every presentation context the peer
        # rejected: the peer takes none of these objects, which sending again does not change.
        refused = sorted({str(cx.abstract_syntax) for cx in assoc.rejected_contexts})
        raise ContextsRefusedError(f"{where} accepts none of the presentation contexts "
                                   f"proposed (SOP classes {', '.join(refused)})")
    if responses:
        raise DestinationError(f"association aborted by {where}")
    # pynetdicom marks a failed TCP connect (or TLS handshake, logged by pynetdicom's transport
    # with its reason) as aborted too; no ACSE answer means no connection.
    if tls_context is not None:
        raise DestinationError(f"cannot connect to {where} (refused, unreachable, timed out, "
                               "or the TLS handshake failed: see the log for the reason)")
    raise DestinationError(f"cannot connect to {where} (refused, unreachable or timed out)")


def echo(host: str, port: int, called_aet: str, *, calling_aet: str = "RADLENS",
         timeout_s: float = 10.0, tls_context: ssl.SSLContext | None = None) -> int:
    """Send a C-ECHO; returns the status, raises DestinationError if no association."""
    ae = _ae(calling_aet, timeout_s)
    ae.add_requested_context(Verification)
    assoc = _associate(ae, host, port, called_aet, tls_context)
    try:
        response = assoc.send_c_echo()
    finally:
        assoc.release()
    if "Status" not in response:
        raise DestinationError(f"no C-ECHO response from {called_aet}@{host}:{port}")
    return int(response.Status)


def send_files(host: str, port: int, called_aet: str, files: Sequence[OutgoingFile], *,
               calling_aet: str, timeout_s: float = 30.0,
               tls_context: ssl.SSLContext | None = None) -> list[SendResult]:
    """C-STORE each file in its stored transfer syntax, over as few associations as contexts
    allow. Raises DestinationError when the node cannot be reached at all."""
    results: list[SendResult] = []
    remaining = list(files)
    while remaining:
        batch, contexts = [], set()
        for item in remaining:
            key = (item.sop_class_uid, item.transfer_syntax_uid)
            if key not in contexts and len(contexts) == MAX_CONTEXTS_PER_ASSOCIATION:
                continue
            contexts.add(key)
            batch.append(item)
        remaining = [item for item in remaining if item not in batch]
        results.extend(_send_batch(host, port, called_aet, batch, sorted(contexts),
                                   calling_aet, timeout_s, tls_context))
    return results


def _send_batch(host: str, port: int, called_aet: str, batch: list[OutgoingFile],
                contexts: list[tuple[str, str]], calling_aet: str,
                timeout_s: float, tls_context: ssl.SSLContext | None) -> list[SendResult]:
    ae = _ae(calling_aet, timeout_s)
    for sop_class, syntax in contexts:
        ae.add_requested_context(sop_class, syntax)
    try:
        assoc = _associate(ae, host, port, called_aet, tls_context)
    except ContextsRefusedError as exc:
        return [SendResult(item, None, str(exc), refused=True) for item in batch]
    results = []
    try:
        for item in batch:
            if not assoc.is_established:
                results.append(SendResult(item, None, "association ended before this file"))
                continue
            if not item.path.is_file():
                results.append(SendResult(item, None, f"file missing: {item.path}"))
                continue
            try:
                response = assoc.send_c_store(item.path)
            except ValueError as exc:
                # No accepted presentation context: the peer takes no such object (in this
                # transfer syntax), which sending again does not change.
                refused = "No presentation context" in str(exc)
                results.append(SendResult(item, None, str(exc), refused=refused))
                continue
            except (RuntimeError, OSError) as exc:
                results.append(SendResult(item, None, str(exc)))
                continue
            if "Status" in response:
                status = int(response.Status)
                error = None if status in DELIVERED_STATUSES else \
                    f"status 0x{status:04X} ({status_meaning(status)})"
                results.append(SendResult(item, status, error,
                                          refused=error is not None and is_refusal(status)))
            else:
                results.append(SendResult(item, None, "no response (timeout or abort)"))
    finally:
        if assoc.is_established:
            assoc.release()
    return results
