"""Several radlens processes on one PostgreSQL state, each in one role: two listeners behind
HAProxy (TCP mode, checking each listener's /healthz), two workers and a sender, sharing one
data folder. A worker is killed with SIGKILL in the middle of a job and the other finishes it
once its lease runs out; one study's instances arrive through both listeners; a burst of 100
studies comes from four concurrent senders. Every acknowledged instance is stored once, every
study processed once, every output delivered once."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import uuid
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid

from radlens.db import Database, state_url
from tests.helpers import (
    RadlensServer,
    free_port,
    healthz,
    port_open,
    radlens_cli,
    require_tool,
    scrape,
    storescu,
    wait_for,
)

pytestmark = pytest.mark.slow

LEASE_S = 6.0


def _clip(folder: Path, frames: int, seed: int, *, instances: int = 1) -> list[Path]:
    """A phantom US study: ``instances`` multi-frame clips of ``frames`` frames each."""
    from radlens.tasks.breast_us.dicom import us_multiframe_dataset
    from radlens.tasks.breast_us.phantoms import make_phantom

    study, series = generate_uid(), generate_uid()
    paths = []
    for number in range(instances):
        images = np.stack([make_phantom(seed, number * frames + i,
                                        label="malignant" if i % 2 else "benign").image
                           for i in range(frames)])
        ds = us_multiframe_dataset(images, study_uid=study, series_uid=series,
                                   instance_number=number + 1, spacing_cm=0.02,
                                   patient_id=f"CLUSTER{seed}")
        path = folder / f"clip{seed}-{number}.dcm"
        folder.mkdir(parents=True, exist_ok=True)
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def _haproxy(folder: Path, port: int, listeners: list[tuple[int, int]]) -> subprocess.Popen:
    """HAProxy on ``port`` in front of (DICOM port, metrics port) listeners, round robin, as
    deploy/haproxy.cfg but on loopback."""
    servers = "\n".join(f"    server listener-{i} 127.0.0.1:{dicom} check port {metrics}"
                         for i, (dicom, metrics) in enumerate(listeners))
    config = folder / "haproxy.cfg"
    config.write_text(f"""global
    maxconn 1024
defaults
    mode tcp
    retries 3
    option redispatch
    timeout connect 5s
    timeout client 10m
    timeout server 10m
frontend dicom
    bind 127.0.0.1:{port}
    default_backend listeners
backend listeners
    balance roundrobin
    option httpchk GET /healthz
    http-check expect status 200
    default-server inter 500ms fall 2 rise 1
{servers}
""")
    return subprocess.Popen([require_tool("haproxy"), "-db", "-f", str(config)],
                            stdout=(folder / "haproxy.log").open("wb"),
                            stderr=subprocess.STDOUT)


def _received(metrics_port: int) -> float:
    return scrape(metrics_port)[("radlens_instances_received_total", ())]


def test_listeners_workers_and_a_sender_share_the_work_through_a_worker_kill(
        postgres, archive, tmp_path):
    url = state_url(postgres.create_database(f"c{uuid.uuid4().hex[:12]}"), Path("."))
    data_dir = tmp_path / "shared"
    common = {
        "RADLENS_STATE__URL": url,
        "RADLENS_CLUSTER__LEASE_S": str(LEASE_S),
        "RADLENS_CLUSTER__HEARTBEAT_INTERVAL_S": "1",
        "RADLENS_CLUSTER__SWEEP_INTERVAL_S": "0.5",
        "RADLENS_OUTBOX__POLL_INTERVAL_S": "0.3",
        "RADLENS_WORKER__CONCURRENCY": "1",
        # 106 studies: the SEG and SR of each are the outputs this test follows through the
        # cluster; the PDF, overlay and Parametric Map (each tested on its own elsewhere)
        # would double the CPU the two workers need without testing anything more here.
        "RADLENS_OUTPUTS__PDF": "false",
        "RADLENS_OUTPUTS__OVERLAY": "false",
        "RADLENS_OUTPUTS__PARAMETRIC_MAP": "false",
        "RADLENS_DESTINATIONS": (f'[{{"name": "archive", "ae_title": "ARCHIVE", '
                                 f'"host": "127.0.0.1", "port": {archive.port}}}]'),
    }
    nodes: dict[str, RadlensServer] = {}

    metrics_ports: dict[str, int] = {}

    def node(name: str, role: str) -> RadlensServer:
        metrics_ports[name] = free_port()
        server = RadlensServer(data_dir=data_dir, port=free_port(), env_overrides={
            **common, "RADLENS_METRICS__PORT": str(metrics_ports[name])})
        server.log_path = tmp_path / f"{name}.log"
        with open(server.log_path, "wb") as log:
            server.process = subprocess.Popen(
                [*_radlens(), "serve", "--role", role], env=server.env, stdout=log,
                stderr=subprocess.STDOUT)
        nodes[name] = server
        return server

    state = Database(url)
    front = free_port()
    haproxy: subprocess.Popen | None = None
    try:
        listeners = [node("listener-a", "listener"), node("listener-b", "listener")]
        for listener in listeners:
            wait_for(lambda s=listener: port_open(s.port) or s.process.poll() is not None,
                     60, "a listener to listen")
            assert listener.process.poll() is None, listener.log_path.read_text()
        haproxy = _haproxy(tmp_path, front, [(listener.port, metrics_ports[name]) for
                                             name, listener in nodes.items()])
        wait_for(lambda: port_open(front), 20, "HAProxy to listen")
        for name in ("worker-a", "worker-b"):
            node(name, "worker")
        node("sender", "sender")
        wait_for(lambda: state.scalar("SELECT COUNT(*) FROM nodes WHERE stopped_at IS NULL")
                 == 5, 120, "five nodes to register")
        time.sleep(1.5)  # HAProxy's first health checks of both listeners

        # A long study first, so one worker is surely in the middle of it when killed.
        long_study = _clip(tmp_path / "long", 48, seed=1)
        assert storescu(front, long_study).returncode == 0
        wait_for(lambda: state.scalar("SELECT COUNT(*) FROM jobs WHERE state = 'running'")
                 == 1, 60, "a worker to take the long study")
        holder = state.rows("SELECT n.pid, n.id FROM jobs j JOIN nodes n ON n.id = j.claimed_by"
                            " WHERE j.state = 'running'")[0]
        victim = next(name for name, s in nodes.items() if s.process.pid == holder["pid"])
        time.sleep(1.0)
        os.kill(holder["pid"], signal.SIGKILL)
        nodes[victim].process.wait(timeout=30)

        # Meanwhile: a study whose two instances come on two associations, which HAProxy
        # hands to the two listeners in turn (each listener's own counter says which).
        split = _clip(tmp_path / "split", 2, seed=2, instances=2)
        by_listener = []
        for path in split:
            before = [_received(metrics_ports[n]) for n in ("listener-a", "listener-b")]
            assert storescu(front, [path]).returncode == 0
            after = [_received(metrics_ports[n]) for n in ("listener-a", "listener-b")]
            by_listener.append([b - a for a, b in zip(before, after, strict=True)])
        assert sorted(map(tuple, by_listener)) == [(0, 1), (1, 0)]

        # A burst: 100 one-image studies from four concurrent storescu senders.
        made = radlens_cli("phantoms", "--out", str(tmp_path / "burst"), "--n", "100",
                           "--seed", "9", "--dicom")
        assert made.returncode == 0, made.stderr
        burst = sorted((tmp_path / "burst" / "dicom").glob("*/IM0001.dcm"))
        senders = [subprocess.Popen(
            [require_tool("storescu"), "-aec", "RADLENS", "127.0.0.1", str(front),
             *map(str, burst[i::4])], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            env=dict(os.environ, TCP_NODELAY="1")) for i in range(4)]
        for sender in senders:
            output = sender.communicate(timeout=300)[0].decode(errors="replace")
            assert sender.returncode == 0, output

        studies = {str(pydicom.dcmread(p, stop_before_pixels=True).StudyInstanceUID)
                   for p in [*long_study, *split, *burst]}
        assert len(studies) == 102
        received_by = [_received(metrics_ports[n]) for n in ("listener-a", "listener-b")]
        assert sum(received_by) == 103 and min(received_by) > 0

        def done() -> int:
            return state.scalar("SELECT COUNT(*) FROM jobs WHERE state = 'done'")

        wait_for(lambda: done() == 102, 400, "every study to be processed")
        wait_for(lambda: state.scalar("SELECT COUNT(*) FROM outbox WHERE state != 'sent'") == 0,
                 60, "every output to be delivered")
        jobs = state.rows("SELECT study_instance_uid, state, attempts, claimed_by FROM jobs")
        assert sorted(j["study_instance_uid"] for j in jobs) == sorted(studies)  # once each
        taken_over = [j for j in jobs if j["attempts"] == 2]
        assert len(taken_over) == 1 and taken_over[0]["claimed_by"] != holder["id"]
        assert state.scalar("SELECT COUNT(*) FROM instances") == 1 + 2 + 100
        assert state.scalar("SELECT COUNT(*) FROM instances WHERE job_id IS NULL") == 0
        split_study = str(pydicom.dcmread(split[0], stop_before_pixels=True).StudyInstanceUID)
        assert state.scalar("SELECT COUNT(DISTINCT job_id) FROM instances WHERE "
                            "study_instance_uid = :s", {"s": split_study}) == 1
        rows = state.scalar("SELECT COUNT(*) FROM outbox")
        assert rows >= 102  # an SR per study at least
        assert len(archive.files()) == rows  # +uf: a file per C-STORE: none twice
        assert state.scalar("SELECT COUNT(*) FROM jobs WHERE id NOT IN"
                            " (SELECT job_id FROM outbox WHERE job_id IS NOT NULL)") == 0

        # A listener killed with SIGKILL and PostgreSQL restarted: HAProxy sends the next
        # associations to the listener left, and every node carries on.
        nodes["listener-a"].process.kill()
        nodes["listener-a"].process.wait(timeout=30)
        postgres.restart()
        # While PostgreSQL restarts the listener left answers /healthz with 503 and HAProxy
        # takes it out; once its state check passes again, HAProxy's next check (500 ms)
        # puts it back. Sending before that would test HAProxy's empty backend.
        wait_for(lambda: healthz(metrics_ports["listener-b"])[0] == 200, 60,
                 "the listener left to report healthy after the restart")
        time.sleep(1.5)
        later = [path for seed in range(20, 24) for path in _clip(tmp_path / f"l{seed}", 2,
                                                                   seed)]
        for path in later:
            sent = storescu(front, [path])
            assert sent.returncode == 0, sent.stdout + sent.stderr
        wait_for(lambda: done() == 106, 240, "the studies sent after the restart")
        wait_for(lambda: state.scalar("SELECT COUNT(*) FROM outbox WHERE state != 'sent'") == 0,
                 60, "their outputs to be delivered")
        assert len(archive.files()) == state.scalar("SELECT COUNT(*) FROM outbox")
        assert state.scalar("SELECT COUNT(DISTINCT study_instance_uid) FROM jobs") == 106

        status = radlens_cli("status", "--json", env=nodes["sender"].env)
        assert status.returncode == 0, status.stderr
        report = json.loads(status.stdout)
        roles = sorted(n["role"] for n in report["nodes"] if n["alive"])
        assert roles == ["listener", "sender", "worker"]
        silent = sorted(n["id"] for n in report["nodes"] if not n["alive"])
        listener_a = state.scalar("SELECT id FROM nodes WHERE pid = :p",
                                  {"p": nodes["listener-a"].process.pid})
        assert silent == sorted([holder["id"], listener_a])
        assert report["jobs"]["done"] == 106
    finally:
        for server in nodes.values():
            if server.process is not None and server.process.poll() is None:
                server.process.send_signal(signal.SIGTERM)
        for server in nodes.values():
            if server.process is not None:
                try:
                    server.process.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    server.process.kill()
        if haproxy is not None:
            haproxy.terminate()
            haproxy.wait(timeout=10)


def _radlens() -> list[str]:
    from tests.helpers import RADLENS

    return list(RADLENS)


def test_a_cluster_role_on_a_sqlite_state_is_refused(tmp_path):
    env = dict(os.environ, RADLENS_STORAGE__DATA_DIR=str(tmp_path / "data"),
               RADLENS_DICOM__PORT=str(free_port()))
    result = radlens_cli("serve", "--role", "worker", env=env)
    assert result.returncode == 1
    assert "set state.url to a PostgreSQL database" in result.stderr + result.stdout


def test_the_deploy_files_are_valid():
    """deploy/: HAProxy accepts its configuration, and the compose file runs every role."""
    import yaml

    deploy = Path(__file__).resolve().parents[2] / "deploy"
    checked = subprocess.run([require_tool("haproxy"), "-c", "-f", str(deploy / "haproxy.cfg")],
                             capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    compose = yaml.safe_load((deploy / "docker-compose.yml").read_text())
    roles = sorted(service["command"][-1] for service in compose["services"].values()
                   if service.get("image") == "radlens" and "entrypoint" not in service)
    assert roles == ["listener", "listener", "sender", "worker", "worker"]
    workers = [s for s in compose["services"].values()
               if (s.get("command") or [])[-1:] == ["worker"]]
    assert all(w["environment"]["RADLENS_COMPUTE__BACKEND"] == "ray" and
               w["environment"]["RADLENS_STATE__URL"].startswith("postgresql://")
               for w in workers)
    assert compose["services"]["ray-head"]["entrypoint"] == ["ray"]
    assert "postgres" in compose["services"] and "haproxy" in compose["services"]
    audit_paths = [s["environment"]["RADLENS_AUDIT__PATH"] for s in compose["services"].values()
                   if s.get("image") == "radlens" and "entrypoint" not in s]
    assert len(set(audit_paths)) == 5  # one audit trail per node: no shared appends
    from radlens.config import load_settings

    assert load_settings(deploy / "radlens.yaml").dicom.ae_title == "RADLENS"
    # The systemd unit: SIGTERM to the agent alone, which stops its processes in order, within
    # a stop timeout longer than twice the default grace; reload sends SIGHUP.
    import configparser

    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str  # type: ignore[assignment,method-assign]
    unit.read(deploy / "systemd" / "radlens.service")
    service = unit["Service"]
    assert service["ExecStart"].split()[1:3] == ["serve", "--log-format"]
    assert service["KillMode"] == "mixed" and service["ExecReload"].endswith("-HUP $MAINPID")
    from radlens.config import Settings

    assert int(service["TimeoutStopSec"]) > 2 * Settings().dicom.shutdown_grace_s
    rotate = (deploy / "systemd" / "radlens.logrotate").read_text()
    assert "audit.jsonl" in rotate and "systemctl reload radlens" in rotate
