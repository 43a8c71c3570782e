"""DICOM TLS with dcmtk on both sides, peers bound to addresses and limits, the instance size
cap, and the audit trail (file, syslog and ``radlens audit``)."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import time
from pathlib import Path

import pydicom
import pytest
from pynetdicom import AE

from tests.helpers import (
    TEST_FILES,
    closed_by_node,
    free_port,
    port_open,
    radlens_cli,
    require_tool,
    storescu,
    wait_for,
)

CT = TEST_FILES / "CT_small.dcm"
MR = TEST_FILES / "MR_small.dcm"


@pytest.fixture(scope="module")
def certificates(tmp_path_factory) -> Path:
    """ca.crt, server/client pairs from ``radlens tls-selfsigned``, and a second CA's client
    pair that the agent must not trust."""
    folder = tmp_path_factory.mktemp("certs")
    made = radlens_cli("tls-selfsigned", "--out", str(folder))
    assert made.returncode == 0, made.stderr
    other = radlens_cli("tls-selfsigned", "--out", str(folder / "other"))
    assert other.returncode == 0, other.stderr
    return folder


def tls_env(certs: Path, tls_port: int, **extra: str) -> dict[str, str]:
    return {"RADLENS_DICOM__TLS__PORT": str(tls_port),
            "RADLENS_DICOM__TLS__CERTIFICATE": str(certs / "server.crt"),
            "RADLENS_DICOM__TLS__PRIVATE_KEY": str(certs / "server.key"),
            "RADLENS_DICOM__TLS__CA_CERTIFICATES": str(certs / "ca.crt"),
            "RADLENS_MODEL__ENABLED": "false", **extra}


def tls_storescu(port: int, files: list[Path], certs: Path, *, key: str = "client",
                 calling: str = "STORESCU", extra: tuple[str, ...] = ()
                 ) -> subprocess.CompletedProcess[str]:
    return storescu(port, files, calling_aet=calling, extra=[
        "+tls", str(certs / f"{key}.key"), str(certs / f"{key}.crt"),
        "+cf", str(certs / "ca.crt"), *extra])


def audit_entries(server) -> list[dict]:
    path = server.data_dir / "audit.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_tls_listener_beside_the_plain_port(server_factory, certificates):
    """storescu over TLS with a trusted client certificate stores; no certificate, a
    certificate of another CA, and plain DICOM on the TLS port are refused cleanly; a client
    that connects and never speaks does not hold up the next one; the plain port still works."""
    tls_port = free_port()
    server = server_factory(**tls_env(certificates, tls_port,
                                      RADLENS_DICOM__ACSE_TIMEOUT_S="20",
                                      RADLENS_DICOM__MAX_CONNECTIONS_PER_ADDRESS="3")).start()
    wait_for(lambda: port_open(tls_port), 10, "the TLS port")

    sent = tls_storescu(tls_port, [CT], certificates)
    assert sent.returncode == 0, sent.stdout + sent.stderr
    assert server.query("SELECT COUNT(*) FROM instances")[0][0] == 1

    anonymous = storescu(tls_port, [MR], extra=["+tla", "+cf", str(certificates / "ca.crt")])
    assert anonymous.returncode != 0
    foreign = storescu(tls_port, [MR], extra=[
        "+tls", str(certificates / "other" / "client.key"),
        str(certificates / "other" / "client.crt"), "+cf", str(certificates / "ca.crt")])
    assert foreign.returncode != 0
    plain = storescu(tls_port, [MR])
    assert plain.returncode != 0
    assert server.query("SELECT COUNT(*) FROM instances")[0][0] == 1  # none of them stored

    # A client that connects to the TLS port and says nothing: pynetdicom's own server would
    # block its accept loop in this handshake until the timeout (20 s here).
    silent = socket.create_connection(("127.0.0.1", tls_port))
    try:
        started = time.monotonic()
        after = tls_storescu(tls_port, [MR], certificates)
        waited = time.monotonic() - started
        assert after.returncode == 0, after.stdout + after.stderr
        assert waited < 10, f"the silent client held the next association for {waited:.1f} s"
    finally:
        silent.close()
    # Clients stuck in their handshake still count against their address's cap.
    stuck = [socket.create_connection(("127.0.0.1", tls_port), source_address=("127.0.0.2", 0))
             for _ in range(5)]
    try:
        wait_for(lambda: sum(map(closed_by_node, stuck)) == 2, 10, "the excess to be closed")
        assert sum(map(closed_by_node, stuck)) == 2
    finally:
        for connection in stuck:
            connection.close()
    assert storescu(server.port, [TEST_FILES / "JPEG2000.dcm"]).returncode == 0  # plain port

    log = server.log()
    assert "client certificate refused" in log
    assert "not a TLS client" in log and "plain DICOM sent to the TLS port" in log
    assert "Traceback" not in log

    entries = audit_entries(server)
    tls_in = [e for e in entries if e["event"] == "instances-transferred" and e.get("tls")]
    assert [e["instances"] for e in tls_in] == [1, 1]
    assert all(e["peer_ae"] == "STORESCU" and e["direction"] == "in" for e in tls_in)
    accepted = [e for e in entries if e["event"] == "association" and e.get("tls")]
    assert accepted and accepted[0]["tls_version"] in ("TLSv1.2", "TLSv1.3")
    assert "commonName=radlens pilot client" in accepted[0]["client_certificate"]
    alerts = [e["reason"] for e in entries if e["event"] == "security-alert"]
    assert sum("certificate" in reason for reason in alerts) == 2
    assert any("not a TLS client" in reason for reason in alerts)
    assert server.stop() == 0


def test_tls_only_refuses_plain_and_optional_client_certificates(server_factory, certificates):
    """``tls.only``: no plain port. With require_client_certificate off a sender without a
    certificate is served, encrypted, and the node still proves who it is."""
    tls_port = free_port()
    server = server_factory(**tls_env(certificates, tls_port,
                                      RADLENS_DICOM__TLS__ONLY="true",
                                      RADLENS_DICOM__TLS__REQUIRE_CLIENT_CERTIFICATE="false"))
    server.start(wait=False)
    wait_for(lambda: port_open(tls_port) or server._died(), 30, "the TLS port")
    assert not port_open(server.port)
    anonymous = storescu(tls_port, [CT], extra=["+tla", "+cf", str(certificates / "ca.crt")])
    assert anonymous.returncode == 0, anonymous.stdout + anonymous.stderr
    untrusting = storescu(tls_port, [MR], extra=[
        "+tla", "+cf", str(certificates / "other" / "ca.crt")])
    assert untrusting.returncode != 0  # the sender does not trust our certificate
    assert server.query("SELECT COUNT(*) FROM instances")[0][0] == 1
    assert server.stop() == 0


def test_outbox_delivers_over_tls_to_dcmtk(server_factory, certificates, tmp_path):
    """A destination with ``tls: true``: the outbox shows the node's certificate to a dcmtk
    storescp that requires one and checks the storescp's against the CA and its address; a
    destination whose certificate another CA signed is not sent to."""
    archive_port = free_port()
    received = tmp_path / "received"
    received.mkdir()
    archive = subprocess.Popen(
        [require_tool("storescp"), "-aet", "ARCHIVE", "+tls", str(certificates / "server.key"),
         str(certificates / "server.crt"), "+cf", str(certificates / "ca.crt"), "-rc",
         "-od", str(received), str(archive_port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: port_open(archive_port), 20, "storescp +tls")
        destinations = [{"name": "secure", "ae_title": "ARCHIVE", "host": "127.0.0.1",
                         "port": archive_port, "tls": True},
                        {"name": "untrusted", "ae_title": "ARCHIVE", "host": "localhost",
                         "port": archive_port, "tls": True,
                         "tls_ca_certificates": str(certificates / "other" / "ca.crt")}]
        server = server_factory(**tls_env(certificates, free_port()),
                                RADLENS_DESTINATIONS=json.dumps(destinations),
                                RADLENS_OUTBOX__POLL_INTERVAL_S="0.2",
                                RADLENS_OUTBOX__RETRY_INITIAL_S="60").start()
        for name in ("secure", "untrusted"):
            queued = radlens_cli("forward", str(CT), str(MR), "--to", name, env=server.env)
            assert queued.returncode == 0, queued.stderr
        wait_for(lambda: server.query(
            "SELECT COUNT(*) FROM outbox WHERE destination = 'secure' AND state = 'sent'"
        )[0][0] == 2, 30, "delivery over TLS")
        uids = {pydicom.dcmread(path).SOPInstanceUID for path in received.iterdir()}
        assert uids == {pydicom.dcmread(CT).SOPInstanceUID, pydicom.dcmread(MR).SOPInstanceUID}

        wait_for(lambda: server.query(
            "SELECT MIN(attempts) FROM outbox WHERE destination = 'untrusted'")[0][0] >= 1,
            30, "the attempt to a destination we do not trust")
        row = server.query("SELECT * FROM outbox WHERE destination = 'untrusted'")[0]
        assert row["state"] == "pending" and "TLS handshake failed" in row["last_error"]
        assert "CERTIFICATE_VERIFY_FAILED" in server.log()

        out = [e for e in audit_entries(server)
               if e["event"] == "instances-transferred" and e["direction"] == "out"]
        sent = [e for e in out if e["destination"] == "secure" and e["outcome"] == "success"]
        assert sum(e["instances"] for e in sent) == 2 and all(e["tls"] for e in sent)
        assert any(e["destination"] == "untrusted" and e["outcome"] == "serious-failure"
                   for e in out)
        exports = [e for e in audit_entries(server) if e["event"] == "export"]
        assert [e["count"] for e in exports] == [2, 2]
        assert server.stop() == 0
    finally:
        archive.kill()
        archive.wait()


def _hold_association(port: int, calling: str) -> object:
    ae = AE(ae_title=calling)
    ae.add_requested_context("1.2.840.10008.1.1")
    assoc = ae.associate("127.0.0.1", port, ae_title="RADLENS")
    return assoc


def test_peers_bound_to_networks_and_their_own_limits(server_factory):
    peers = [{"ae_title": "CT_OUTSIDE", "addresses": ["10.20.0.0/16", "2001:db8::/32"]},
             {"ae_title": "CT_LOCAL", "addresses": ["127.0.0.0/8"], "max_associations": 1}]
    server = server_factory(RADLENS_DICOM__PEERS=json.dumps(peers),
                            RADLENS_MODEL__ENABLED="false").start()

    refused = storescu(server.port, [CT], calling_aet="CT_OUTSIDE")
    assert refused.returncode != 0
    assert "Calling AE Title Not Recognized" in refused.stdout + refused.stderr

    held = _hold_association(server.port, "CT_LOCAL")
    assert held.is_established
    try:
        over = storescu(server.port, [CT], calling_aet="CT_LOCAL")
        assert over.returncode != 0  # its second association at once
        assert "Local Limit Exceeded" in over.stdout + over.stderr
        other = storescu(server.port, [CT], calling_aet="ANYONE")
        assert other.returncode == 0, other.stdout  # not a listed peer: no binding, no own cap
    finally:
        held.release()
    again = storescu(server.port, [MR], calling_aet="CT_LOCAL")
    assert again.returncode == 0, again.stdout

    reasons = [e["reason"] for e in audit_entries(server)
               if e["event"] == "association" and e["outcome"] != "success"]
    assert reasons == ["calling AE title CT_OUTSIDE may not call from 127.0.0.1",
                       "CT_LOCAL already holds 1 associations (its limit)"]
    log = server.log()
    assert "may not call from 127.0.0.1" in log and "its limit" in log
    assert server.stop() == 0


def test_instance_over_the_size_cap_is_refused_and_nothing_kept(server_factory, tmp_path):
    """dicom.max_instance_mb: a larger instance gets Out of Resources (0xA700) and leaves no
    file in the spool or quarantine; the next one on the same association is stored."""
    big = pydicom.dcmread(CT)
    big.PixelData = bytes(3 * 1024 * 1024)
    big.Rows, big.Columns = 1024, 1536
    big.SOPInstanceUID = big.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    path = tmp_path / "big.dcm"
    big.save_as(path)
    server = server_factory(RADLENS_DICOM__MAX_INSTANCE_MB="1",
                            RADLENS_MODEL__ENABLED="false").start()
    sent = storescu(server.port, [path, MR])
    answers = sent.stdout + sent.stderr
    assert "Received Store Response (Refused: OutOfResources" in answers, answers
    sops = [row[0] for row in server.query("SELECT sop_instance_uid FROM instances")]
    assert sops == [pydicom.dcmread(MR).SOPInstanceUID]
    assert not list((server.data_dir / "quarantine").glob("*"))
    spooled = [p for p in (server.data_dir / "spool").rglob("*") if p.is_file()]
    assert len(spooled) == 1
    assert "larger than dicom.max_instance_mb" in server.log()
    transferred = [e for e in audit_entries(server) if e["event"] == "instances-transferred"]
    assert sum(e["failed"] for e in transferred) == 1
    assert sum(e["instances"] for e in transferred) == 1
    assert server.stop() == 0


def test_audit_trail_file_syslog_and_command(server_factory):
    """Start, associations, instances in, a refusal, stop: in the JSON lines file and at a
    syslog collector (a UDP socket here) as RFC 5424; ``radlens audit`` shows and filters
    them, and its own reading is audited. No patient name anywhere."""
    collector = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    collector.bind(("127.0.0.1", 0))
    collector.settimeout(0.5)
    syslog_port = collector.getsockname()[1]
    server = server_factory(RADLENS_AUDIT__SYSLOG=f"udp://127.0.0.1:{syslog_port}",
                            RADLENS_DICOM__ALLOWED_CALLING_AETS='["STORESCU"]',
                            RADLENS_MODEL__ENABLED="false").start()
    assert storescu(server.port, [CT, MR]).returncode == 0
    assert storescu(server.port, [CT], calling_aet="STRANGER").returncode != 0
    status = radlens_cli("status", env=server.env)
    assert status.returncode == 0, status.stderr
    assert server.stop() == 0

    entries = audit_entries(server)
    events = [e["event"] for e in entries]
    assert events[0] == "application-activity" and events[-1] == "application-activity"
    assert entries[0]["event_type"] == "DCM 110120 Application Start"
    assert entries[-1]["event_type"] == "DCM 110121 Application Stop"
    for entry in entries:
        assert {"time", "event", "outcome", "peer_ae", "peer_address"} <= set(entry)
    studies = {e["study"]: e["instances"] for e in entries
               if e["event"] == "instances-transferred"}
    assert studies == {str(pydicom.dcmread(CT).StudyInstanceUID): 1,
                       str(pydicom.dcmread(MR).StudyInstanceUID): 1}
    refusal = [e for e in entries if e["event"] == "association" and e["outcome"] != "success"]
    assert refusal[0]["peer_ae"] == "STRANGER"
    assert "not in dicom.allowed_calling_aets" in refusal[0]["reason"]
    assert any(e["event"] == "query" and e["command"] == "radlens status" for e in entries)
    text = (server.data_dir / "audit.jsonl").read_text()
    for ds in (pydicom.dcmread(CT), pydicom.dcmread(MR)):
        assert str(ds.PatientName) not in text and str(ds.PatientID) not in text

    messages = []
    try:
        while True:
            messages.append(collector.recv(65536).decode())
    except TimeoutError:
        pass
    collector.close()
    assert len(messages) == len(entries)
    header, body = messages[0].split(" - ", 1)
    assert header.startswith("<85>1 ") and "radlens" in header  # authpriv.notice, version 1
    assert json.loads(body)["event"] == "application-activity"
    assert any(m.startswith("<84>1 ") for m in messages)  # a refusal is a warning

    shown = radlens_cli("audit", "--since", "1h", env={**server.env, "COLUMNS": "250"})
    assert shown.returncode == 0, shown.stderr
    assert "security-alert" in shown.stdout and "STRANGER" in shown.stdout
    only = radlens_cli("audit", "--since", "1h", "--event", "security-alert", "--json",
                       env=server.env)
    alerts = [json.loads(line) for line in only.stdout.splitlines()]
    assert alerts and {a["event"] for a in alerts} == {"security-alert"}
    later = radlens_cli("audit", "--since", "2099-01-01T00:00:00", "--json", env=server.env)
    assert later.returncode == 0 and later.stdout == ""
    assert audit_entries(server)[-1]["event"] == "audit-log-used"
    wrong = radlens_cli("audit", "--since", "yesterday", env=server.env)
    assert wrong.returncode == 1 and "--since takes" in wrong.stderr


def test_sighup_reopens_the_audit_trail_in_every_process(server_factory, archive):
    """logrotate moves audit.jsonl aside and sends SIGHUP to the agent: the agent, its
    listener and its sender write their next entries to a new audit.jsonl, none to the old
    one, and no process of the node stops or restarts."""
    server = server_factory(RADLENS_MODEL__ENABLED="false",
                            RADLENS_OUTBOX__POLL_INTERVAL_S="0.2",
                            RADLENS_DESTINATIONS=json.dumps([{
                                "name": "archive", "ae_title": "ARCHIVE",
                                "host": "127.0.0.1", "port": archive.port}])).start()
    trail = server.data_dir / "audit.jsonl"
    lock = server.data_dir / "radlens.lock"
    wait_for(lambda: json.loads(lock.read_text() or "{}").get("sender_pids"), 30,
             "the sender process")
    # The start's own entry comes after the children: rotate a trail that has begun.
    wait_for(lambda: trail.exists() and "application-activity" in trail.read_text(), 30,
             "the agent's start in the audit trail")
    before = json.loads(lock.read_text())
    rotated = trail.with_name("audit.jsonl.1")
    trail.rename(rotated)
    server.process.send_signal(signal.SIGHUP)
    wait_for(lambda: "audit trail reopened" in server.log(), 20, "the agent to reopen")
    time.sleep(0.5)  # the children read their "reopen" line
    assert storescu(server.port, [TEST_FILES / "CT_small.dcm"]).returncode == 0
    forwarded = radlens_cli("forward", str(TEST_FILES / "MR_small.dcm"), "--to", "archive",
                            env=server.env)
    assert forwarded.returncode == 0, forwarded.stderr
    wait_for(lambda: '"direction":"out"' in (trail.read_text() if trail.exists() else ""), 30,
             "the sender's entry in the new trail")
    new = [json.loads(line) for line in trail.read_text().splitlines()]
    old = rotated.read_text()
    assert any(e["event"] == "instances-transferred" and e.get("direction") == "in"
               for e in new), new  # the listener's
    assert '"direction":"in"' not in old and '"direction":"out"' not in old
    after = json.loads(lock.read_text())
    for kind in ("listener_pids", "worker_pids", "sender_pids"):
        assert after[kind] == before[kind], kind
    assert server.stop() == 0
