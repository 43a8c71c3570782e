"""The state in a real PostgreSQL (a throw-away cluster on loopback): the same schema and
migrations as SQLite, the spool, queue, outbox and analyses on it, and the agent end to end,
through a PostgreSQL restart."""

from __future__ import annotations

import json
import threading
import uuid
from pathlib import Path

import numpy as np
import pydicom
import pytest
import sqlalchemy as sa

from radlens.db import Database, alembic_config, metadata, state_url
from tests.helpers import (
    TEST_FILES,
    free_port,
    healthz,
    radlens_cli,
    scrape,
    storescu,
    wait_for,
)


@pytest.fixture
def database_url(postgres) -> str:
    return state_url(postgres.create_database(f"t{uuid.uuid4().hex[:12]}"), Path("."))


def test_nodes_starting_together_migrate_postgresql_once_to_the_code_s_schema(database_url):
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext
    from alembic.script import ScriptDirectory

    opened: list[Database] = []
    errors: list[BaseException] = []

    def open_one() -> None:
        try:
            opened.append(Database(database_url))
        except BaseException as exc:  # noqa: BLE001 (reported below)
            errors.append(exc)

    threads = [threading.Thread(target=open_one) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == [] and len(opened) == 4
    db = opened[0]
    assert db.dialect == "postgresql"
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    with db.read() as conn:
        assert MigrationContext.configure(conn).get_current_revision() == head
        assert compare_metadata(MigrationContext.configure(conn), metadata) == []
    assert db.scalar("SELECT COUNT(*) FROM alembic_version") == 1


def test_spool_queue_outbox_and_analyses_keep_their_rules_on_postgresql(database_url, tmp_path):
    from radlens.agent.analyses import FrameRecord, LesionRecord, load_frames, load_lesions
    from radlens.agent.analyses import record as record_analyses
    from radlens.agent.outbox import Outbox
    from radlens.agent.queue import JobQueue
    from radlens.config import Destination, OutboxSettings
    from radlens.dicom_io.spool import Spool

    db = Database(database_url)
    spool = Spool(tmp_path, db, fsync=True)
    encoded = (TEST_FILES / "CT_small.dcm").read_bytes()
    first = spool.store(encoded, calling_aet="CT01", transfer_syntax_uid="1.2.840.10008.1.2.1")
    again = spool.store(encoded, calling_aet="CT01", transfer_syntax_uid="1.2.840.10008.1.2.1")
    assert not first.duplicate and again.duplicate
    assert db.scalar("SELECT COUNT(*) FROM instances") == 1
    with db.transaction() as conn:  # what a lost commit looks like; the file is the record
        conn.execute(sa.text("DELETE FROM instances"))
    assert spool.reconcile() == 1

    queue = JobQueue(db, tmp_path)
    study = first.uids.study_instance_uid
    job_id = queue.create_job_for_pending(study)
    assert job_id is not None and queue.create_job_for_pending(study) is None
    job = queue.claim_next()
    assert job is not None and (job.id, job.attempts) == (job_id, 1)
    assert queue.claim_next() is None
    assert [i.sop_instance_uid for i in queue.instances(job)] == [first.uids.sop_instance_uid]
    assert queue.revision(job) == 1

    latent = np.arange(4, dtype=np.float32)
    record_analyses(db, job.id, study, [FrameRecord(
        first.uids.sop_instance_uid, 0, "benign", (0.1, 0.8, 0.1), latent,
        [LesionRecord(1, "benign", 0.8, latent * 2, {"area_mm2": 12.5})])])
    queue.finish(job.id)
    frames, lesions = load_frames(database_url), load_lesions(database_url)
    assert np.array_equal(frames[0]["latent"], latent)
    assert frames[0]["largest_lesion"] == {"area_mm2": 12.5}
    assert np.array_equal(lesions[0]["latent"], latent * 2)

    down = Destination(name="archive", ae_title="ARCHIVE", host="127.0.0.1", port=free_port())
    outbox = Outbox(db, OutboxSettings(max_attempts=2, retry_initial_s=0.01), [down],
                    calling_aet="RADLENS", timeout_s=2)
    (row_id,) = outbox.enqueue([first.path], "archive", job_id=job.id)
    outbox.deliver_due()
    outbox.deliver_due(now=1e12)
    row = db.rows("SELECT state, attempts, last_error FROM outbox WHERE id = :id",
                  {"id": row_id})[0]
    assert (row["state"], row["attempts"]) == ("failed", 2)
    assert "cannot connect" in row["last_error"]


def test_the_agent_runs_on_postgresql_through_a_server_stop(postgres, database_url,
                                                             server_factory, archive, tmp_path):
    metrics_port = free_port()
    server = server_factory(
        RADLENS_STATE__URL=database_url, RADLENS_METRICS__PORT=str(metrics_port),
        RADLENS_DESTINATIONS=json.dumps([{"name": "archive", "ae_title": "ARCHIVE",
                                          "host": "127.0.0.1", "port": archive.port}]),
        RADLENS_OUTBOX__POLL_INTERVAL_S="0.2").start()
    state = Database(database_url)
    made = radlens_cli("phantoms", "--out", str(tmp_path / "ph"), "--n", "2", "--seed",
                       "7", "--dicom")
    assert made.returncode == 0, made.stderr
    files = sorted((tmp_path / "ph" / "dicom").glob("*/IM0001.dcm"))

    def done() -> int:
        return state.scalar("SELECT COUNT(*) FROM jobs WHERE state = 'done'")

    assert storescu(server.port, files[:1]).returncode == 0
    wait_for(lambda: done() == 1, 120, "the first study to be processed")
    postgres.stop()  # the node says so, then reconnects; nothing is lost
    status, body = healthz(metrics_port)
    assert status == 503 and body["checks"]["state"] is False
    assert scrape(metrics_port)[("radlens_state_up", ())] == 0
    postgres.start()
    wait_for(lambda: healthz(metrics_port)[0] == 200, 30, "the node to be healthy again")
    sent = storescu(server.port, files[1:])
    assert sent.returncode == 0, sent.stderr + server.log()[-3000:]
    wait_for(lambda: done() == 2, 120, "the second study, after the restart")
    wait_for(lambda: state.scalar("SELECT COUNT(*) FROM outbox WHERE state != 'sent'") == 0
             and state.scalar("SELECT COUNT(*) FROM outbox") > 0, 60,
             "every output to reach the archive")
    assert not (server.data_dir / "radlens.sqlite").exists()  # the state is in PostgreSQL
    assert state.scalar("SELECT COUNT(*) FROM instances") == 2
    assert state.scalar("SELECT COUNT(*) FROM frame_analyses") == 2
    studies = {str(pydicom.dcmread(f, stop_before_pixels=True).StudyInstanceUID)
               for f in files}
    arrived = {str(pydicom.dcmread(f, stop_before_pixels=True).StudyInstanceUID)
               for f in archive.files()}
    assert arrived == studies  # SR, SEG and the rest of both studies, in the archive
    sent_rows = state.scalar("SELECT COUNT(*) FROM outbox")
    assert len(archive.files()) == sent_rows  # each once

    status = radlens_cli("status", "--json", env=server.env)
    assert status.returncode == 0, status.stderr
    report = json.loads(status.stdout)
    assert report["jobs"]["done"] == 2 and report["instances"] == 2
    assert report["outbox"]["archive"]["sent"] == sent_rows
    assert [n["role"] for n in report["nodes"] if n["alive"]] == ["all"]
    assert server.stop() == 0


def _add_instances(db: Database, study: str, count: int, received_at: float) -> None:
    from radlens.db import instances

    with db.transaction() as conn:
        conn.execute(sa.insert(instances), [
            {"sop_instance_uid": f"{study}.{n}", "sop_class_uid": "1.2",
             "study_instance_uid": study, "series_instance_uid": f"{study}.0",
             "transfer_syntax_uid": "1.2.840.10008.1.2.1", "calling_aet": "T",
             "path": f"p/{study}/{n}", "size_bytes": 1, "received_at": received_at}
            for n in range(count)])


def _race(count: int, target) -> None:
    """Run ``target(i)`` on ``count`` threads released at once; re-raise the first error."""
    barrier = threading.Barrier(count)
    errors: list[BaseException] = []

    def run(i: int) -> None:
        barrier.wait()
        try:
            target(i)
        except BaseException as exc:  # noqa: BLE001 (re-raised below)
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]


def test_nodes_sweeping_at_once_queue_one_job_per_quiet_study(database_url, tmp_path):
    from radlens.agent.queue import JobQueue

    db = Database(database_url)
    for n in range(12):
        _add_instances(db, f"1.2.{n}", 3, received_at=100.0)
    _add_instances(db, "1.2.99", 2, received_at=10_000.0)  # still receiving at now=10_000
    queues = [JobQueue(Database(database_url), tmp_path, node_id=f"n{i}") for i in range(4)]
    queued: list[list[int]] = [[] for _ in queues]
    _race(4, lambda i: queued[i].extend(queues[i].sweep(5.0, 600.0, now=10_000.0)))
    assert sum(map(len, queued)) == 12
    rows = db.rows("SELECT study_instance_uid, COUNT(*) AS n FROM jobs"
                   " GROUP BY study_instance_uid")
    assert {r["study_instance_uid"] for r in rows} == {f"1.2.{n}" for n in range(12)}
    assert all(r["n"] == 1 for r in rows)
    assert db.scalar("SELECT COUNT(*) FROM instances WHERE job_id IS NULL") == 2


def test_nodes_claiming_at_once_take_each_job_once(database_url, tmp_path):
    from radlens.agent.queue import JobQueue

    db = Database(database_url)
    for n in range(20):
        _add_instances(db, f"2.2.{n}", 1, received_at=100.0)
        JobQueue(db, tmp_path).create_job_for_pending(f"2.2.{n}")
    queues = [JobQueue(Database(database_url), tmp_path, node_id=f"w{i}") for i in range(4)]
    claimed: list[list[int]] = [[] for _ in queues]

    def drain(i: int) -> None:
        while (job := queues[i].claim_next()) is not None:
            claimed[i].append(job.id)

    _race(4, drain)
    every = sorted(job for jobs in claimed for job in jobs)
    assert len(every) == 20 and len(set(every)) == 20
    rows = db.rows("SELECT claimed_by, attempts FROM jobs")
    assert all(r["attempts"] == 1 for r in rows)
    assert {r["claimed_by"] for r in rows} <= {f"w{i}" for i in range(4)}


def test_a_dead_nodes_job_is_taken_over_once_its_lease_runs_out(database_url, tmp_path):
    import time

    from radlens.agent.queue import JobQueue

    db = Database(database_url)
    _add_instances(db, "3.2.1", 1, received_at=100.0)
    first = JobQueue(db, tmp_path, node_id="dead", lease_s=0.3)
    second = JobQueue(Database(database_url), tmp_path, node_id="alive", lease_s=30)
    job_id = first.create_job_for_pending("3.2.1")
    assert first.claim_next().id == job_id
    assert second.claim_next() is None  # held
    assert first.renew([job_id]) == [job_id]  # a live node keeps it
    time.sleep(0.5)
    taken = second.claim_next()
    assert taken is not None and (taken.id, taken.attempts) == (job_id, 2)
    assert first.renew([job_id]) == [] and first.finish(job_id) is False
    assert db.scalar("SELECT state FROM jobs") == "running"
    assert second.finish(job_id) is True
    assert db.rows("SELECT state, claimed_by FROM jobs")[0] == {"state": "done",
                                                                "claimed_by": "alive"}


def test_senders_delivering_at_once_send_each_row_once(database_url, archive):
    from radlens.agent.outbox import Outbox
    from radlens.config import Destination, OutboxSettings

    destination = Destination(name="archive", ae_title="ARCHIVE", host="127.0.0.1",
                              port=archive.port)
    db = Database(database_url)
    files = [TEST_FILES / name for name in (
        "CT_small.dcm", "MR_small.dcm", "examples_ybr_color.dcm", "JPEG2000.dcm",
        "MR_small_RLE.dcm", "SC_rgb_dcmtk_+eb+cr.dcm")]
    outboxes = [Outbox(Database(database_url), OutboxSettings(), [destination],
                       calling_aet="RADLENS", node_id=f"s{i}") for i in range(3)]
    outboxes[0].enqueue(files, "archive")
    _race(3, lambda i: outboxes[i].deliver_due())
    rows = db.rows("SELECT state, attempts, claimed_by FROM outbox")
    assert len(rows) == len(files)
    assert {(r["state"], r["attempts"]) for r in rows} == {("sent", 1)}
    assert len(archive.files()) == len(files)  # +uf: a file per C-STORE
