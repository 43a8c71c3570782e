"""One study must never take the node down: jobs run in worker processes under a memory and a
time limit; a worker that is killed or passes a limit costs that attempt only, while the
listener keeps answering; and studies nested without bound are read within bounds."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from radlens.demo.fuzz import DatasetCase, base_dataset, with_nested_error, write_case_file
from radlens.tasks.breast_us.dicom import us_dataset
from radlens.tasks.breast_us.phantoms import make_phantom
from tests.fake_ollama import FakeOllama
from tests.helpers import (
    echoscu,
    free_port,
    radlens_cli,
    require_tool,
    scrape,
    storescu,
    wait_for,
)


def _phantom_study(folder: Path, seed: int) -> tuple[str, Path]:
    study = generate_uid()
    ds = us_dataset(make_phantom(seed, 3).image, study_uid=study, series_uid=generate_uid(),
                    instance_number=1, spacing_cm=0.02, patient_id=f"ISO-{seed}")
    path = folder / f"study-{seed}.dcm"
    folder.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return study, path


def _lock(server) -> dict:
    return json.loads((server.data_dir / "radlens.lock").read_text() or "{}")


def _status(server) -> dict:
    result = radlens_cli("status", "--json", env={
        "RADLENS_STORAGE__DATA_DIR": str(server.data_dir)})
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@pytest.fixture
def slow_llm():
    """An Ollama stand-in that takes 4 s to answer: a job waits in its worker process."""
    fake = FakeOllama(delay_s=4.0).start()
    yield fake
    fake.stop()


def test_a_killed_worker_costs_one_attempt_and_the_listener_keeps_serving(
        server_factory, tmp_path, slow_llm):
    server = server_factory(RADLENS_WORKER__CONCURRENCY="1", RADLENS_LLM__PROVIDER="ollama",
                            RADLENS_LLM__HOST=slow_llm.host,
                            RADLENS_LLM__TIMEOUT_S="8").start()
    wait_for(lambda: _lock(server).get("worker_pids"), 60, "the worker process")
    (worker,) = _lock(server)["worker_pids"]
    assert worker != server.process.pid
    first, first_path = _phantom_study(tmp_path / "in", 1)
    assert storescu(server.port, [first_path]).returncode == 0
    wait_for(lambda: slow_llm.requests, 60, "the job to reach its narrative")
    os.kill(worker, signal.SIGKILL)

    started = time.monotonic()
    assert echoscu(server.port).returncode == 0  # the listener did not notice
    assert time.monotonic() - started < 5
    second, second_path = _phantom_study(tmp_path / "in", 2)
    assert storescu(server.port, [second_path]).returncode == 0

    wait_for(lambda: len(server.jobs_done()) >= 2, 180, "both studies to be processed")
    jobs = {r["study_instance_uid"]: r for r in server.jobs_done()}
    assert jobs[first]["state"] == "done" and jobs[first]["attempts"] == 2
    assert jobs[second]["state"] == "done"
    assert "killed by signal 9 (SIGKILL)" in server.log()
    status = _status(server)
    assert status["agent"]["worker_restarts"] == 1
    (restarted,) = status["agent"]["worker_pids"]
    assert restarted != worker
    assert server.stop() == 0  # SIGTERM stops the worker process too
    assert _gone(restarted)


def _gone(pid: int) -> bool:
    try:
        return "zombie" in Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return True


def test_worker_processes_do_not_outlive_a_killed_agent(server_factory):
    """kill -9 of the agent: its worker processes stop within seconds, so a restarted agent
    never shares a study with an orphan still writing it."""
    server = server_factory(RADLENS_WORKER__CONCURRENCY="2").start()
    wait_for(lambda: len(_lock(server).get("worker_pids", [])) == 2, 60, "two workers")
    workers = _lock(server)["worker_pids"]
    server.kill9()
    wait_for(lambda: all(_gone(pid) for pid in workers), 10, "the worker processes to stop")


def _children(server) -> dict[str, list[int]]:
    lock = _lock(server)
    return {kind: list(lock.get(f"{kind}_pids", [])) for kind in ("listener", "worker", "sender")}


def test_the_node_supervises_its_listener_worker_and_sender_processes(server_factory, archive,
                                                                     tmp_path):
    """--role all: the port is served, jobs run and results are sent by processes of their
    own; one killed is started again while the rest goes on; SIGTERM stops them in the order
    data flows (listeners, then workers, then the sender)."""
    server = server_factory(RADLENS_DESTINATIONS=json.dumps([{
                                "name": "archive", "ae_title": "ARCHIVE",
                                "host": "127.0.0.1", "port": archive.port}]),
                            RADLENS_OUTBOX__POLL_INTERVAL_S="30").start()
    wait_for(lambda: all(_children(server).values()), 60, "the listener, worker and sender")
    children = _children(server)
    pids = [pid for group in children.values() for pid in group]
    assert len(set(pids)) == 3 and server.process.pid not in pids, children

    # A killed listener: the agent starts another on the same port; the others go on.
    os.kill(children["listener"][0], signal.SIGKILL)
    wait_for(lambda: "listener process died" in server.log(), 30, "the death to be noticed")
    wait_for(lambda: echoscu(server.port).returncode == 0, 30, "C-ECHO to be answered again")
    wait_for(lambda: _children(server)["listener"] not in ([], children["listener"]), 30,
             "the new listener in the status")
    (listener,) = _children(server)["listener"]
    assert listener != children["listener"][0]
    assert _children(server)["worker"] == children["worker"]

    # A killed sender: another one delivers what the worker queued (woken at once, long
    # before its 30 s poll).
    os.kill(children["sender"][0], signal.SIGKILL)
    wait_for(lambda: _children(server)["sender"] not in ([], children["sender"]), 30,
             "the sender to be restarted")
    (sender,) = _children(server)["sender"]
    _, path = _phantom_study(tmp_path / "in", 5)
    assert storescu(server.port, [path]).returncode == 0
    wait_for(lambda: server.jobs_done(), 60, "the study to be processed")
    wait_for(lambda: server.query("SELECT COUNT(*) FROM outbox WHERE state = 'sent'")[0][0]
             == server.query("SELECT COUNT(*) FROM outbox")[0][0] > 0, 20,
             "the results to be delivered")
    assert list(archive.folder.rglob("*")), "nothing reached the destination"
    status = _status(server)["agent"]
    assert status["listener_restarts"] == 1 and status["sender_restarts"] == 1, status
    shown = radlens_cli("status", env={"RADLENS_STORAGE__DATA_DIR": str(server.data_dir)})
    assert f"sender processes: 1 (pids {sender}; restarted 1 times)" in shown.stdout

    # SIGTERM to every process of the node at once, as a service manager sends it to the
    # node's control group: only the agent acts on it, and stops the others in order.
    everyone = (listener, sender, *children["worker"])
    for pid in everyone:
        os.kill(pid, signal.SIGTERM)
    assert server.stop() == 0
    for pid in everyone:
        assert _gone(pid), pid
    log = server.log()
    stopping = log.index("stopping")
    order = [log.rindex("listener stopped"), log.rindex("worker processes stopped"),
             log.rindex("sender stopped"), log.rindex("radlens agent stopped")]
    assert stopping < order[0] and order == sorted(order), order
    assert "died; starting it again" not in log[stopping:]
    assert "worker process lost" not in log


def _failed_for_good(server, study: str, reason: str) -> None:
    wait_for(lambda: server.jobs_done(), 180, "the job to fail for good")
    (job,) = server.jobs_done()
    assert job["state"] == "failed" and reason in job["error"], dict(job)
    status = radlens_cli("status", env={"RADLENS_STORAGE__DATA_DIR": str(server.data_dir)})
    assert reason in " ".join(status.stdout.split()), status.stdout
    assert reason in server.findings(study)["failure"]
    (sr_path,) = (server.data_dir / "results" / study).glob("dicom/revision-1/SR_*.dcm")
    dump = subprocess.run([require_tool("dsrdump"), "-Ec", "+U8", "+Pl", str(sr_path)],
                          capture_output=True, text=True, timeout=60).stdout
    assert "Analysis failed" in dump and reason in " ".join(dump.split()), dump
    assert echoscu(server.port).returncode == 0
    assert server.stop() == 0


def test_a_worker_past_its_memory_limit_fails_the_job_with_the_reason(server_factory,
                                                                      tmp_path):
    """256 MB is less than a worker holding torch and the model needs: each attempt is killed
    at the limit, the job fails for good with the reason in status, findings and SR."""
    metrics = free_port()
    server = server_factory(RADLENS_WORKER__CONCURRENCY="1", RADLENS_JOBS__MAX_ATTEMPTS="2",
                            RADLENS_WORKER__MAX_MEMORY_MB="256",
                            RADLENS_METRICS__PORT=str(metrics)).start()
    study, path = _phantom_study(tmp_path / "in", 3)
    assert storescu(server.port, [path]).returncode == 0
    wait_for(lambda: server.jobs_done(), 180, "the job to fail for good")
    assert scrape(metrics)[("radlens_worker_processes_lost_total", (("cause", "memory"),))] == 2
    _failed_for_good(server, study, "exceeded 256 MB")
    assert server.log().count("worker process lost") == 2


def test_a_job_past_its_time_limit_fails_with_the_reason(server_factory, tmp_path, slow_llm):
    server = server_factory(RADLENS_WORKER__CONCURRENCY="1", RADLENS_JOBS__MAX_ATTEMPTS="1",
                            RADLENS_WORKER__JOB_TIMEOUT_S="3", RADLENS_LLM__PROVIDER="ollama",
                            RADLENS_LLM__HOST=slow_llm.host, RADLENS_LLM__TIMEOUT_S="20").start()
    study, path = _phantom_study(tmp_path / "in", 4)
    assert storescu(server.port, [path]).returncode == 0
    _failed_for_good(server, study, "the job exceeded 3 s")


def _nested_instance(folder: Path, depth: int) -> tuple[str, Path]:
    study = generate_uid()
    ds = base_dataset(study, depth)
    case = DatasetCase(f"nested-{depth}", "nested_error", str(ds.SOPInstanceUID),
                       ExplicitVRLittleEndian, with_nested_error(ds, depth))
    folder.mkdir(parents=True, exist_ok=True)
    return study, write_case_file(case, folder)


DEPTHS = (10, 100, 400, 1000)


def test_deeply_nested_studies_through_the_listener_are_done_and_memory_stays_flat(
        server_factory, tmp_path):
    """A Content Sequence nested 10 to 1,000 deep with a value pydicom cannot convert at the
    bottom (20 deep used to take every byte of the machine): each study is done within
    seconds and the worker's memory stays where it was."""
    server = server_factory(RADLENS_WORKER__CONCURRENCY="1").start()
    wait_for(lambda: _lock(server).get("worker_pids"), 60, "the worker process")
    (worker,) = _lock(server)["worker_pids"]
    studies = {}
    for depth in DEPTHS:
        study, path = _nested_instance(tmp_path / "in", depth)
        studies[study] = depth
        assert storescu(server.port, [path]).returncode == 0
    wait_for(lambda: len(server.jobs_done()) == len(DEPTHS), 120, "every nested study")
    states = {r["study_instance_uid"]: (r["state"], r["attempts"]) for r in server.jobs_done()}
    assert set(states.values()) == {("done", 1)}, states
    for study in studies:
        assert server.findings(study)["images"], study  # the image itself was read
    assert _lock(server)["worker_pids"] == [worker]  # no worker was lost
    peak_mb = int(next(line.split()[1] for line in Path(f"/proc/{worker}/status").read_text()
                       .splitlines() if line.startswith("VmHWM:"))) / 1024
    assert peak_mb < 1500, f"worker peak {peak_mb:.0f} MB"
    assert "source elements removed before reading" in server.log()
    assert server.stop() == 0


def test_deeply_nested_files_through_radlens_process(tmp_path):
    folder = tmp_path / "in"
    studies = [_nested_instance(folder, depth)[0] for depth in DEPTHS]
    result = radlens_cli("process", str(folder), "--out", str(tmp_path / "out"), "--json",
                         timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout)
    assert summary["exit_status"] == 0 and summary["unreadable"] == []
    assert {s["study_instance_uid"] for s in summary["studies"]} == set(studies)
    assert {s["outcome"] for s in summary["studies"]} == {"done"}
    for study in summary["studies"]:
        (sr,) = study["outputs"]["sr"]
        assert pydicom.dcmread(sr).StudyInstanceUID == study["study_instance_uid"]


def test_isolation_thread_runs_the_whole_node_in_one_process(server_factory, archive,
                                                             tmp_path):
    """worker.isolation: thread (debugging): no child processes; the study is still
    processed."""
    server = server_factory(RADLENS_WORKER__ISOLATION="thread", RADLENS_MODEL__ENABLED="false",
                            RADLENS_DESTINATIONS=json.dumps([{
                                "name": "archive", "ae_title": "ARCHIVE",
                                "host": "127.0.0.1", "port": archive.port}])).start()
    wait_for(lambda: _lock(server).get("pid"), 30, "the lock details")
    assert _children(server) == {"listener": [], "worker": [], "sender": []}
    assert not Path(f"/proc/{server.process.pid}/task/{server.process.pid}/children"
                    ).read_text().split()
    _, path = _phantom_study(tmp_path / "in", 6)
    assert storescu(server.port, [path]).returncode == 0
    wait_for(lambda: server.jobs_done(), 60, "the study to be processed")
    assert server.jobs_done()[0]["state"] == "done"
    assert server.stop() == 0
