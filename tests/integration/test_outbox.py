"""The outbox keeps trying a destination that is down, across restarts, and delivers the files
byte for byte once a real storescp comes up."""

from __future__ import annotations

import json
import subprocess

import pydicom
import pytest

from tests.helpers import TEST_FILES, free_port, port_open, radlens_cli, require_tool, wait_for

FILES = ["CT_small.dcm", "examples_ybr_color.dcm", "MR_small_RLE.dcm"]


@pytest.fixture
def storescp_factory(tmp_path):
    started: list[subprocess.Popen] = []

    def start(port: int, folder) -> subprocess.Popen:
        folder.mkdir(parents=True, exist_ok=True)
        process = subprocess.Popen(
            [require_tool("storescp"), "-aet", "ARCHIVE", "+xa", "-od", str(folder), str(port)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        started.append(process)
        wait_for(lambda: port_open(port), 20, "storescp to listen")
        return process

    yield start
    for process in started:
        process.terminate()
        process.wait(timeout=10)


def test_outbox_delivers_after_destination_comes_up(server_factory, storescp_factory, tmp_path):
    archive_port = free_port()
    server = server_factory(
        RADLENS_DESTINATIONS=json.dumps([{"name": "archive", "ae_title": "ARCHIVE",
                                          "host": "127.0.0.1", "port": archive_port}]),
        RADLENS_OUTBOX__POLL_INTERVAL_S="0.2",
        RADLENS_OUTBOX__RETRY_INITIAL_S="0.3",
        RADLENS_OUTBOX__RETRY_MAX_S="1",
    )
    # Queued while no agent runs: the queue lives in SQLite.
    queued = radlens_cli("forward", *[str(TEST_FILES / f) for f in FILES], "--to", "archive",
                         env=server.env)
    assert queued.returncode == 0, queued.stderr
    assert "queued 3 file(s) for archive" in queued.stdout

    server.start()
    wait_for(lambda: server.query("SELECT MIN(attempts) FROM outbox")[0][0] >= 2, 30,
             "the first delivery attempts to fail")
    rows = server.query("SELECT * FROM outbox")
    assert {r["state"] for r in rows} == {"pending"}
    assert all("cannot connect" in r["last_error"] for r in rows)
    assert "destination unreachable, will retry" in server.log()
    assert server.stop() == 0  # the queue survives a restart

    received = tmp_path / "archive"
    storescp_factory(archive_port, received)
    server.start()
    wait_for(lambda: server.query("SELECT COUNT(*) FROM outbox WHERE state = 'sent'")[0][0] == 3,
             30, "delivery once the destination is up")

    delivered = {ds.SOPInstanceUID: ds for ds in map(pydicom.dcmread, received.iterdir())}
    for name in FILES:
        source = pydicom.dcmread(TEST_FILES / name)
        copy = delivered[source.SOPInstanceUID]
        assert copy.file_meta.TransferSyntaxUID == source.file_meta.TransferSyntaxUID
        assert copy.PixelData == source.PixelData
    assert all(r["last_status"] == 0 for r in server.query("SELECT * FROM outbox"))

    status = radlens_cli("status", "--json", env=server.env)
    assert status.returncode == 0, status.stderr
    report = json.loads(status.stdout)
    assert report["outbox"]["archive"] == {"pending": 0, "sent": 3, "failed": 0}
    assert report["agent"]["running"] is True


def test_forward_to_unknown_destination_is_a_usage_error(tmp_path):
    result = radlens_cli("forward", str(TEST_FILES / "CT_small.dcm"), "--to", "nowhere",
                         env={"RADLENS_STORAGE__DATA_DIR": str(tmp_path / "data")})
    assert result.returncode == 2
    assert "unknown destination 'nowhere'" in result.stderr


def test_forward_refuses_a_file_that_is_not_dicom(tmp_path):
    junk = tmp_path / "notes.txt"
    junk.write_text("not an image")
    result = radlens_cli(
        "forward", str(junk), "--to", "archive",
        env={"RADLENS_STORAGE__DATA_DIR": str(tmp_path / "data"),
             "RADLENS_DESTINATIONS": '[{"name":"archive","ae_title":"A","host":"127.0.0.1",'
                                     '"port":104}]'})
    assert result.returncode == 1
    assert "not a DICOM file radlens can send" in result.stderr


CT_ONLY = """\
[[TransferSyntaxes]]
[Uncompressed]
TransferSyntax1 = LocalEndianExplicit
TransferSyntax2 = OppositeEndianExplicit
TransferSyntax3 = LittleEndianImplicit

[[PresentationContexts]]
[CTOnly]
PresentationContext1 = CTImageStorage\\Uncompressed

[[Profiles]]
[CTOnly]
PresentationContexts = CTOnly
"""


def test_a_refusal_fails_at_once_an_outage_gives_up_and_an_operator_can_retry_or_drop(
        server_factory, tmp_path):
    """A destination that takes CT images only (dcmtk storescp with an association profile):
    the MR it refuses fails at once with the reason, never retried, while the CT arrives. A
    destination that is down is given up after outbox.max_age_h. ``radlens outbox retry``
    sends a failed delivery again; ``drop`` gives a waiting one up; both are audited."""
    ct_port, down = free_port(), free_port()
    profile = tmp_path / "ct-only.cfg"
    profile.write_text(CT_ONLY)
    received = tmp_path / "ct-archive"
    received.mkdir()
    archive = subprocess.Popen([require_tool("storescp"), "-aet", "CTARCHIVE", "-xf",
                                str(profile), "CTOnly", "-od", str(received), str(ct_port)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: port_open(ct_port), 20, "storescp to listen")
        server = server_factory(
            RADLENS_MODEL__ENABLED="false",
            RADLENS_DESTINATIONS=json.dumps([
                {"name": "ct", "ae_title": "CTARCHIVE", "host": "127.0.0.1", "port": ct_port},
                {"name": "down", "ae_title": "DOWN", "host": "127.0.0.1", "port": down}]),
            RADLENS_OUTBOX__POLL_INTERVAL_S="0.2", RADLENS_OUTBOX__RETRY_INITIAL_S="0.3",
            RADLENS_OUTBOX__RETRY_MAX_S="0.5", RADLENS_OUTBOX__MAX_AGE_H="0.001").start()
        files = [str(TEST_FILES / "CT_small.dcm"), str(TEST_FILES / "MR_small.dcm")]
        for name in ("ct", "down"):
            assert radlens_cli("forward", *files, "--to", name, env=server.env).returncode == 0

        def settled(destination: str) -> list:
            rows = server.query("SELECT * FROM outbox WHERE destination = ? ORDER BY id",
                                (destination,))
            return rows if all(r["state"] != "pending" for r in rows) else []

        ct, mr = wait_for(lambda: settled("ct"), 30, "the CT archive's deliveries to settle")
        assert ct["state"] == "sent" and len(list(received.iterdir())) == 1
        assert mr["state"] == "failed" and mr["attempts"] == 1
        assert "refused by the destination" in mr["last_error"]
        assert "No presentation context" in mr["last_error"]  # in a batch with the CT
        assert "not retried" in server.log()

        # The destination that is down: retried with back-off, then given up after 3.6 s.
        gave_up = wait_for(lambda: settled("down"), 30, "the outage to be given up")
        assert all("gave up after" in r["last_error"] and r["attempts"] >= 2 for r in gave_up)

        listed = radlens_cli("outbox", "list", env=server.env)
        assert listed.returncode == 0 and str(mr["id"]) in listed.stdout
        retried = radlens_cli("outbox", "retry", str(mr["id"]), env=server.env)
        assert retried.returncode == 0, retried.stderr
        wait_for(lambda: server.query("SELECT state, attempts FROM outbox WHERE id = ?",
                                      (mr["id"],))[0]["state"] == "failed", 30,
                 "the retried delivery to be refused again")
        again = server.query("SELECT * FROM outbox WHERE id = ?", (mr["id"],))[0]
        # Alone, the MR's association carries no context the archive accepts.
        assert again["attempts"] == 1 and "accepts none of the presentation contexts" in \
            again["last_error"], dict(again)

        sent = radlens_cli("outbox", "drop", str(ct["id"]), env=server.env)
        assert sent.returncode == 1 and "was sent already" in sent.stderr
        missing = radlens_cli("outbox", "retry", "99999", env=server.env)
        assert missing.returncode == 1 and "no delivery 99999" in missing.stderr
        audit = (server.data_dir / "audit.jsonl").read_text()
        assert f"radlens outbox retry {mr['id']}" in audit
        assert server.stop() == 0
    finally:
        archive.terminate()
        archive.wait(timeout=10)
