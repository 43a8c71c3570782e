"""Nothing acknowledged is lost: kill -9 mid-burst, restart, every acknowledged instance is there
and every study is processed exactly once. SIGTERM finishes stores in flight and exits 0."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import pydicom
import pytest

from radlens.tasks.breast_us.dicom import write_us_studies
from tests.helpers import acknowledged_files, port_open, require_tool, wait_for

STUDIES, PER_STUDY = 4, 55  # 220 instances


@pytest.fixture(scope="module")
def burst_files(tmp_path_factory) -> list[Path]:
    folder = tmp_path_factory.mktemp("burst")
    return list(write_us_studies(folder, studies=STUDIES, instances_per_study=PER_STUDY,
                                 rows=256, columns=512))


def _start_storescu(port: int, files: list[Path], log: Path) -> subprocess.Popen:
    args = [require_tool("storescu"), "-v", "-aec", "RADLENS", "127.0.0.1", str(port),
            *map(str, files)]
    handle = open(log, "w")
    return subprocess.Popen(args, stdout=handle, stderr=subprocess.STDOUT,
                            env=dict(os.environ, TCP_NODELAY="1"))


def _indexed(server) -> int:
    try:
        return server.query("SELECT COUNT(*) FROM instances")[0][0]
    except Exception:  # the database may not exist yet
        return 0


def _wait_until_processed(server) -> None:
    """Every pending instance assembled into a job, and every job finished."""
    wait_for(lambda: server.query(
        "SELECT COUNT(*) FROM instances WHERE job_id IS NULL")[0][0] == 0, 60,
        "pending instances to be assembled after restart")
    wait_for(lambda: server.query(
        "SELECT COUNT(*) FROM jobs WHERE state IN ('queued', 'running')")[0][0] == 0, 120,
        "jobs to finish")


@pytest.mark.slow
def test_kill9_mid_burst_loses_no_acknowledged_instance(server_factory, burst_files, tmp_path):
    server = server_factory(RADLENS_ASSEMBLY__QUIET_PERIOD_S="3").start()
    log = tmp_path / "storescu.log"
    sender = _start_storescu(server.port, burst_files, log)
    wait_for(lambda: _indexed(server) >= 60, 120, "60 instances to arrive")
    server.kill9()
    sender.wait(timeout=60)
    acked = acknowledged_files(log.read_text())
    assert 60 <= len(acked) < len(burst_files), "the kill should land mid-burst"

    server.start()
    _wait_until_processed(server)

    rows = {r["sop_instance_uid"]: r for r in server.query("SELECT * FROM instances")}
    for path in acked:
        source = pydicom.dcmread(path)
        assert source.SOPInstanceUID in rows, f"acknowledged {path} was lost"
        spooled = pydicom.dcmread(server.data_dir / rows[source.SOPInstanceUID]["path"])
        assert spooled.PixelData == source.PixelData
    assert not list(server.data_dir.rglob("*.partial"))

    jobs = server.query("SELECT study_instance_uid, COUNT(*) AS n, MIN(state) AS state"
                        " FROM jobs GROUP BY study_instance_uid")
    studies_received = {r["study_instance_uid"] for r in rows.values()}
    assert {j["study_instance_uid"] for j in jobs} == studies_received
    assert all(j["n"] == 1 for j in jobs), [dict(j) for j in jobs]
    assert all(j["state"] == "done" for j in jobs)
    for study in studies_received:
        held = sum(1 for r in rows.values() if r["study_instance_uid"] == study)
        assert len(server.findings(study)["images"]) == held
    assert server.stop() == 0


@pytest.mark.slow
def test_sigterm_finishes_stores_in_flight_and_exits_zero(server_factory, burst_files, tmp_path):
    server = server_factory().start()
    files = burst_files[:80]
    log = tmp_path / "storescu.log"
    sender = _start_storescu(server.port, files, log)
    wait_for(lambda: _indexed(server) >= 10, 60, "the burst to start")
    server.process.send_signal(signal.SIGTERM)
    assert server.process.wait(timeout=60) == 0
    sender.wait(timeout=60)
    output = log.read_text()
    acked = acknowledged_files(output)
    # The association in flight was allowed to finish: every file acknowledged, none refused.
    assert len(acked) == len(files), output[-2000:]
    stored = {r["sop_instance_uid"] for r in server.query("SELECT sop_instance_uid FROM instances")}
    assert {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in acked} <= stored
    assert not port_open(server.port)
    assert "listener stopped" in server.log()
    # A study received just before the stop is assembled after the next start.
    server.start()
    wait_for(lambda: server.jobs_done(), 60, "the study to be processed after restart")


@pytest.mark.slow
def test_kill9_early_in_a_burst_then_the_rest_resent_processes_every_study_once(
        server_factory, burst_files, tmp_path):
    """The sender re-sends what was not acknowledged, as modalities do after a lost
    association: the study in flight at the kill keeps one timer, pushed by every arrival
    (the re-sent duplicates too), and is processed once, whole; the instances that had
    arrived but whose Success was lost are ignored as byte-identical re-sends."""
    server = server_factory(RADLENS_ASSEMBLY__QUIET_PERIOD_S="2",
                            RADLENS_MODEL__ENABLED="false").start()
    log = tmp_path / "storescu.log"
    sender = _start_storescu(server.port, burst_files, log)
    wait_for(lambda: _indexed(server) >= 25, 120, "25 instances to arrive")
    server.kill9()
    sender.wait(timeout=60)
    acked = set(acknowledged_files(log.read_text()))
    rest = [path for path in burst_files if str(path) not in acked]
    assert 25 <= len(acked) < PER_STUDY, "the kill should land early, in the first study"

    server.start()
    resend = _start_storescu(server.port, rest, tmp_path / "resend.log")
    assert resend.wait(timeout=300) == 0
    _wait_until_processed(server)
    jobs = server.query("SELECT study_instance_uid, COUNT(*) AS n FROM jobs "
                        "GROUP BY study_instance_uid")
    assert len(jobs) == STUDIES
    assert all(j["n"] == 1 for j in jobs), [dict(j) for j in jobs]
    assert server.query("SELECT COUNT(*) FROM instances")[0][0] == len(burst_files)
    for job in jobs:
        assert len(server.findings(job["study_instance_uid"])["images"]) == PER_STUDY
    assert server.stop() == 0
