"""``/healthz`` and Prometheus ``/metrics`` of a running agent, read over real HTTP while it
receives, processes and delivers a study."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

from tests.helpers import free_port, healthz, port_open, radlens_cli, scrape, storescu, wait_for


def test_health_and_metrics_follow_a_study_from_receipt_to_delivery(server_factory, archive,
                                                                    tmp_path):
    metrics_port = free_port()
    server = server_factory(
        RADLENS_METRICS__PORT=str(metrics_port),
        RADLENS_DESTINATIONS=json.dumps([{"name": "archive", "ae_title": "ARCHIVE",
                                          "host": "127.0.0.1", "port": archive.port}]),
        RADLENS_OUTBOX__POLL_INTERVAL_S="0.2").start()
    wait_for(lambda: port_open(metrics_port), 20, "the metrics port")
    status, body = healthz(metrics_port)
    assert status == 200 and body["status"] == "ok" and body["role"] == "all"
    # The listeners, workers and sender run as processes of their own; each is watched.
    assert body["checks"] == {"state": True, "scheduler": True, "listener": True,
                              "worker": True, "sender": True}
    before = scrape(metrics_port)
    assert before[("radlens_state_up", ())] == 1
    assert before[("radlens_instances_received_total", ())] == 0
    assert before[("radlens_nodes_alive", (("role", "all"),))] == 1

    made = radlens_cli("phantoms", "--out", str(tmp_path / "ph"), "--n", "1", "--seed",
                       "5", "--dicom")
    assert made.returncode == 0, made.stderr
    files = sorted((tmp_path / "ph" / "dicom").glob("*/IM0001.dcm"))
    assert storescu(server.port, files).returncode == 0
    wait_for(lambda: len(server.jobs_done()) == 1, 120, "the study to be processed")
    wait_for(lambda: server.query("SELECT COUNT(*) FROM outbox WHERE state != 'sent'")[0][0]
             == 0, 60, "the outputs to be delivered")
    sent = server.query("SELECT COUNT(*) FROM outbox")[0][0]
    after = scrape(metrics_port)
    assert after[("radlens_instances_received_total", ())] == 1
    assert after[("radlens_jobs", (("state", "done"),))] == 1
    assert after[("radlens_jobs_finished_total", (("outcome", "done"),))] == 1
    assert after[("radlens_study_turnaround_seconds_count", ())] == 1
    assert 0 < after[("radlens_study_turnaround_seconds_sum", ())] < 120
    assert after[("radlens_outbox", (("destination", "archive"), ("state", "sent")))] \
        == sent >= 2
    assert after[("radlens_deliveries_total", (("destination", "archive"),
                                               ("outcome", "sent")))] == sent
    assert after[("radlens_instances_waiting", ())] == 0
    try:
        urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/other", timeout=10)
        raise AssertionError("an unknown path must be 404")
    except urllib.error.HTTPError as error:
        assert error.code == 404
    assert server.stop() == 0
    assert not port_open(metrics_port)
    assert len(archive.files()) == sent
