"""Hostile input at the door: a few hundred malformed datasets and PDUs over real associations,
and senders that try to exhaust the node (connections held open, a PDU a second, a 2 GB
declared length, an instance far over the size cap)."""

from __future__ import annotations

import collections
import json
import socket
import threading
import time
from pathlib import Path

import pytest

from radlens.demo.fuzz import (
    RawAssociation,
    base_dataset,
    dataset_cases,
    echo_seconds,
    encode,
    fuzz_uid,
    pdu_cases,
    send_dataset_case,
    send_pdu_case,
    write_case_file,
)
from radlens.tasks.breast_us.dicom import us_instance
from tests.helpers import closed_by_node, storescu, wait_for

DATASET_CASES = 15 * 6  # every family six times; benchmarks/fuzz.py runs thousands
PDU_CASES = 16 * 3


def _valid_study(folder: Path, instances: int = 2) -> tuple[str, list[Path]]:
    study = fuzz_uid("valid-study")
    paths = []
    for index in range(instances):
        ds = us_instance(study_uid=study, series_uid=fuzz_uid("valid-series"),
                         instance_number=index + 1, rows=96, columns=128, seed=index)
        path = folder / f"valid-{index}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return study, paths


def test_fuzzed_datasets_and_pdus_are_answered_and_the_node_keeps_serving(server_factory,
                                                                         tmp_path):
    """Every malformed dataset gets a C-STORE status, every hostile connection is closed by
    the node, the next association after each is served within a second, no traceback reaches
    the log, and the studies sent afterwards (and the fuzz study itself) are processed."""
    server = server_factory().start()  # the shipped model: the fuzz study goes through it
    folder = tmp_path / "cases"
    folder.mkdir()
    statuses: collections.Counter[tuple[str, str]] = collections.Counter()
    unanswered, slow = [], []
    for case in dataset_cases(DATASET_CASES, seed=13):
        outcome = send_dataset_case(write_case_file(case, folder), "127.0.0.1", server.port)
        if outcome.status is None:
            unanswered.append((case.name, outcome.error))
        else:
            statuses[(case.family, f"0x{outcome.status:04X}")] += 1
        echo = echo_seconds("127.0.0.1", server.port)
        if echo is None or echo >= 1.0:
            slow.append((case.name, echo))
    assert not unanswered, unanswered
    refused = {family for family, status in statuses if status != "0x0000"}
    assert {"truncated", "byte_flipped", "uids", "nested"} <= refused, statuses
    assert {status for _, status in statuses} <= {"0x0000", "0xC000", "0xC001", "0xA700"}

    lingering = []
    for case in pdu_cases(PDU_CASES, seed=13):
        outcome = send_pdu_case(case, "127.0.0.1", server.port, wait_s=10)
        if not outcome.closed:
            lingering.append(case.name)
        echo = echo_seconds("127.0.0.1", server.port)
        if echo is None or echo >= 1.0:
            slow.append((case.name, echo))
    assert not lingering, f"the node left these connections open: {lingering}"
    assert not slow, f"associations not served within a second after: {slow}"

    valid_study, files = _valid_study(tmp_path)
    sent = storescu(server.port, files)
    assert sent.returncode == 0, sent.stdout + sent.stderr
    fuzz_study = str(base_dataset(fuzz_uid("study", 13), 0).StudyInstanceUID)
    wait_for(lambda: {r["study_instance_uid"] for r in server.jobs_done()} >= {valid_study,
                                                                            fuzz_study},
             600, "the valid study and the fuzz study to be processed")
    jobs = {r["study_instance_uid"]: r["state"] for r in server.jobs_done()}
    assert jobs[valid_study] == "done" and jobs[fuzz_study] == "done", jobs
    assert (server.data_dir / "results" / valid_study / "findings.json").is_file()

    log = server.log()
    assert "Traceback" not in log, log[log.index("Traceback") - 2000:log.index("Traceback") + 3000]
    assert "oversized PDU refused" in log and "invalid DIMSE message" in log
    assert server.stop() == 0


def _rss_kb(pid: int, field: str = "VmRSS") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} for {pid}")


def test_exhaustion_held_connections_slow_sender_and_huge_declarations(server_factory,
                                                                      tmp_path):
    """A sender holding forty connections open (from 127.0.0.2), another trickling one PDU a
    second (from 127.0.0.3), a PDU declaring 2 GB and 300 MB streamed past a 20 MB cap: others
    are served meanwhile, memory stays bounded, and the log says what happened."""
    server = server_factory(RADLENS_DICOM__MAX_INSTANCE_MB="20",
                            RADLENS_MODEL__ENABLED="false").start()
    pid = server.process.pid
    baseline_kb = _rss_kb(pid)

    held = []
    for _ in range(40):
        try:
            held.append(socket.create_connection(("127.0.0.1", server.port), timeout=5,
                                                 source_address=("127.0.0.2", 0)))
        except OSError:
            break
    assert len(held) == 40  # the kernel accepts them; the node closes all but eight

    wait_for(lambda: sum(map(closed_by_node, held)) >= 32, 10, "the node to close the excess")
    assert sum(not closed_by_node(c) for c in held) == 8  # dicom.max_connections_per_address

    slow_result: dict[str, object] = {}

    def trickle() -> None:
        ds = base_dataset(fuzz_uid("slow-study"), 0, rows=64, columns=64)
        raw = RawAssociation("127.0.0.1", server.port, source="127.0.0.3")
        pdus = list(raw.store_pdus(str(ds.SOPInstanceUID), encode(ds), fragment=1200))
        slow_result["pdus"] = len(pdus)
        for pdu in pdus:
            raw.connection.sendall(pdu)
            time.sleep(1.0)
        slow_result["status"] = raw.read_status()
        raw.release()

    trickler = threading.Thread(target=trickle)
    trickler.start()
    try:
        time.sleep(1.5)
        others = storescu(server.port, [_valid_study(tmp_path, 1)[1][0]])
        assert others.returncode == 0, others.stdout + others.stderr
        assert trickler.is_alive()  # the slow one is still going while others are served

        # A PDU header declaring 2 GB, after a valid association: closed, nothing allocated.
        raw = RawAssociation("127.0.0.1", server.port)
        raw.connection.sendall(bytes([0x04, 0]) + (0x7FFFFFF0).to_bytes(4, "big") + bytes(64))
        with pytest.raises(ConnectionError):
            raw.read_pdu()
        raw.connection.close()

        # 300 MB in 1 MB PDUs against max_instance_mb 20: refused, the data dropped as it came.
        raw = RawAssociation("127.0.0.1", server.port)
        chunk = bytes(1024 * 1024 - 64)
        big = base_dataset(fuzz_uid("big-study"), 0)
        pdus = raw.store_pdus(str(big.SOPInstanceUID), encode(big) + chunk * 300,
                              fragment=len(chunk))
        for pdu in pdus:
            raw.connection.sendall(pdu)
        assert raw.read_status() == 0xA700
        raw.release()
    finally:
        trickler.join(timeout=120)
        for connection in held:
            connection.close()
    assert slow_result.get("status") == 0x0000, slow_result
    assert int(slow_result["pdus"]) >= 5  # type: ignore[arg-type]

    peak_kb = _rss_kb(pid, "VmHWM")
    assert peak_kb - baseline_kb < 150 * 1024, (baseline_kb, peak_kb)
    sops = {r[0] for r in server.query("SELECT sop_instance_uid FROM instances")}
    assert str(big.SOPInstanceUID) not in sops and len(sops) == 2

    log = server.log()
    assert "connection refused: too many from one address" in log and "127.0.0.2" in log
    assert "oversized PDU refused" in log and "bytes=2147483632" in log
    assert "larger than dicom.max_instance_mb" in log
    assert "Traceback" not in log
    alerts = [json.loads(line) for line in (server.data_dir / "audit.jsonl").read_text()
              .splitlines() if '"security-alert"' in line]
    assert any(a["peer_address"] == "127.0.0.2" and "too many connections" in a["reason"]
               for a in alerts)
    assert any("2147483632" in a["reason"] for a in alerts)
    assert server.stop() == 0
