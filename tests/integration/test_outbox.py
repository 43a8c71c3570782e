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
