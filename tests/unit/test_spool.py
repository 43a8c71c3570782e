from __future__ import annotations

import json
from pathlib import Path

import pydicom
import pytest
import sqlalchemy as sa

from radlens.db import DB_FILENAME, Database
from radlens.dicom_io.spool import (
    MissingUidError,
    Spool,
    UnparseableDatasetError,
    read_uids,
    write_durably,
)
from radlens.errors import SpoolError
from tests.helpers import TEST_FILES

CT = TEST_FILES / "CT_small.dcm"


@pytest.fixture
def spool(tmp_path: Path) -> Spool:
    return Spool(tmp_path, Database(tmp_path / DB_FILENAME), fsync=True)


def test_store_files_under_study_series_sop_and_indexes(spool):
    encoded = CT.read_bytes()
    stored = spool.store(encoded, calling_aet="CT01", transfer_syntax_uid="1.2.840.10008.1.2.1")
    ds = pydicom.dcmread(CT)
    assert stored.path == spool.root / ds.StudyInstanceUID / ds.SeriesInstanceUID / \
        f"{ds.SOPInstanceUID}.dcm"
    assert stored.path.read_bytes() == encoded
    assert not stored.duplicate
    row = spool.db.rows("SELECT * FROM instances")[0]
    assert (row["calling_aet"], row["size_bytes"]) == ("CT01", len(encoded))
    assert row["job_id"] is None


def test_same_sop_instance_is_not_stored_twice(spool):
    encoded = CT.read_bytes()
    spool.store(encoded, calling_aet="A", transfer_syntax_uid="1.2.840.10008.1.2.1")
    again = spool.store(encoded, calling_aet="B", transfer_syntax_uid="1.2.840.10008.1.2.1")
    assert again.duplicate
    assert spool.db.scalar("SELECT COUNT(*) FROM instances") == 1
    assert spool.db.scalar("SELECT calling_aet FROM instances") == "A"


def _analysed(spool: Spool) -> None:
    """Every pending instance taken into a job, as the assembler does."""
    with spool.db.transaction() as conn:
        job = conn.execute(sa.text(
            "INSERT INTO jobs (study_instance_uid, state, created_at, attempts) "
            "VALUES ('x', 'done', 0, 1) RETURNING id")).scalar_one()
        conn.execute(sa.text("UPDATE instances SET job_id = :job"), {"job": job})


def _changed(encoded: bytes) -> bytes:
    ds = pydicom.dcmread(pydicom.filebase.DicomBytesIO(encoded))
    ds.PatientName = "Corrected^Name"
    buffer = pydicom.filebase.DicomBytesIO()
    ds.save_as(buffer)
    return buffer.getvalue()


@pytest.mark.parametrize("policy, pending", [("ignore", 0), ("reprocess", 1)])
def test_an_identical_resend_after_analysis_follows_the_policy(tmp_path, policy, pending):
    spool = Spool(tmp_path, Database(tmp_path / DB_FILENAME), fsync=False,
                  identical_resend=policy)
    encoded = CT.read_bytes()
    spool.store(encoded, calling_aet="A", transfer_syntax_uid="1.2.840.10008.1.2.1")
    _analysed(spool)
    again = spool.store(encoded, calling_aet="A", transfer_syntax_uid="1.2.840.10008.1.2.1")
    assert again.duplicate is (policy == "ignore")
    assert spool.db.scalar("SELECT COUNT(*) FROM instances WHERE job_id IS NULL") == pending


def test_a_changed_instance_replaces_the_file_and_is_pending_again(spool):
    encoded = CT.read_bytes()
    first = spool.store(encoded, calling_aet="A", transfer_syntax_uid="1.2.840.10008.1.2.1")
    _analysed(spool)
    changed = _changed(encoded)
    again = spool.store(changed, calling_aet="B", transfer_syntax_uid="1.2.840.10008.1.2.1")
    assert not again.duplicate and again.path == first.path
    assert first.path.read_bytes() == changed
    row = spool.db.rows("SELECT * FROM instances")[0]
    assert row["job_id"] is None and row["size_bytes"] == len(changed)
    assert row["calling_aet"] == "B"


def test_garbage_is_unparseable_and_missing_uids_are_named():
    with pytest.raises(UnparseableDatasetError):
        read_uids(b"\0" * 128 + b"DICM" + b"\xff" * 64)
    with pytest.raises(UnparseableDatasetError):
        read_uids(b"hello, not dicom")
    ds = pydicom.dcmread(CT)
    del ds.SeriesInstanceUID
    from io import BytesIO

    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    with pytest.raises(MissingUidError, match="lacks SeriesInstanceUID"):
        read_uids(buffer.getvalue())


def test_uid_that_could_escape_the_spool_is_refused(tmp_path):
    from io import BytesIO

    ds = pydicom.dcmread(CT)
    ds.StudyInstanceUID = "../../outside"
    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    with pytest.raises(MissingUidError, match="malformed StudyInstanceUID"):
        read_uids(buffer.getvalue())


def test_quarantine_keeps_bytes_and_reason(spool):
    path = spool.quarantine(b"broken", calling_aet="X", reason="cannot parse dataset: test")
    assert path.read_bytes() == b"broken"
    sidecar = json.loads(path.with_suffix(".json").read_text())
    assert sidecar["reason"] == "cannot parse dataset: test"
    assert sidecar["calling_aet"] == "X"
    assert spool.db.scalar("SELECT COUNT(*) FROM quarantine") == 1


def test_disk_reserve_refuses_before_writing(tmp_path):
    spool = Spool(tmp_path, Database(tmp_path / DB_FILENAME), min_free_mb=10**9)
    with pytest.raises(SpoolError, match="disk nearly full"):
        spool.store(CT.read_bytes(), calling_aet="A", transfer_syntax_uid="1.2.840.10008.1.2.1")
    assert not list(spool.root.rglob("*.dcm"))


def test_write_error_becomes_spool_error_and_leaves_no_partial(spool, monkeypatch):
    def failing_replace(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("radlens.dicom_io.spool.os.replace", failing_replace)
    with pytest.raises(SpoolError, match="No space left on device"):
        spool.store(CT.read_bytes(), calling_aet="A", transfer_syntax_uid="1.2.840.10008.1.2.1")
    assert not list(spool.root.rglob("*.partial"))
    assert spool.db.scalar("SELECT COUNT(*) FROM instances") == 0


def test_partials_from_a_crash_are_removed(spool):
    leftover = spool.root / "1.2" / ".x.dcm.abc.partial"
    leftover.parent.mkdir(parents=True)
    leftover.write_bytes(b"half")
    assert spool.remove_partials() == 1
    assert not leftover.exists()


def test_write_durably_replaces_whole_file(tmp_path):
    target = tmp_path / "f.json"
    write_durably(target, b"one")
    write_durably(target, b"two")
    assert target.read_bytes() == b"two"
    assert [p.name for p in tmp_path.iterdir()] == ["f.json"]


def test_reconcile_indexes_spooled_files_whose_row_was_lost(spool):
    stored = spool.store(CT.read_bytes(), calling_aet="CT01",
                         transfer_syntax_uid="1.2.840.10008.1.2.1")
    with spool.db.transaction() as conn:  # what a power loss can do to an unsynced commit
        conn.execute(sa.text("DELETE FROM instances"))
    assert spool.reconcile() == 1
    row = spool.db.rows("SELECT * FROM instances")[0]
    assert row["sop_instance_uid"] == stored.uids.sop_instance_uid
    assert row["transfer_syntax_uid"] == "1.2.840.10008.1.2.1"
    assert row["calling_aet"] == "(recovered)"
    assert spool.reconcile() == 0


def test_recv_exactly_reads_whole_pdus_and_stops_at_a_close():
    """The listener's PDU reader keeps pynetdicom's contract: all the bytes asked for, across
    as many kernel reads as it takes, or what arrived before the peer closed."""
    import socket
    import threading

    from radlens.dicom_io.scp import recv_exactly

    payload = bytes(range(256)) * 4096  # 1 MiB: more than one socket buffer
    left, right = socket.socketpair()
    with left, right:
        sender = threading.Thread(target=left.sendall, args=(payload + b"tail",))
        sender.start()
        assert recv_exactly(right, len(payload)) == payload
        sender.join()
        left.close()
        assert recv_exactly(right, 100) == b"tail"  # the peer closed: what there was
        assert recv_exactly(right, 10) == b""


def test_accepted_contexts_copy_cheaply_and_independently():
    """pynetdicom deep-copies the acceptor's contexts per association: radlens's contexts are
    the AE's own, and a copy shares the immutable UIDs but not the lists holding them."""
    import copy

    from radlens.config import DicomSettings
    from radlens.dicom_io.scp import accepted_contexts, build_ae

    ae = build_ae(DicomSettings())
    contexts = accepted_contexts(ae)
    assert [(c.abstract_syntax, c.transfer_syntax) for c in contexts] == [
        (c.abstract_syntax, c.transfer_syntax) for c in ae.supported_contexts]
    copies = copy.deepcopy(contexts)
    for original, clone in zip(contexts, copies, strict=True):
        assert clone is not original and clone.transfer_syntax == original.transfer_syntax
        assert vars(clone)["_transfer_syntax"] is not vars(original)["_transfer_syntax"]
        assert clone.transfer_syntax[0] is original.transfer_syntax[0]  # shared, not rebuilt
