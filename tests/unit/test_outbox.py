"""Outbox bookkeeping against a real closed port (connection refused), no stand-ins."""

from __future__ import annotations

import time

import pytest

from radlens.agent.outbox import Outbox
from radlens.config import Destination, OutboxSettings
from radlens.db import DB_FILENAME, Database
from radlens.errors import ConfigError, InvalidDatasetError
from tests.helpers import TEST_FILES, free_port


def _outbox(tmp_path, **settings) -> Outbox:
    down = Destination(name="down", ae_title="NOBODY", host="127.0.0.1", port=free_port())
    return Outbox(Database(tmp_path / DB_FILENAME), OutboxSettings(**settings), [down],
                  calling_aet="RADLENS", timeout_s=5)


def test_backoff_doubles_from_initial_up_to_the_cap(tmp_path):
    outbox = _outbox(tmp_path, retry_initial_s=2, retry_max_s=30)
    assert [outbox.backoff_s(n) for n in range(1, 7)] == [2, 4, 8, 16, 30, 30]


def test_unreachable_destination_is_retried_later(tmp_path):
    outbox = _outbox(tmp_path, retry_initial_s=60)
    outbox.enqueue([TEST_FILES / "CT_small.dcm"], "down")
    before = time.time()
    report = outbox.deliver_due()
    assert (report.sent, report.retrying, report.failed) == (0, 1, 0)
    row = outbox.db.rows("SELECT * FROM outbox")[0]
    assert row["state"] == "pending" and row["attempts"] == 1
    assert "cannot connect to NOBODY@127.0.0.1" in row["last_error"]
    assert row["next_attempt_at"] >= before + 60
    assert outbox.deliver_due().retrying == 0  # not due yet: nothing attempted


def test_max_attempts_gives_up_and_says_so(tmp_path):
    outbox = _outbox(tmp_path, retry_initial_s=0.01, retry_max_s=0.01, max_attempts=2)
    outbox.enqueue([TEST_FILES / "CT_small.dcm"], "down")
    outbox.deliver_due()
    time.sleep(0.05)
    assert outbox.deliver_due().failed == 1
    row = outbox.db.rows("SELECT state, attempts FROM outbox")[0]
    assert (row["state"], row["attempts"]) == ("failed", 2)


def test_enqueue_checks_destination_and_file(tmp_path):
    outbox = _outbox(tmp_path)
    with pytest.raises(ConfigError, match="unknown destination 'pacs'"):
        outbox.enqueue([TEST_FILES / "CT_small.dcm"], "pacs")
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"junk")
    with pytest.raises(InvalidDatasetError, match="not a DICOM file"):
        outbox.enqueue([junk], "down")
    assert outbox.db.scalar("SELECT COUNT(*) FROM outbox") == 0


def test_rows_held_when_the_state_fails_mid_delivery_are_freed_at_the_next_round(tmp_path):
    """The state fails between a claim and its outcome (injected: recording the outcome
    raises once). The rows this sender holds are freed at its next round, not after the
    lease (minutes), since no one else can be sending them."""
    import sqlalchemy as sa

    down = Destination(name="down", ae_title="NOBODY", host="127.0.0.1", port=free_port())
    outbox = Outbox(Database(tmp_path / DB_FILENAME), OutboxSettings(retry_initial_s=0.01),
                    [down], calling_aet="RADLENS", timeout_s=5, node_id="node-1")
    outbox.enqueue([TEST_FILES / "CT_small.dcm"], "down")
    record = outbox._retry

    def state_goes_away(*args, **kwargs):
        outbox._retry = record
        raise sa.exc.OperationalError("UPDATE outbox", {}, Exception("server closed"))

    outbox._retry = state_goes_away
    with pytest.raises(sa.exc.OperationalError):
        outbox.deliver_due()
    row = outbox.db.rows("SELECT * FROM outbox")[0]
    assert row["claimed_by"] == "node-1" and row["lease_until"] > time.time() + 30
    report = outbox.deliver_due()  # frees its own claim, then tries again at once
    assert report.retrying == 1
    row = outbox.db.rows("SELECT * FROM outbox")[0]
    assert row["attempts"] == 1 and row["lease_until"] is None


def test_a_delivery_the_state_could_not_record_is_recorded_not_sent_again(tmp_path, archive):
    """The destination takes the files, then the state fails as the outbox records it
    (injected: the first recording raises). The next round records what was delivered and
    sends nothing again: storescp (+uf, a file per C-STORE) holds each file once."""
    import sqlalchemy as sa

    destination = Destination(name="archive", ae_title="ARCHIVE", host="127.0.0.1",
                              port=archive.port)
    outbox = Outbox(Database(tmp_path / DB_FILENAME), OutboxSettings(retry_initial_s=0.01),
                    [destination], calling_aet="RADLENS", timeout_s=10, node_id="node-1")
    outbox.enqueue([TEST_FILES / "CT_small.dcm", TEST_FILES / "MR_small.dcm"], "archive")
    transaction = outbox.db.transaction
    calls = {"n": 0}

    def state_goes_away_once():
        calls["n"] += 1
        if calls["n"] == 2:  # the first is the claim; the second records the delivery
            raise sa.exc.OperationalError("UPDATE outbox", {}, Exception("server closed"))
        return transaction()

    outbox.db.transaction = state_goes_away_once
    with pytest.raises(sa.exc.OperationalError):
        outbox.deliver_due()
    assert len(archive.files()) == 2
    assert outbox.db.scalar("SELECT COUNT(*) FROM outbox WHERE state = 'sent'") == 0
    report = outbox.deliver_due()
    assert report.sent == 0 and report.retrying == 0  # nothing was due again
    rows = outbox.db.rows("SELECT state, attempts, lease_until FROM outbox")
    assert [(r["state"], r["attempts"], r["lease_until"]) for r in rows] == [("sent", 1, None)] * 2
    assert len(archive.files()) == 2
