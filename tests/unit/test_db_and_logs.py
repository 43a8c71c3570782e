from __future__ import annotations

import json
import logging
import sqlite3

import pytest

from radlens.agent.status import collect_status
from radlens.db import DB_FILENAME, SCHEMA_VERSION, Database, connect, migrate
from radlens.logs import JsonFormatter, KeyValueFormatter, kv


def test_migrations_are_idempotent_and_versioned(tmp_path):
    db = Database(tmp_path / DB_FILENAME)
    assert db.conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert db.conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert migrate(db.conn) == SCHEMA_VERSION
    tables = {r[0] for r in db.conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"instances", "jobs", "quarantine", "outbox"} <= tables


def test_newer_schema_is_refused(tmp_path):
    conn = connect(tmp_path / DB_FILENAME)
    conn.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    with pytest.raises(RuntimeError, match="newer than this radlens understands"):
        migrate(conn)


def test_transaction_rolls_back_on_error(tmp_path):
    db = Database(tmp_path / DB_FILENAME)
    with pytest.raises(sqlite3.IntegrityError):
        with db.transaction() as conn:
            conn.execute("INSERT INTO jobs (study_instance_uid, state, created_at)"
                         " VALUES ('1', 'queued', 0)")
            conn.execute("INSERT INTO jobs (study_instance_uid, state, created_at)"
                         " VALUES ('1', 'bogus', 0)")
    assert db.conn.execute("SELECT COUNT(*) FROM jobs").fetchone()[0] == 0


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
