from __future__ import annotations

import json
import logging
import sqlite3
from pathlib import Path

import pytest
import sqlalchemy as sa

from radlens.agent.status import collect_status
from radlens.config import Settings
from radlens.db import (
    BASELINE_REVISION,
    DB_FILENAME,
    Database,
    StateError,
    alembic_config,
    metadata,
    state_url,
)
from radlens.logs import JsonFormatter, KeyValueFormatter, kv

# The schema radlens created before Alembic (the numbered migrations, up to version 2), as it
# was released: a file made by it must be carried over, not rebuilt.
LEGACY_MIGRATIONS = (
    # 1: the spool index, study jobs, quarantine and the outbox
    """
    CREATE TABLE instances (
        sop_instance_uid    TEXT PRIMARY KEY,
        sop_class_uid       TEXT NOT NULL,
        study_instance_uid  TEXT NOT NULL,
        series_instance_uid TEXT NOT NULL,
        transfer_syntax_uid TEXT NOT NULL,
        calling_aet         TEXT NOT NULL,
        path                TEXT NOT NULL,
        size_bytes          INTEGER NOT NULL,
        received_at         REAL NOT NULL,
        job_id              INTEGER REFERENCES jobs(id)
    );
    CREATE INDEX instances_by_study ON instances(study_instance_uid);
    CREATE INDEX instances_pending ON instances(study_instance_uid) WHERE job_id IS NULL;
    CREATE INDEX instances_by_job ON instances(job_id);

    CREATE TABLE jobs (
        id                 INTEGER PRIMARY KEY AUTOINCREMENT,
        study_instance_uid TEXT NOT NULL,
        state              TEXT NOT NULL
                           CHECK (state IN ('queued', 'running', 'done', 'failed')),
        created_at         REAL NOT NULL,
        started_at         REAL,
        finished_at        REAL,
        attempts           INTEGER NOT NULL DEFAULT 0,
        error              TEXT
    );
    CREATE INDEX jobs_by_state ON jobs(state, id);
    CREATE INDEX jobs_by_study ON jobs(study_instance_uid);

    CREATE TABLE quarantine (
        id          INTEGER PRIMARY KEY AUTOINCREMENT,
        received_at REAL NOT NULL,
        calling_aet TEXT NOT NULL,
        path        TEXT NOT NULL,
        size_bytes  INTEGER NOT NULL,
        reason      TEXT NOT NULL
    );

    CREATE TABLE outbox (
        id                  INTEGER PRIMARY KEY AUTOINCREMENT,
        destination         TEXT NOT NULL,
        path                TEXT NOT NULL,
        sop_instance_uid    TEXT NOT NULL,
        sop_class_uid       TEXT NOT NULL,
        transfer_syntax_uid TEXT NOT NULL,
        job_id              INTEGER REFERENCES jobs(id),
        state               TEXT NOT NULL CHECK (state IN ('pending', 'sent', 'failed')),
        attempts            INTEGER NOT NULL DEFAULT 0,
        created_at          REAL NOT NULL,
        next_attempt_at     REAL NOT NULL,
        sent_at             REAL,
        last_status         INTEGER,
        last_error          TEXT
    );
    CREATE INDEX outbox_due ON outbox(state, next_attempt_at);
    """,
    # 2: what the model made of each analysed frame, for cohort analysis over the agent's data
    """
    CREATE TABLE frame_analyses (
        id                 INTEGER PRIMARY KEY AUTOINCREMENT,
        job_id             INTEGER NOT NULL REFERENCES jobs(id),
        study_instance_uid TEXT NOT NULL,
        sop_instance_uid   TEXT NOT NULL,
        frame              INTEGER NOT NULL,
        predicted_class    TEXT NOT NULL,
        p_normal           REAL NOT NULL,
        p_benign           REAL NOT NULL,
        p_malignant        REAL NOT NULL,
        latent             BLOB NOT NULL,
        created_at         REAL NOT NULL
    );
    CREATE INDEX frame_analyses_by_study ON frame_analyses(study_instance_uid, job_id);

    CREATE TABLE lesion_analyses (
        id                INTEGER PRIMARY KEY AUTOINCREMENT,
        frame_analysis_id INTEGER NOT NULL REFERENCES frame_analyses(id),
        lesion_index      INTEGER NOT NULL,
        lesion_class      TEXT NOT NULL,
        probability       REAL NOT NULL,
        latent            BLOB NOT NULL,
        measurements      TEXT NOT NULL
    );
    CREATE INDEX lesion_analyses_by_frame ON lesion_analyses(frame_analysis_id);
    """,
)


def _revision(db: Database) -> str | None:
    from alembic.runtime.migration import MigrationContext

    with db.read() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def test_a_new_state_file_is_migrated_once_to_the_newest_revision(tmp_path):
    from alembic.script import ScriptDirectory

    db = Database(tmp_path / DB_FILENAME)
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert _revision(db) == head
    assert db.scalar("PRAGMA journal_mode") == "wal"
    tables = {r["name"] for r in db.rows("SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"instances", "jobs", "quarantine", "outbox", "frame_analyses",
            "lesion_analyses"} <= tables
    again = Database(tmp_path / DB_FILENAME)  # opening again changes nothing
    assert _revision(again) == head


def test_the_migrations_build_exactly_the_tables_the_code_uses(tmp_path):
    """Alembic's own comparison of the migrated database with ``radlens.db.metadata``: a
    column or index added to one and not the other fails here."""
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    db = Database(tmp_path / DB_FILENAME)
    with db.read() as conn:
        differences = compare_metadata(MigrationContext.configure(conn), metadata)
    assert differences == []


def test_a_state_file_of_the_numbered_migrations_is_carried_over_with_its_rows(tmp_path):
    path = tmp_path / DB_FILENAME
    conn = sqlite3.connect(path)
    for script in LEGACY_MIGRATIONS:
        conn.executescript(script)
    conn.execute("PRAGMA user_version=2")
    conn.execute("INSERT INTO jobs (study_instance_uid, state, created_at)"
                 " VALUES ('1.2', 'done', 5)")
    conn.commit()
    conn.close()
    db = Database(path)
    assert _revision(db) is not None
    assert [dict(r) for r in db.rows("SELECT study_instance_uid, state FROM jobs")] == [
        {"study_instance_uid": "1.2", "state": "done"}]
    with db.transaction() as tx:  # and it takes new rows as before
        tx.execute(sa.text("INSERT INTO jobs (study_instance_uid, state, created_at)"
                           " VALUES ('1.3', 'queued', 6)"))
    assert db.scalar("SELECT COUNT(*) FROM jobs") == 2
    assert BASELINE_REVISION == "0001"


def test_an_older_numbered_schema_and_an_unknown_revision_are_refused(tmp_path):
    older = tmp_path / "older.sqlite"
    conn = sqlite3.connect(older)
    conn.executescript(LEGACY_MIGRATIONS[0])
    conn.execute("PRAGMA user_version=1")
    conn.commit()
    conn.close()
    with pytest.raises(StateError, match="schema version 1"):
        Database(older)
    db = Database(tmp_path / DB_FILENAME)
    with db.transaction() as tx:
        tx.execute(sa.text("UPDATE alembic_version SET version_num = 'f00d'"))
    with pytest.raises(StateError, match="revision f00d.*newer radlens"):
        Database(tmp_path / DB_FILENAME)


def test_transaction_rolls_back_on_error(tmp_path):
    db = Database(tmp_path / DB_FILENAME)
    with pytest.raises(sa.exc.IntegrityError):
        with db.transaction() as conn:
            conn.execute(sa.text("INSERT INTO jobs (study_instance_uid, state, created_at)"
                                 " VALUES ('1', 'queued', 0)"))
            conn.execute(sa.text("INSERT INTO jobs (study_instance_uid, state, created_at)"
                                 " VALUES ('1', 'bogus', 0)"))
    assert db.scalar("SELECT COUNT(*) FROM jobs") == 0


def test_state_url_defaults_to_the_data_folder_and_refuses_other_databases(tmp_path,
                                                                         monkeypatch):
    assert state_url(None, tmp_path) == f"sqlite:///{(tmp_path / DB_FILENAME).resolve()}"
    assert state_url("postgresql://u:p@db:5432/radlens", tmp_path) == \
        "postgresql+psycopg://u:p@db:5432/radlens"
    monkeypatch.setenv("RADLENS_STATE__URL", "postgresql://u@db/radlens")
    assert Settings().state.resolved_url(tmp_path).startswith("postgresql+psycopg://u@db/")
    monkeypatch.setenv("RADLENS_STATE__URL", "mysql://u@db/radlens")
    with pytest.raises(ValueError, match="sqlite:/// or postgresql://"):
        Settings()


def _record(message: str, **context) -> logging.LogRecord:
    record = logging.LogRecord("radlens.test", logging.INFO, __file__, 1, message, None, None)
    for key, value in kv(**context).items():
        setattr(record, key, value)
    return record


def test_key_value_and_json_log_lines():
    record = _record("instance stored", sop="1.2.3", calling_aet="CT 01")
    text = KeyValueFormatter().format(record)
    assert text.endswith('INFO radlens.test instance stored sop=1.2.3 calling_aet="CT 01"')
    payload = json.loads(JsonFormatter().format(record))
    assert payload["message"] == "instance stored"
    assert payload["sop"] == "1.2.3" and payload["calling_aet"] == "CT 01"


def test_status_of_an_empty_data_folder(tmp_path):
    report = collect_status(tmp_path / "nothing-yet")
    assert report.agent.running is False
    assert report.instances == 0 and report.jobs["done"] == 0


def test_freed_memory_goes_back_to_the_os():
    """Blocks freed between live ones (a fragmented heap, as after a batch's backward pass)
    stay resident until trimmed: freeing alone returns nothing here."""
    import sys

    from radlens.memory import _TRIM, release_freed_memory

    if _TRIM is None or not sys.platform.startswith("linux"):
        pytest.skip("malloc_trim is glibc's: nothing to release on this platform")

    def rss_mb() -> float:
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) for line in status
                        if line.startswith("VmRSS")) / 1024

    blocks = [bytearray(64 * 1024) for _ in range(3000)]  # ~190 MB in the heap
    for block in blocks:
        block[::4096] = b"x" * len(block[::4096])  # touch every page
    kept = blocks[1::2]  # every other block stays alive
    del blocks, block
    freed_not_returned = rss_mb()
    release_freed_memory()
    assert rss_mb() < freed_not_returned - 60  # about half of ~190 MB comes back
    assert len(kept) == 1500


MOUNTINFO = """\
22 27 0:21 / /proc rw,relatime - proc proc rw
27 1 8:1 / / rw,relatime - ext4 /dev/sda1 rw
31 27 0:45 / /mnt/shared\\040data rw,relatime - nfs4 nas:/export/radlens rw,vers=4.2
32 27 0:46 / /mnt/shared\\040data/local rw,relatime - ext4 /dev/sdb1 rw
"""


def test_the_file_system_under_a_path_is_read_from_mountinfo():
    from radlens.db import filesystem_type

    assert filesystem_type(Path("/mnt/shared data/radlens"), MOUNTINFO) == "nfs4"
    assert filesystem_type(Path("/mnt/shared data/local/x"), MOUNTINFO) == "ext4"
    assert filesystem_type(Path("/mnt/shared"), MOUNTINFO) == "ext4"  # a prefix, not a parent
    assert filesystem_type(Path("/proc/1"), MOUNTINFO) == "proc"
    assert filesystem_type(Path("/"), MOUNTINFO) == "ext4"


def test_a_sqlite_state_on_a_network_file_system_is_refused(tmp_path, monkeypatch):
    """This machine's own mount table, with the test's folder added as an NFS mount."""
    from radlens import db as state

    real = state.MOUNTINFO.read_text()
    table = tmp_path / "mountinfo"
    table.write_text(real + f"99 27 0:99 / {tmp_path / 'nas'} rw - nfs4 nas:/export rw\n")
    monkeypatch.setattr(state, "MOUNTINFO", table)
    with pytest.raises(StateError, match=r"network file system \(nfs4\).*state.url"):
        Database(tmp_path / "nas" / DB_FILENAME)
    assert Database(tmp_path / "local" / DB_FILENAME).dialect == "sqlite"  # a local disk


def test_an_unreachable_postgresql_is_one_clear_error():
    from radlens.demo.tools import free_port

    url = state_url(f"postgresql://radlens:secret@127.0.0.1:{free_port()}/radlens", Path("."))
    with pytest.raises(StateError, match=r"cannot open the state database "
                                         r"postgresql\+psycopg://radlens:\*\*\*@127") as error:
        Database(url)
    assert "secret" not in str(error.value)
