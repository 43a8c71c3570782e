"""The state database: the one module that owns the schema, for SQLite and PostgreSQL alike.

Every stage keeps its state here (spool: received, assembler: complete, worker: processed,
outbox: delivered). A single node keeps it in a SQLite file in its data folder; a cluster points
``state.url`` at PostgreSQL. The tables are SQLAlchemy Core tables, one schema for both
dialects, and Alembic migrates either (``radlens/migrations``): Alembic builds each dialect's DDL
from one description, records the revision in the database itself, and alters SQLite tables the
way SQLite allows (copy and move). A SQLite file made before Alembic (schema version 2 of the
numbered migrations radlens used to carry) is recognised and stamped, not rebuilt.

SQLite runs in WAL mode, so the listener, the worker and ``radlens status`` read and write at
once; ``synchronous=FULL`` makes each committed transaction durable before we acknowledge. Write
transactions begin IMMEDIATE, so two writers queue for the lock instead of failing halfway;
reads begin deferred.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine, RowMapping

from radlens.errors import RadlensError
from radlens.logs import kv

log = logging.getLogger(__name__)

DB_FILENAME = "radlens.sqlite"
#: The schema version of the numbered migrations radlens carried before Alembic; a SQLite file
#: at this ``user_version`` holds exactly the baseline revision's tables.
LEGACY_SCHEMA_VERSION = 2
BASELINE_REVISION = "0001"
WRITES = "radlens_writes"  # execution option: this connection's transaction will write
MIGRATION_LOCK_KEY = 0x7261646C  # "radl": PostgreSQL advisory lock held while migrating

metadata = sa.MetaData()

instances = sa.Table(
    "instances", metadata,
    sa.Column("sop_instance_uid", sa.Text, primary_key=True),
    sa.Column("sop_class_uid", sa.Text, nullable=False),
    sa.Column("study_instance_uid", sa.Text, nullable=False),
    sa.Column("series_instance_uid", sa.Text, nullable=False),
    sa.Column("transfer_syntax_uid", sa.Text, nullable=False),
    sa.Column("calling_aet", sa.Text, nullable=False),
    sa.Column("path", sa.Text, nullable=False),
    sa.Column("size_bytes", sa.BigInteger, nullable=False),
    sa.Column("received_at", sa.Double, nullable=False),
    sa.Column("job_id", sa.Integer, sa.ForeignKey("jobs.id")),
    sa.Index("instances_by_study", "study_instance_uid"),
    sa.Index("instances_pending", "study_instance_uid",
             sqlite_where=sa.text("job_id IS NULL"), postgresql_where=sa.text("job_id IS NULL")),
    sa.Index("instances_by_job", "job_id"),
)

jobs = sa.Table(
    "jobs", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("study_instance_uid", sa.Text, nullable=False),
    sa.Column("state", sa.Text, nullable=False),
    sa.Column("created_at", sa.Double, nullable=False),
    sa.Column("started_at", sa.Double),
    sa.Column("finished_at", sa.Double),
    sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
    sa.Column("error", sa.Text),
    sa.Column("claimed_by", sa.Text),  # the node running it
    sa.Column("lease_until", sa.Double),  # ... for as long as it renews this
    sa.CheckConstraint("state IN ('queued', 'running', 'done', 'failed')", name="jobs_state"),
    sa.Index("jobs_by_state", "state", "id"),
    sa.Index("jobs_by_study", "study_instance_uid"),
    sqlite_autoincrement=True,
)

quarantine = sa.Table(
    "quarantine", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("received_at", sa.Double, nullable=False),
    sa.Column("calling_aet", sa.Text, nullable=False),
    sa.Column("path", sa.Text, nullable=False),
    sa.Column("size_bytes", sa.BigInteger, nullable=False),
    sa.Column("reason", sa.Text, nullable=False),
    sqlite_autoincrement=True,
)

outbox = sa.Table(
    "outbox", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("destination", sa.Text, nullable=False),
    sa.Column("path", sa.Text, nullable=False),
    sa.Column("sop_instance_uid", sa.Text, nullable=False),
    sa.Column("sop_class_uid", sa.Text, nullable=False),
    sa.Column("transfer_syntax_uid", sa.Text, nullable=False),
    sa.Column("job_id", sa.Integer, sa.ForeignKey("jobs.id")),
    sa.Column("state", sa.Text, nullable=False),
    sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
    sa.Column("created_at", sa.Double, nullable=False),
    sa.Column("next_attempt_at", sa.Double, nullable=False),
    sa.Column("sent_at", sa.Double),
    sa.Column("last_status", sa.Integer),
    sa.Column("last_error", sa.Text),
    sa.Column("claimed_by", sa.Text),  # the node sending it
    sa.Column("lease_until", sa.Double),
    sa.CheckConstraint("state IN ('pending', 'sent', 'failed')", name="outbox_state"),
    sa.Index("outbox_due", "state", "next_attempt_at"),
    sqlite_autoincrement=True,
)

frame_analyses = sa.Table(
    "frame_analyses", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("job_id", sa.Integer, sa.ForeignKey("jobs.id"), nullable=False),
    sa.Column("study_instance_uid", sa.Text, nullable=False),
    sa.Column("sop_instance_uid", sa.Text, nullable=False),
    sa.Column("frame", sa.Integer, nullable=False),
    sa.Column("predicted_class", sa.Text, nullable=False),
    sa.Column("p_normal", sa.Double, nullable=False),
    sa.Column("p_benign", sa.Double, nullable=False),
    sa.Column("p_malignant", sa.Double, nullable=False),
    sa.Column("latent", sa.LargeBinary, nullable=False),
    sa.Column("created_at", sa.Double, nullable=False),
    sa.Index("frame_analyses_by_study", "study_instance_uid", "job_id"),
    sqlite_autoincrement=True,
)

lesion_analyses = sa.Table(
    "lesion_analyses", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("frame_analysis_id", sa.Integer, sa.ForeignKey("frame_analyses.id"),
              nullable=False),
    sa.Column("lesion_index", sa.Integer, nullable=False),
    sa.Column("lesion_class", sa.Text, nullable=False),
    sa.Column("probability", sa.Double, nullable=False),
    sa.Column("latent", sa.LargeBinary, nullable=False),
    sa.Column("measurements", sa.Text, nullable=False),
    sa.Index("lesion_analyses_by_frame", "frame_analysis_id"),
    sqlite_autoincrement=True,
)

# What a task remembers of a patient's study for the patient's later studies (the change since
# a prior visit, radlens.history). The patient is a salted hash, never the ID; job_id has no
# foreign key: the observation outlives its job's rows (retention.history_days).
observations = sa.Table(
    "observations", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("subject", sa.Text, nullable=False),
    sa.Column("task", sa.Text, nullable=False),
    sa.Column("item", sa.Text, nullable=False),
    sa.Column("study_instance_uid", sa.Text, nullable=False),
    sa.Column("study_date", sa.Text),  # YYYY-MM-DD
    sa.Column("job_id", sa.Integer, nullable=False),
    sa.Column("observed", sa.Text, nullable=False),  # JSON
    sa.Column("created_at", sa.Double, nullable=False),
    sa.Index("observations_by_subject", "subject", "task", "item"),
    sa.Index("observations_by_study", "study_instance_uid"),
    sa.Index("observations_by_age", "created_at"),
    sqlite_autoincrement=True,
)

# This installation's own values (the salt of the patient hash).
installation = sa.Table(
    "installation", metadata,
    sa.Column("name", sa.Text, primary_key=True),
    sa.Column("value", sa.Text, nullable=False),
)


nodes = sa.Table(
    "nodes", metadata,
    sa.Column("id", sa.Text, primary_key=True),
    sa.Column("role", sa.Text, nullable=False),
    sa.Column("host", sa.Text, nullable=False),
    sa.Column("pid", sa.Integer, nullable=False),
    sa.Column("started_at", sa.Double, nullable=False),
    sa.Column("heartbeat_at", sa.Double, nullable=False),
    sa.Column("stopped_at", sa.Double),
)


class StateError(RadlensError):
    """The state database cannot be used: a driver missing, a schema newer than this radlens,
    a SQLite file on a network file system."""


def state_url(url: str | None, data_dir: Path) -> str:
    """The SQLAlchemy URL of the state: ``url`` as configured (``postgresql://`` gets the psycopg
    driver), or the SQLite file in ``data_dir``."""
    if not url:
        return f"sqlite:///{(data_dir / DB_FILENAME).resolve()}"
    parsed = sa.engine.make_url(url)
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed.render_as_string(hide_password=False)


def is_sqlite(url: str) -> bool:
    return sa.engine.make_url(url).get_backend_name() == "sqlite"


def redacted(url: str) -> str:
    """The URL fit for a log line: no password."""
    return sa.engine.make_url(url).render_as_string(hide_password=True)


MOUNTINFO = Path("/proc/self/mountinfo")
#: File systems on which a SQLite file must not live: their locks are unreliable or absent,
#: and a folder there is typically shared by several machines, which SQLite cannot serve.
NETWORK_FILESYSTEMS = frozenset({
    "nfs", "nfs4", "cifs", "smb3", "smbfs", "ceph", "fuse.cephfs", "glusterfs",
    "fuse.glusterfs", "fuse.sshfs", "fuse.s3fs", "fuse.gcsfuse", "lustre", "9p", "afs",
    "beegfs", "gpfs", "ocfs2", "gfs2", "virtiofs", "fuse.juicefs",
})


def filesystem_type(path: Path, mountinfo: str | None = None) -> str | None:
    """The type of the file system holding ``path`` (the mount with the longest mount point
    above it in ``/proc/self/mountinfo``), or None where that cannot be read."""
    if mountinfo is None:
        try:
            mountinfo = MOUNTINFO.read_text()
        except OSError:
            return None
    target = str(path.resolve())
    best, best_type = "", None
    for line in mountinfo.splitlines():
        fields = line.split(" - ", 1)
        if len(fields) != 2:
            continue
        before, after = fields[0].split(), fields[1].split()
        if len(before) < 5 or not after:
            continue
        # mountinfo writes a space as \040 (octal escapes)
        mount_point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), before[4])
        inside = target == mount_point or target.startswith(mount_point.rstrip("/") + "/")
        if inside and len(mount_point) >= len(best):
            best, best_type = mount_point, after[0]
    return best_type


def refuse_network_filesystem(path: Path) -> None:
    """A SQLite state on NFS, CephFS and the like is refused: locking there cannot be
    trusted, and a folder shared between nodes needs a state they can share (PostgreSQL)."""
    kind = filesystem_type(path.parent)
    if kind in NETWORK_FILESYSTEMS:
        raise StateError(
            f"the SQLite state {path} would be on a network file system ({kind}): SQLite cannot "
            "be shared between machines, nor trusted on such locks. Keep the data folder on a "
            "local disk, or set state.url to a PostgreSQL database (several nodes sharing "
            "this folder need one)")


def create_engine(url: str, *, durable: bool = True, readonly: bool = False) -> Engine:
    """An engine on ``url``. SQLite: WAL, ``synchronous=FULL`` when ``durable``, foreign keys,
    a 30 s busy timeout, and write transactions that begin IMMEDIATE; ``readonly`` opens the
    file read-only and never creates it. PostgreSQL: the psycopg driver, connections checked
    before use (a restarted server costs a reconnect, not an error)."""
    if is_sqlite(url):
        path = sa.engine.make_url(url).database or ""
        if readonly:
            if not Path(path).is_file():
                raise FileNotFoundError(path)
            url = f"sqlite:///file:{path}?mode=ro&uri=true"
        engine = sa.create_engine(url, connect_args={"timeout": 30.0,
                                                     "check_same_thread": False},
                                  poolclass=sa.pool.NullPool if readonly else None)
        _sqlite_pragmas(engine, durable=durable, readonly=readonly)
        return engine
    try:
        return sa.create_engine(url, pool_pre_ping=True, pool_size=4, max_overflow=8)
    except ModuleNotFoundError as exc:
        raise StateError(f"state.url {redacted(url)} needs a driver that is not installed "
                         f"({exc.name}): pip install 'radlens[cluster]'") from exc


def _sqlite_pragmas(engine: Engine, *, durable: bool, readonly: bool) -> None:
    @event.listens_for(engine, "connect")
    def on_connect(dbapi_connection: Any, record: Any) -> None:
        dbapi_connection.isolation_level = None  # we say when a transaction begins
        cursor = dbapi_connection.cursor()
        if not readonly:
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute(f"PRAGMA synchronous={'FULL' if durable else 'NORMAL'}")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.close()

    @event.listens_for(engine, "begin")
    def on_begin(conn: Connection) -> None:
        # A write takes the lock when it begins: two writers queue (busy_timeout) instead of
        # one failing when it first writes. Reads begin deferred and never wait for writers.
        writes = conn.get_execution_options().get(WRITES, False) and not readonly
        conn.exec_driver_sql("BEGIN IMMEDIATE" if writes else "BEGIN")


def migrate(engine: Engine) -> str:
    """Bring the schema to Alembic's newest revision; returns the revision it ends at.

    One transaction holds the database's write lock throughout (SQLite: BEGIN IMMEDIATE;
    PostgreSQL: an advisory lock), so nodes or processes starting together migrate once.
    """
    from alembic import command
    from alembic.runtime.migration import MigrationContext
    from alembic.script import ScriptDirectory

    config = alembic_config()
    script = ScriptDirectory.from_config(config)
    head = script.get_current_head() or ""
    known = {revision.revision for revision in script.walk_revisions()}
    with engine.connect() as conn, conn.execution_options(**{WRITES: True}).begin():
        if conn.dialect.name == "postgresql":
            conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({MIGRATION_LOCK_KEY})")
        current = MigrationContext.configure(conn).get_current_revision()
        if current is not None and current not in known:
            raise StateError(f"the state database is at revision {current}, which this "
                             f"radlens does not know (its newest is {head}): a newer radlens "
                             "wrote it")
        config.attributes["connection"] = conn
        legacy = _legacy_version(conn) if current is None else None
        if legacy is not None:
            if legacy != LEGACY_SCHEMA_VERSION:
                raise StateError(f"the state database has schema version {legacy} of the "
                                 "numbered migrations; this radlens carries over version "
                                 f"{LEGACY_SCHEMA_VERSION} only")
            command.stamp(config, BASELINE_REVISION)
            log.info("state database carried over to Alembic", extra=kv(
                from_version=legacy, revision=BASELINE_REVISION))
        if current != head:
            command.upgrade(config, "head")
    return head


def _legacy_version(conn: Connection) -> int | None:
    """The ``user_version`` of a SQLite file made by the numbered migrations (None if none)."""
    if conn.dialect.name != "sqlite":
        return None
    version = conn.exec_driver_sql("PRAGMA user_version").scalar()
    return int(version) if version else None


def alembic_config() -> Any:
    """Alembic's configuration, in code: radlens ships no alembic.ini."""
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", "radlens:migrations")
    return config


class Database:
    """The state database of one process: an engine, the schema migrated on opening.

    ``transaction`` is one state change; ``read``, ``rows`` and ``scalar`` read outside one.
    """

    def __init__(self, url: str | Path, *, durable: bool = True, readonly: bool = False) -> None:
        """``url``: a SQLAlchemy URL, or the path of a SQLite file (its folder is created).
        ``readonly``: read while another process writes; never create or migrate (a missing
        SQLite file raises FileNotFoundError)."""
        if isinstance(url, Path):
            if not readonly:
                url.parent.mkdir(parents=True, exist_ok=True)
            url = f"sqlite:///{url.resolve()}"
        if is_sqlite(url) and not readonly:
            refuse_network_filesystem(Path(sa.engine.make_url(url).database or "."))
        self.url = url
        self.durable = durable
        self.engine = create_engine(url, durable=durable, readonly=readonly)
        if not readonly:
            try:
                migrate(self.engine)
            except sa.exc.OperationalError as exc:  # unreachable, refused, no such database
                self.engine.dispose()
                reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
                raise StateError(f"cannot open the state database {redacted(url)}: "
                                 f"{reason}") from exc

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    @contextmanager
    def transaction(self, *, sync: bool = True) -> Iterator[Connection]:
        """One state change = one transaction; rolled back on any error.

        ``sync=False`` commits without waiting for the disk: the change survives a crash of the
        process (SQLite: the WAL is in the OS cache; PostgreSQL: the server has it) but not a
        power loss of the database's machine. Use it only for rows that can be rebuilt from
        durable files (the spool index, see ``Spool.reconcile``); a later synced commit makes
        it durable too.
        """
        relaxed = self.durable and not sync
        with self.engine.connect() as conn:
            conn.execution_options(**{WRITES: True})
            sqlite = conn.dialect.name == "sqlite"
            # SQLite's level is the connection's and cannot change inside a transaction: set
            # on the driver's connection, before SQLAlchemy begins one.
            driver = conn.connection.driver_connection if relaxed and sqlite else None
            if driver is not None:
                driver.execute("PRAGMA synchronous=NORMAL")
            try:
                with conn.begin():
                    if relaxed and not sqlite:
                        conn.exec_driver_sql("SET LOCAL synchronous_commit = off")
                    yield conn
            finally:
                if driver is not None:
                    driver.execute("PRAGMA synchronous=FULL")

    @contextmanager
    def read(self) -> Iterator[Connection]:
        """A connection for reads; each statement sees what was committed before it."""
        with self.engine.connect() as conn:
            yield conn
            conn.rollback()

    def rows(self, statement: sa.Executable | str, params: Mapping[str, Any] | None = None
             ) -> list[RowMapping]:
        """Every row of one read, as mappings (``row["column"]``); ``statement`` may be SQL
        text with ``:name`` parameters."""
        if isinstance(statement, str):
            statement = sa.text(statement)
        with self.read() as conn:
            return list(conn.execute(statement, dict(params or {})).mappings())

    def scalar(self, statement: sa.Executable | str, params: Mapping[str, Any] | None = None
               ) -> Any:
        """The first column of the first row of one read (None without a row)."""
        if isinstance(statement, str):
            statement = sa.text(statement)
        with self.read() as conn:
            return conn.execute(statement, dict(params or {})).scalar()

    def close(self) -> None:
        self.engine.dispose()


def open_readonly(url: str) -> Database | None:
    """For ``radlens status`` and cohort reads: None when a SQLite state file does not exist
    yet."""
    try:
        return Database(url, durable=False, readonly=True)
    except FileNotFoundError:
        return None
