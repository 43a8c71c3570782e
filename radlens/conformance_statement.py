"""The DICOM Conformance Statement, written from the code's own lists so that it cannot drift:
the SOP classes and transfer syntaxes the listener accepts (``dicom_io.acceptor``), the statuses
it answers (``dicom_io.scp``), the objects the writers make (``writers.common``), the TLS profile
(``dicom_io.tls``), the character sets and the codes the SR uses (``dicom_io.codes``).

``radlens conformance`` prints it; ``docs/conformance.md`` is its output, and a test checks the
two are the same. PS3.2 gives the layout (Annex A); this is its substance in Markdown, not the
full template, whose remaining sections say "not supported".
"""

from __future__ import annotations

from pydicom.sr.coding import Code
from pydicom.uid import UID
from pynetdicom import AllStoragePresentationContexts

from radlens import __version__
from radlens.config import Settings


def _uid_name(uid: str) -> str:
    return UID(uid).name


def _codes() -> list[Code]:
    """Every concept radlens writes: the shared ones and every installed task's."""
    from radlens.dicom_io.codes import all_codes

    found = {(c.value, c.scheme_designator): c for c in all_codes()}
    return sorted(found.values(), key=lambda c: (c.scheme_designator, c.value))


def conformance_statement() -> str:
    """The statement as Markdown."""
    from radlens.dicom_io.acceptor import ACCEPTED_TRANSFER_SYNTAXES
    from radlens.dicom_io.scp import (
        STATUS_CANNOT_PARSE,
        STATUS_MISSING_UIDS,
        STATUS_OUT_OF_RESOURCES,
        STATUS_PROCESSING_FAILURE,
        STATUS_SUCCESS,
    )
    from radlens.dicom_io.scu import DELIVERED_STATUSES, REFUSAL_STATUSES, status_meaning
    from radlens.dicom_io.tls import BCP195_TLS12_CIPHERS
    from radlens.dicom_io.writers.common import OUTPUT_SOP_CLASSES, OUTPUT_TRANSFER_SYNTAXES

    defaults = Settings()
    d = defaults.dicom
    lines = [
        "# DICOM Conformance Statement",
        "",
        f"radlens {__version__}. Research use only: not for diagnostic use. Written by "
        "`radlens conformance` from the code's own lists; do not edit by hand.",
        "",
        "## 1. Overview",
        "",
        "radlens is a storage node: it accepts C-ECHO and C-STORE of every storage SOP class "
        "(Storage SCP), analyses the images its models cover, and sends its results, and "
        "instances an operator forwards, to configured destinations (Storage SCU). It offers no "
        "query, retrieve, worklist, print or storage commitment service.",
        "",
        "| network service | role |",
        "|---|---|",
        "| Verification | SCP, and SCU (`radlens echo`) |",
        f"| Storage ({len(AllStoragePresentationContexts)} SOP classes) | SCP |",
        f"| Storage ({len(OUTPUT_SOP_CLASSES)} SOP classes of results, and any forwarded "
        "instance) | SCU |",
        "",
        "## 2. Application entity",
        "",
        f"- AE title: `{d.ae_title}` (`dicom.ae_title`); the called AE title must match; "
        "calling AE titles may be restricted (`dicom.allowed_calling_aets`, `dicom.peers` with "
        "source networks).",
        f"- Port: {d.port} (`dicom.port`); DICOM TLS on {d.tls.port} (`dicom.tls.port`) when a "
        "certificate is configured.",
        f"- Associations at once: {d.max_associations} per listener process "
        f"(`dicom.max_associations`); connections per source address: "
        f"{d.max_connections_per_address}.",
        f"- Maximum PDU received: {d.max_pdu_size} bytes (`dicom.max_pdu_size`); one operation "
        "at a time per association (no asynchronous operations window).",
        f"- Time-outs: ACSE {d.acse_timeout_s:g} s, DIMSE {d.dimse_timeout_s:g} s, network "
        f"{d.network_timeout_s:g} s; instances over {d.max_instance_mb} MB are refused.",
        "",
        "## 3. Storage SCP",
        "",
        "Every instance is written durably (fsync) and indexed before Success is answered; it "
        "is kept exactly as received, in the transfer syntax of its presentation context. The "
        "listener accepts every storage SOP class below in every transfer syntax of the "
        "following table, preferring the proposer's compressed syntaxes, so nothing is "
        "transcoded on the way in.",
        "",
        "| transfer syntax | UID |",
        "|---|---|",
    ]
    lines += [f"| {_uid_name(uid)} | {uid} |" for uid in ACCEPTED_TRANSFER_SYNTAXES]
    lines += [
        "",
        "C-STORE statuses answered:",
        "",
        "| status | meaning | when |",
        "|---|---|---|",
        f"| 0x{STATUS_SUCCESS:04X} | Success | stored and indexed, or already held byte for "
        "byte |",
        f"| 0x{STATUS_OUT_OF_RESOURCES:04X} | Refused: Out of Resources | the disk is nearly "
        "full (`storage.min_free_mb`), the instance is larger than `dicom.max_instance_mb`, or "
        "a write or index error; nothing half-written is left |",
        f"| 0x{STATUS_CANNOT_PARSE:04X} | Error: Cannot Understand | the data set cannot be "
        "parsed; its bytes are quarantined |",
        f"| 0x{STATUS_MISSING_UIDS:04X} | Error: Cannot Understand | the data set lacks usable "
        "Study, Series or SOP Instance UIDs; quarantined |",
        f"| 0x{STATUS_PROCESSING_FAILURE:04X} | Processing Failure | the data set could not "
        "be taken from the association |",
        "",
        "Storage SOP classes accepted:",
        "",
        "| SOP class | UID |",
        "|---|---|",
    ]
    lines += [f"| {_uid_name(str(cx.abstract_syntax))} | {cx.abstract_syntax} |"
              for cx in AllStoragePresentationContexts]
    lines += [
        "",
        "## 4. Storage SCU",
        "",
        "Each job's results, sent to the destinations the delivery rules choose (`delivery`; "
        "by default every configured destination), each the kinds of output it takes "
        "(`destinations[].outputs`), one association per destination and batch, each object "
        "proposed in its own transfer syntax:",
        "",
        "| SOP class | UID | what |",
        "|---|---|---|",
    ]
    lines += [f"| {_uid_name(uid)} | {uid} | {what} |" for uid, what in OUTPUT_SOP_CLASSES.items()]
    lines += [
        "",
        "Transfer syntax of the results: " + ", ".join(
            f"{_uid_name(uid)} ({uid})" for uid in OUTPUT_TRANSFER_SYNTAXES) + ". Instances "
        "forwarded with `radlens forward` are sent byte for byte in their stored syntax.",
        "",
        "Statuses received: " + ", ".join(f"0x{s:04X}" for s in sorted(DELIVERED_STATUSES)) +
        " count as delivered. A refusal fails the delivery at once, without retry: " +
        ", ".join(f"0x{s:04X} ({status_meaning(s)})" for s in sorted(REFUSAL_STATUSES)) +
        ", 0xA900-0xA9FF (Error: Data Set Does Not Match SOP Class), 0xC000-0xCFFF (Error: "
        "Cannot Understand), and an association on which the destination accepted no "
        "presentation context. Any other failure, and a destination that cannot be reached, "
        f"is retried with exponential back-off ({defaults.outbox.retry_initial_s:g} s doubling "
        f"to {defaults.outbox.retry_max_s:g} s) until `outbox.max_age_h` "
        f"({defaults.outbox.max_age_h:g} h) after the result was queued.",
        "",
        "## 5. Security",
        "",
        "DICOM TLS (PS3.15 B.9, the BCP 195 TLS secure transport profile): TLS 1.2 or newer, "
        "with these TLS 1.2 cipher suites (TLS 1.3 suites as OpenSSL offers them):",
        "",
    ]
    lines += [f"- `{cipher}`" for cipher in BCP195_TLS12_CIPHERS.split(":")]
    lines += [
        "",
        "The node shows its certificate; a client certificate is required by default "
        "(`dicom.tls.require_client_certificate`) and checked against "
        "`dicom.tls.ca_certificates`. Results go over TLS to destinations with `tls: true`, "
        "whose certificate must chain to the configured CAs and name the host. Every "
        "association, transfer, refusal and deletion is in the audit trail (DICOM audit event "
        "IDs, PS3.15 A.5), as a file and to a syslog collector.",
        "",
        "## 6. Character sets",
        "",
        "Received instances are kept as received, in any character set pydicom decodes. The "
        "results are written in `ISO_IR 192` (UTF-8); text copied from a source is decoded "
        "with its declared character set, and attributes that do not conform are corrected or "
        "left out, one log line each.",
        "",
        "## 7. Structured reports and codes",
        "",
        "The SR (Comprehensive 3D SR, written with highdicom) follows TID 1500 (Measurement "
        "Report): per analysed image a measurement group with its class probabilities; per "
        "lesion a group (TID 1501) with a tracking identifier, its contour and diameters as "
        "image SCOORDs, measurements in UCUM units and a reference to its SEG segment; then a "
        "narrative and a not-for-diagnostic-use statement. Mammograms get TID 1500's "
        "qualitative evaluations (breast composition). A study that could not be analysed gets "
        "an SR stating why. Concepts from DICOM (DCM), SNOMED CT (SCT), UCUM and UMLS are "
        "used wherever one exists; the rest are radlens's own, in the private scheme "
        "`99RADLENS`, each with the reason. The saliency Parametric Map's quantity is DCM "
        "130404 Saliency.",
        "",
        "| code | scheme | meaning | why private |",
        "|---|---|---|---|",
    ]
    from radlens.dicom_io.codes import private_reasons

    reasons = private_reasons()
    lines += [f"| {c.value} | {c.scheme_designator} | {c.meaning} | "
              f"{reasons.get(c.value, '') if c.scheme_designator == '99RADLENS' else ''}"
              f" |" for c in _codes()]
    return "\n".join(lines) + "\n"
