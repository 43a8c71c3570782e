"""Retention on a real disk that fills: a node whose data folder is a 24 MB tmpfs refuses
C-STOREs with 0xA700 once it is nearly full, holds its jobs queued (saying why) rather than
failing them, and receives and works again after the retention sweep, with nothing still
needed lost. And the scheduled sweep, on its own, removes what age allows and keeps every
output a destination has not taken yet."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid

from radlens.tasks.breast_us.dicom import us_dataset
from tests.helpers import (
    acknowledged_files,
    free_port,
    radlens_cli,
    storescu,
    wait_for,
)


def _study(folder: Path, count: int, side: int = 1024) -> list[Path]:
    """``count`` single-frame images of ``side``² bytes each (1 MB at 1024), one study."""
    study, series = generate_uid(), generate_uid()
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(len(list(folder.iterdir())))
    paths = []
    for number in range(count):
        ds = us_dataset(rng.integers(0, 255, (side, side), dtype=np.uint8), study_uid=study,
                        series_uid=series, instance_number=number + 1, spacing_cm=0.02,
                        patient_id="RETENTION")
        path = folder / f"{study}-{number}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


@pytest.fixture
def small_disk(tmp_path: Path):
    """A 24 MB tmpfs where the first server's data folder goes (``server_factory`` names it
    data0)."""
    mount_point = tmp_path / "data0"
    mount_point.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs",
                              str(mount_point)], capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {mounted.stderr.strip()}")
    yield mount_point
    subprocess.run(["umount", "-l", str(mount_point)], check=False)


def _status(server) -> str:
    result = radlens_cli("status", env={"RADLENS_STORAGE__DATA_DIR": str(server.data_dir)})
    assert result.returncode == 0, result.stderr
    return " ".join(result.stdout.split())


def test_a_full_disk_refuses_then_receives_again_after_the_sweep(server_factory, small_disk,
                                                                 tmp_path):
    server = server_factory(RADLENS_MODEL__ENABLED="false", RADLENS_STORAGE__FSYNC="false",
                            RADLENS_STORAGE__MIN_FREE_MB="4", RADLENS_WORKER__MIN_FREE_MB="6",
                            RADLENS_RETENTION__KEEP_FREE_MB="0",
                            RADLENS_RETENTION__CHECK_INTERVAL_S="3600",
                            RADLENS_ASSEMBLY__QUIET_PERIOD_S="1").start()
    assert server.data_dir == small_disk
    old = _study(tmp_path / "old", 8)
    assert storescu(server.port, old).returncode == 0
    wait_for(lambda: len(server.jobs_done()) == 1, 60, "the first study to be processed")

    # The next study fills the disk: what fits is stored, the rest refused with 0xA700.
    new = _study(tmp_path / "new", 16)
    sent = storescu(server.port, new)
    acked = acknowledged_files(sent.stdout + sent.stderr)
    assert 4 <= len(acked) < len(new), sent.stderr[-2000:]
    assert "Refused: OutOfResources" in sent.stderr, sent.stderr[-2000:]  # 0xA700
    # Its job waits, queued, and status says why; nothing failed.
    wait_for(lambda: "jobs wait" in _status(server), 30, "status to say jobs wait")
    assert "worker.min_free_mb" in _status(server)
    assert "next retention sweep" in _status(server)
    assert not [r for r in server.query("SELECT state FROM jobs") if r["state"] == "failed"]

    # The sweep (as the node runs it when the disk budget is short) removes the finished
    # study only; the study in assembly or waiting for its job keeps everything.
    sweep = radlens_cli("retention", "--sweep", env={
        "RADLENS_STORAGE__DATA_DIR": str(server.data_dir),
        "RADLENS_RETENTION__KEEP_FREE_MB": "12"})
    assert sweep.returncode == 0, sweep.stderr
    assert "removed" in sweep.stdout
    old_study = pydicom.dcmread(old[0], stop_before_pixels=True).StudyInstanceUID
    new_study = pydicom.dcmread(new[0], stop_before_pixels=True).StudyInstanceUID
    held = {r["study_instance_uid"] for r in server.query(
        "SELECT DISTINCT study_instance_uid FROM instances")}
    assert held == {new_study}
    assert not (server.data_dir / "spool" / old_study).exists()
    assert (server.data_dir / "spool" / new_study).is_dir()

    # The node receives again: the refused instances are taken; every acknowledged one is held.
    again = storescu(server.port, [p for p in new if str(p) not in acked])
    assert again.returncode == 0 and "Refused" not in again.stderr, again.stderr[-2000:]
    wait_for(lambda: not [r for r in server.query("SELECT state FROM jobs")
                          if r["state"] in ("queued", "running")]
             and not server.query("SELECT 1 FROM instances WHERE job_id IS NULL"), 90,
             "the new study's jobs to run")
    uids = {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in new}
    assert {r["sop_instance_uid"] for r in server.query(
        "SELECT sop_instance_uid FROM instances")} == uids
    assert {r["state"] for r in server.query("SELECT state FROM jobs")} == {"done"}
    assert "jobs wait" not in _status(server)
    audit = (server.data_dir / "audit.jsonl").read_text()
    assert "instances-deleted" in audit and old_study in audit
    assert server.stop() == 0


def test_the_scheduled_sweep_keeps_what_a_destination_has_not_taken(server_factory, tmp_path):
    down = free_port()  # nothing listens: every output stays undelivered
    server = server_factory(RADLENS_MODEL__ENABLED="true", RADLENS_RETENTION__SPOOL_DAYS="0",
                            RADLENS_RETENTION__RESULTS_DAYS="0",
                            RADLENS_RETENTION__INTERVAL_S="2",
                            RADLENS_DESTINATIONS=json.dumps([{
                                "name": "pacs", "ae_title": "PACS", "host": "127.0.0.1",
                                "port": down}])).start()
    files = _study(tmp_path / "in", 2, side=128)
    assert storescu(server.port, files).returncode == 0
    wait_for(lambda: server.jobs_done(), 120, "the study to be processed")
    # The received instances go at the next sweep; the results wait for the destination.
    wait_for(lambda: not server.query("SELECT 1 FROM instances"), 30,
             "the sweep to remove the received instances")
    # The sweep logs its summary once it has gone through every study (after the rows
    # above went), so the line may come a moment after the query sees them gone; the spool
    # is read only then, since the sweep removes the emptied study folders as it goes.
    wait_for(lambda: "retention sweep" in server.log(), 30, "the sweep's summary in the log")
    assert not list((server.data_dir / "spool").rglob("*.dcm"))
    pending = server.query("SELECT path FROM outbox WHERE state = 'pending'")
    assert pending and all(Path(r["path"]).is_file() for r in pending)
    assert server.stop() == 0
