"""The SQLite state: the one module that owns the schema and its numbered migrations.

Every stage keeps its state here (spool: received, assembler: complete, worker: processed,
outbox: delivered). WAL mode lets the listener, the worker and ``radlens status`` read and write
at once; ``synchronous=FULL`` makes each committed transaction durable before we acknowledge.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

DB_FILENAME = "radlens.sqlite"

# Append only: a released migration is never edited, a change is a new entry.
MIGRATIONS: tuple[str, ...] = (
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

SCHEMA_VERSION = len(MIGRATIONS)


def connect(path: Path, *, durable: bool = True) -> sqlite3.Connection:
    """Open the state database in WAL mode; ``durable`` fsyncs the WAL on every commit."""
    conn = sqlite3.connect(path, timeout=30.0, isolation_level=None, check_same_thread=True)
    conn.row_factory = sqlite3.Row
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute(f"PRAGMA synchronous={'FULL' if durable else 'NORMAL'}")
    conn.execute("PRAGMA foreign_keys=ON")
    conn.execute("PRAGMA busy_timeout=30000")
    return conn


def migrate(conn: sqlite3.Connection) -> int:
    """Bring the schema to the newest version; returns the version it ends at."""
    current = conn.execute("PRAGMA user_version").fetchone()[0]
    if current > SCHEMA_VERSION:
        raise RuntimeError(
            f"database schema {current} is newer than this radlens understands ({SCHEMA_VERSION})"
        )
    for number in range(current + 1, SCHEMA_VERSION + 1):
        conn.execute("BEGIN IMMEDIATE")
        try:
            for statement in _split(MIGRATIONS[number - 1]):
                conn.execute(statement)
            conn.execute(f"PRAGMA user_version={number}")
            conn.execute("COMMIT")
        except Exception:
            conn.execute("ROLLBACK")
            raise
    return SCHEMA_VERSION


def _split(script: str) -> Iterator[str]:
    for statement in script.split(";"):
        if statement.strip():
            yield statement


class Database:
    """One connection per thread to the state database, created on first use."""

    def __init__(self, path: Path, *, durable: bool = True) -> None:
        self.path = path
        self.durable = durable
        self._local = threading.local()
        path.parent.mkdir(parents=True, exist_ok=True)
        migrate(self.conn)

    @property
    def conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = connect(self.path, durable=self.durable)
            self._local.conn = conn
        return conn

    @contextmanager
    def transaction(self, *, sync: bool = True) -> Iterator[sqlite3.Connection]:
        """One state change = one transaction; rolled back on any error.

        ``sync=False`` commits without fsyncing the WAL: the change survives a crash of the
        process (the WAL is in the OS cache) but not a power loss. Use it only for rows that can
        be rebuilt from durable files (the spool index, see ``Spool.reconcile``); a later synced
        commit makes it durable too.
        """
        conn = self.conn
        relaxed = self.durable and not sync
        if relaxed:
            conn.execute("PRAGMA synchronous=NORMAL")
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
        finally:
            if relaxed:
                conn.execute("PRAGMA synchronous=FULL")

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None


def open_readonly(path: Path) -> sqlite3.Connection:
    """For ``radlens status``: read while the agent writes, never create or migrate."""
    if not path.is_file():
        raise FileNotFoundError(path)
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10.0)
    conn.row_factory = sqlite3.Row
    return conn
