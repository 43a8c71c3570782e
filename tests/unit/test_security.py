"""The parts of the door and the audit trail that need no network: settings, peer rules, the
connection count, PDU reads, the BCP 195 contexts, certificates, audit entries and syslog."""

from __future__ import annotations

import json
import os
import socket
import ssl
import subprocess
from datetime import UTC, datetime, timedelta

import pytest

from radlens import audit
from radlens.audit import AuditError, AuditLog, Outcome, SyslogSender, parse_since, read_entries
from radlens.config import DicomSettings, load_settings
from radlens.dicom_io.guard import (
    REJECT_CALLING_AE,
    REJECT_LOCAL_LIMIT,
    ConnectionGuard,
    PduTooLargeError,
    PeerPolicy,
    pdu_cap,
    recv_bounded,
)
from radlens.dicom_io.tls import client_context, server_context, write_self_signed
from radlens.errors import ConfigError


def test_tls_and_peer_settings_are_checked_at_load():
    with pytest.raises(ConfigError, match="certificate and private_key go together"):
        load_settings(dicom={"tls": {"certificate": "/x.crt"}})
    with pytest.raises(ConfigError, match="require_client_certificate needs ca_certificates"):
        load_settings(dicom={"tls": {"certificate": "/x.crt", "private_key": "/x.key"}})
    with pytest.raises(ConfigError, match="is the plain port too"):
        load_settings(dicom={"port": 2762, "tls": {"certificate": "/x.crt",
                                                   "private_key": "/x.key",
                                                   "ca_certificates": "/ca.crt"}})
    with pytest.raises(ConfigError, match="TLS-only needs a certificate"):
        load_settings(dicom={"tls": {"only": True}})
    with pytest.raises(ConfigError, match="each AE title once"):
        load_settings(dicom={"peers": [{"ae_title": "CT"}, {"ae_title": "CT"}]})
    with pytest.raises(ConfigError, match=r"dicom\.peers\.0\.addresses"):
        load_settings(dicom={"peers": [{"ae_title": "CT", "addresses": ["10.0.0.300/8"]}]})
    with pytest.raises(ConfigError, match="syslog is udp://"):
        load_settings(audit={"syslog": "syslog.example:514"})
    only = load_settings(dicom={"port": 2762, "tls": {
        "certificate": "/x.crt", "private_key": "/x.key", "require_client_certificate": False,
        "only": True}})
    assert only.dicom.tls.enabled and only.dicom.tls.port == only.dicom.port


def test_peer_policy_binds_ae_titles_to_networks_and_limits():
    settings = DicomSettings(peers=[
        {"ae_title": "CT01", "addresses": ["10.1.0.0/16", "2001:db8::/32"]},
        {"ae_title": "US01", "max_associations": 2}])
    policy = PeerPolicy(settings.peers)
    none = lambda _: 0  # noqa: E731
    assert policy.refusal("CT01", "10.1.200.7", none) is None
    assert policy.refusal("CT01", "::ffff:10.1.0.9", none) is None  # IPv4-mapped
    assert policy.refusal("CT01", "2001:db8::5", none) is None
    refusal = policy.refusal("CT01", "10.2.0.1", none)
    assert refusal is not None and refusal[0] == REJECT_CALLING_AE
    assert "may not call from 10.2.0.1" in refusal[1]
    assert policy.refusal("US01", "192.0.2.1", lambda _: 1) is None
    limited = policy.refusal("US01", "192.0.2.1", lambda _: 2)
    assert limited is not None and limited[0] == REJECT_LOCAL_LIMIT
    assert policy.refusal("ANYONE", "192.0.2.1", lambda _: 99) is None


def test_connection_guard_counts_open_sockets_per_address():
    guard_settings = DicomSettings(max_connections_per_address=2)
    notices: list[tuple[str, int, int]] = []
    guard = ConnectionGuard(guard_settings, on_refused=lambda *n: notices.append(n))
    pairs = [socket.socketpair() for _ in range(4)]
    try:
        assert guard.admit(pairs[0][0], "10.0.0.1") and guard.admit(pairs[1][0], "10.0.0.1")
        assert not guard.admit(pairs[2][0], "10.0.0.1")  # the third at once
        assert not guard.admit(pairs[2][0], "10.0.0.1")
        assert notices == [("10.0.0.1", 2, 1)]  # one notice, not one per refusal
        assert guard.admit(pairs[3][0], "10.0.0.2")  # another address has its own count
        pairs[0][0].close()
        assert guard.held("10.0.0.1") == 1
        assert guard.admit(pairs[2][0], "10.0.0.1")  # a closed one frees its place
    finally:
        for left, right in pairs:
            left.close()
            right.close()
    assert ConnectionGuard(DicomSettings(max_connections_per_address=0)).admit(
        socket.socket(), "10.0.0.1")


def test_recv_bounded_refuses_declared_lengths_over_the_cap_before_reading():
    left, right = socket.socketpair()
    refused, closed = [], []
    try:
        left.sendall(b"abcdef")
        with pytest.raises(PduTooLargeError, match="2147483632 bytes"):
            recv_bounded(right, 1024, refused.append, lambda: closed.append(True), 0x7FFFFFF0)
        assert refused == [0x7FFFFFF0] and closed == [True]
        assert recv_bounded(right, 1024, refused.append, lambda: closed.append(True), 6) \
            == b"abcdef"
        left.close()
        assert recv_bounded(right, 1024, refused.append, lambda: closed.append(True), 6) == b""
        assert closed == [True, True]  # the peer's close is heard
    finally:
        right.close()
    assert pdu_cap(DicomSettings(max_pdu_size=16384)) == 1024 * 1024  # room for a request
    assert pdu_cap(DicomSettings(max_pdu_size=4 * 1024 * 1024)) == 4 * 1024 * 1024 + 1024
    assert pdu_cap(DicomSettings(max_pdu_size=0, max_instance_mb=10)) == 11 * 1024 * 1024


def test_self_signed_certificates_chain_and_the_contexts_follow_bcp195(tmp_path):
    files = write_self_signed(tmp_path, hostnames=["pacs.example.org", "10.9.8.7"])
    assert oct(os.stat(files.server_key).st_mode & 0o777) == "0o600"
    for certificate in (files.server_certificate, files.client_certificate):
        verified = subprocess.run(["openssl", "verify", "-CAfile", str(files.ca_certificate),
                                   str(certificate)], capture_output=True, text=True)
        assert verified.returncode == 0, verified.stdout + verified.stderr
    text = subprocess.run(["openssl", "x509", "-noout", "-text", "-in",
                           str(files.server_certificate)], capture_output=True, text=True).stdout
    for name in ("DNS:localhost", "DNS:pacs.example.org", "IP Address:10.9.8.7",
                 "IP Address:127.0.0.1", "TLS Web Server Authentication"):
        assert name in text
    settings = load_settings(dicom={"tls": {
        "certificate": str(files.server_certificate), "private_key": str(files.server_key),
        "ca_certificates": str(files.ca_certificate)}}).dicom.tls
    server = server_context(settings)
    assert server.minimum_version == ssl.TLSVersion.TLSv1_2
    assert server.verify_mode == ssl.CERT_REQUIRED
    tls12 = {c["name"] for c in server.get_ciphers() if c["protocol"] == "TLSv1.2"}
    assert tls12 and all("ECDHE" in name and "GCM" in name for name in tls12)
    client = client_context(settings)
    assert client.check_hostname and client.verify_mode == ssl.CERT_REQUIRED
    missing = settings.model_copy(update={"ca_certificates": tmp_path / "none.crt"})
    with pytest.raises(ConfigError, match="none.crt does not exist"):
        server_context(missing)


def test_audit_entries_are_json_lines_with_dicom_codes(tmp_path):
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path, node="test-node")
    log.record(audit.ASSOCIATION, event_type=audit.LOGIN, peer_ae="CT01",
               peer_address="10.0.0.5", local_ae="RADLENS", tls=True)
    log.record(audit.SECURITY_ALERT, Outcome.MINOR_FAILURE, event_type=audit.NODE_AUTHENTICATION,
               peer_address="10.0.0.6", reason="client certificate refused")
    with pytest.raises(ValueError, match="unknown audit fields: patient_name"):
        log.record(audit.QUERY, patient_name="DOE^JANE")
    log.close()
    with path.open("ab") as handle:
        handle.write(b'{"time": "torn')  # a write cut by a crash
    entries = list(read_entries(path))
    assert [e["event"] for e in entries] == ["association", "security-alert"]
    first, second = entries
    assert first["event_id"] == "DCM 110114 User Authentication"
    assert first["event_type"] == "DCM 110122 Login" and first["outcome_code"] == 0
    assert second["outcome"] == "minor-failure" and second["outcome_code"] == 4
    assert second["peer_ae"] is None and second["node"] == "test-node"
    assert list(read_entries(path, events={"security-alert"})) == [second]
    assert list(read_entries(path, since=datetime.now(UTC) + timedelta(minutes=1))) == []
    with pytest.raises(AuditError, match="no audit log"):
        list(read_entries(tmp_path / "absent.jsonl"))


def test_since_accepts_durations_and_iso_times():
    now = datetime.now(UTC)
    assert abs((now - parse_since("1h")) - timedelta(hours=1)) < timedelta(seconds=5)
    assert abs((now - parse_since("30m")) - timedelta(minutes=30)) < timedelta(seconds=5)
    assert parse_since("2026-11-01T08:00:00") == datetime(2026, 11, 1, 8, tzinfo=UTC)
    assert parse_since("2026-11-01T08:00:00Z") == datetime(2026, 11, 1, 8, tzinfo=UTC)
    with pytest.raises(AuditError, match="--since takes"):
        parse_since("last week")


def test_syslog_messages_are_rfc5424_over_udp_and_tcp():
    entry = {"time": "2026-11-24T01:00:00.000Z", "event": "security-alert", "outcome_code": 4,
             "outcome": "minor-failure"}
    receiver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    receiver.bind(("127.0.0.1", 0))
    receiver.settimeout(5)
    sender = SyslogSender(f"udp://127.0.0.1:{receiver.getsockname()[1]}", "radlens")
    sender.send(entry)
    message = receiver.recv(65536).decode()
    receiver.close()
    sender.close()
    header, body = message.split(" - ", 1)
    version, time, host, app, pid, msgid = header.split(" ")
    # PRI 84: facility 10 (security/authorization), severity 4 (a failure is a warning)
    assert (version, time, app, msgid) == ("<84>1", entry["time"], "radlens", "security-alert")
    assert host == socket.gethostname() and pid == str(os.getpid())
    assert json.loads(body) == entry

    listener = socket.create_server(("127.0.0.1", 0))
    tcp = SyslogSender(f"tcp://127.0.0.1:{listener.getsockname()[1]}", "radlens")
    tcp.send({**entry, "outcome_code": 0})
    connection, _ = listener.accept()
    connection.settimeout(5)
    framed = connection.recv(65536).decode()
    length, rest = framed.split(" ", 1)
    assert int(length) == len(rest.encode()) and rest.startswith("<85>1 ")
    connection.close()
    listener.close()
    tcp.close()


def test_a_socket_being_wrapped_in_tls_still_counts():
    """Wrapping a socket in TLS moves its descriptor; in between, the connection must still
    count against its address (a race the cluster-loaded suite once lost)."""
    guard = ConnectionGuard(DicomSettings(max_connections_per_address=1))
    first, peer = socket.socketpair()
    second, other = socket.socketpair()
    try:
        assert guard.admit(first, "10.0.0.1")
        guard.hand_over(first)
        descriptor = first.detach()  # what wrap_socket does to the raw socket
        assert not guard.admit(second, "10.0.0.1")
        wrapped = socket.socket(fileno=descriptor)
        guard.replace("10.0.0.1", first, wrapped)
        assert guard.held("10.0.0.1") == 1 and not guard.admit(second, "10.0.0.1")
        wrapped.close()
        assert guard.admit(second, "10.0.0.1")
    finally:
        for s in (peer, second, other):
            s.close()
