"""Bad input gets a clear failure status, its bytes are kept, and the listener keeps serving."""

from __future__ import annotations

import json
import shutil
import subprocess
import uuid
from io import BytesIO
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import FileMetaDataset
from pydicom.filewriter import write_file_meta_info
from pynetdicom import AE, _config

from tests.helpers import TEST_FILES, acknowledged_files, echoscu, storescu

SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"

@pytest.fixture
def server(server_factory):
    """These tests are about the door: the agent loads no model (a model costs each agent
    seconds of CPU, and nothing here is analysed)."""
    return server_factory(RADLENS_MODEL__ENABLED="false").start()


def _part10(body: bytes, sop_uid: str, syntax: str = "1.2.840.10008.1.2.1") -> bytes:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SECONDARY_CAPTURE
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = syntax
    buffer = BytesIO()
    buffer.write(b"\0" * 128 + b"DICM")
    write_file_meta_info(buffer, meta, enforce_standard=True)
    return buffer.getvalue() + body


def _send_raw(port: int, path: Path, syntax: str) -> int:
    """C-STORE the file's bytes as they are (pynetdicom reads no further than the meta): the
    status the listener answered. storescu will not send what it cannot parse."""
    _config.STORE_SEND_CHUNKED_DATASET = True
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(SECONDARY_CAPTURE, syntax)
    assoc = ae.associate("127.0.0.1", port, ae_title="RADLENS")
    assert assoc.is_established
    try:
        return int(assoc.send_c_store(path).Status)
    finally:
        assoc.release()


def _quarantine_reasons(server) -> list[str]:
    return [json.loads(p.read_text())["reason"]
            for p in sorted((server.data_dir / "quarantine").glob("*.json"))]


def test_corrupt_dataset_is_refused_quarantined_and_next_association_served(server, tmp_path):
    body = b"\xff" * 300
    corrupt = tmp_path / "corrupt.dcm"
    corrupt.write_bytes(_part10(body, "1.2.826.0.1.3680043.8.498.1"))
    assert _send_raw(server.port, corrupt, "1.2.840.10008.1.2.1") == 0xC000

    kept = list((server.data_dir / "quarantine").glob("*.dcm"))
    assert len(kept) == 1
    assert kept[0].read_bytes().endswith(body)
    assert "cannot parse" in _quarantine_reasons(server)[0]
    row = server.query("SELECT calling_aet, reason FROM quarantine")[0]
    assert row["calling_aet"] == "MODALITY"
    assert server.query("SELECT COUNT(*) FROM instances")[0][0] == 0
    assert "dataset quarantined" in server.log()

    assert echoscu(server.port).returncode == 0
    good = storescu(server.port, [TEST_FILES / "CT_small.dcm"])
    assert good.returncode == 0
    assert server.query("SELECT COUNT(*) FROM instances")[0][0] == 1


def test_broken_deflate_stream_is_refused_as_unparseable_and_quarantined(server, tmp_path):
    """A deflate data set whose stream is not valid deflate: 0xC000 with the bytes kept, not
    pynetdicom's 0xC211 with a traceback (zlib.error used to escape the parser)."""
    deflate = "1.2.840.10008.1.2.1.99"
    body = b"\x78\x9c" + bytes(range(256)) * 2  # a zlib header, then no valid stream
    broken = tmp_path / "deflate.dcm"
    broken.write_bytes(_part10(body, "1.2.826.0.1.3680043.8.498.2", deflate))
    assert _send_raw(server.port, broken, deflate) == 0xC000
    assert "cannot parse" in _quarantine_reasons(server)[0]
    assert server.query("SELECT COUNT(*) FROM instances")[0][0] == 0
    assert "Traceback" not in server.log()
    assert echoscu(server.port).returncode == 0


@pytest.mark.parametrize("change,expected", [
    (lambda ds: delattr(ds, "StudyInstanceUID"), "lacks StudyInstanceUID"),
    (lambda ds: setattr(ds, "SeriesInstanceUID", "../../../etc"), "malformed SeriesInstanceUID"),
])
def test_dataset_without_usable_uids_is_refused_by_storescu_status(server, tmp_path, change,
                                                                   expected):
    ds = pydicom.dcmread(TEST_FILES / "CT_small.dcm")
    change(ds)
    path = tmp_path / "bad.dcm"
    ds.save_as(path, enforce_file_format=True)
    result = storescu(server.port, [path])
    output = result.stdout + result.stderr
    assert acknowledged_files(output) == []
    assert "Error: CannotUnderstand" in output
    assert expected in _quarantine_reasons(server)[0]
    assert not any((server.data_dir / "spool").rglob("*.dcm"))
    assert not (tmp_path.parent / "etc").exists()
    assert echoscu(server.port).returncode == 0


def test_disk_reserve_answers_out_of_resources(server_factory):
    server = server_factory(RADLENS_STORAGE__MIN_FREE_MB=str(10**9),
                            RADLENS_MODEL__ENABLED="false").start()
    result = storescu(server.port, [TEST_FILES / "CT_small.dcm"])
    output = result.stdout + result.stderr
    assert acknowledged_files(output) == []
    assert "Refused: OutOfResources" in output
    assert server.query("SELECT COUNT(*) FROM instances")[0][0] == 0
    assert "disk nearly full" in server.log()
    assert echoscu(server.port).returncode == 0


@pytest.fixture
def tiny_disk(tmp_path: Path):
    mount_point = tmp_path / f"tiny-{uuid.uuid4().hex[:6]}"
    mount_point.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount_point)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here to fill a real disk ({mounted.stderr.strip()}); "
                    "test_disk_reserve_answers_out_of_resources covers the reserve check")
    yield mount_point
    subprocess.run(["umount", "-l", str(mount_point)], check=False)


def test_full_disk_answers_out_of_resources_and_loses_nothing(server_factory, tiny_disk, tmp_path):
    from radlens.tasks.breast_us.dicom import write_us_studies

    server = server_factory()
    server.data_dir = tiny_disk / "data"
    server.start()
    files = list(write_us_studies(tmp_path / "us", studies=1, instances_per_study=8))
    result = storescu(server.port, files)
    output = result.stdout + result.stderr
    acked = acknowledged_files(output)
    assert 0 < len(acked) < len(files), output
    assert "Refused: OutOfResources" in output
    stored = {r["sop_instance_uid"]: r for r in server.query("SELECT * FROM instances")}
    for path in acked:
        uid = pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID
        assert uid in stored
        spooled = pydicom.dcmread(server.data_dir / stored[uid]["path"])
        assert spooled.PixelData == pydicom.dcmread(path).PixelData
    assert not list(server.data_dir.rglob("*.partial"))
    assert echoscu(server.port).returncode == 0
    # Space comes back: the next store succeeds.
    shutil.rmtree(server.data_dir / "quarantine", ignore_errors=True)
    for extra in server.data_dir.rglob("*.dcm"):
        if extra.name not in {Path(stored[u]["path"]).name for u in stored}:
            extra.unlink()
    small = storescu(server.port, [TEST_FILES / "MR_small.dcm"])
    assert small.returncode == 0
    assert len(acknowledged_files(small.stdout + small.stderr)) == 1
