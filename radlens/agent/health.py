"""Health and metrics of one node, over HTTP on a port of its own (``metrics.port``; off by
default): ``/healthz`` for a load balancer or an orchestrator, ``/metrics`` for Prometheus.

What the node did itself (instances received, jobs finished, each study's turnaround,
deliveries) is counted in process; what the cluster holds (jobs by state, the outbox by
destination, instances waiting, nodes alive) is read from the state database at each scrape,
so every node reports the same queues.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, make_server

import sqlalchemy as sa
from prometheus_client import CollectorRegistry, Counter, Histogram, make_wsgi_app
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import ThreadingWSGIServer
from prometheus_client.registry import Collector

from radlens.agent.nodes import heard_since
from radlens.db import Database, instances, jobs, nodes, outbox
from radlens.logs import kv

log = logging.getLogger(__name__)

TURNAROUND_BUCKETS = (1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1800, 3600)
Check = Callable[[], bool]


class StateCollector(Collector):
    """The cluster's queues, read from the state database when Prometheus scrapes."""

    def __init__(self, db: Database, heartbeat_interval_s: float) -> None:
        self.db = db
        self.heartbeat_interval_s = heartbeat_interval_s

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("radlens_state_up", "1 when the state database answered this "
                               "scrape")
        try:
            with self.db.read() as conn:
                families = list(self._families(conn))
        except sa.exc.SQLAlchemyError as exc:
            log.warning("metrics: state database unreachable", extra=kv(error=str(exc)))
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        yield from families

    def _families(self, conn: sa.Connection) -> Iterable[Metric]:
        by_state = GaugeMetricFamily("radlens_jobs", "Study jobs by state", labels=["state"])
        counts = dict(conn.execute(sa.select(jobs.c.state, sa.func.count())
                                   .group_by(jobs.c.state)).all())
        for state in ("queued", "running", "done", "failed"):
            by_state.add_metric([state], counts.get(state, 0))
        yield by_state
        queued = GaugeMetricFamily("radlens_outbox", "Outbox rows by destination and state",
                                   labels=["destination", "state"])
        for destination, state, count in conn.execute(
                sa.select(outbox.c.destination, outbox.c.state, sa.func.count())
                .group_by(outbox.c.destination, outbox.c.state)):
            queued.add_metric([destination, state], count)
        yield queued
        waiting = GaugeMetricFamily("radlens_instances_waiting",
                                    "Instances received whose study is not complete yet")
        waiting.add_metric([], conn.execute(sa.select(sa.func.count()).select_from(instances)
                                            .where(instances.c.job_id.is_(None))).scalar_one())
        yield waiting
        alive = GaugeMetricFamily("radlens_nodes_alive", "Nodes whose heartbeat is recent",
                                  labels=["role"])
        since = heard_since(time.time(), self.heartbeat_interval_s)
        for role, count in conn.execute(
                sa.select(nodes.c.role, sa.func.count())
                .where(nodes.c.stopped_at.is_(None), nodes.c.heartbeat_at > since)
                .group_by(nodes.c.role)):
            alive.add_metric([role], count)
        yield alive


@dataclass
class NodeMetrics:
    """This node's counters, in a registry of its own (several agents may share a process
    in tests)."""

    registry: CollectorRegistry = field(default_factory=lambda: CollectorRegistry())

    def __post_init__(self) -> None:
        self.received = Counter("radlens_instances_received",
                                "Instances this node stored and acknowledged",
                                registry=self.registry)
        self.jobs_finished = Counter("radlens_jobs_finished", "Jobs this node finished",
                                     ["outcome"], registry=self.registry)
        self.turnaround = Histogram(
            "radlens_study_turnaround_seconds",
            "From a study's last instance received to its job done, its outputs queued",
            buckets=TURNAROUND_BUCKETS, registry=self.registry)
        self.deliveries = Counter("radlens_deliveries", "Files this node sent, by outcome",
                                  ["destination", "outcome"], registry=self.registry)
        self.workers_lost = Counter(
            "radlens_worker_processes_lost",
            "Worker processes killed at a limit or dead while running a job, by cause",
            ["cause"], registry=self.registry)

    def delivered(self, destination: str, outcome: str, count: int) -> None:
        if count:
            self.deliveries.labels(destination, outcome).inc(count)


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (the base's name)
        log.debug("http " + format % args)


class HealthServer:
    """``/healthz`` (200 when every check passes, else 503, with the checks as JSON) and
    ``/metrics`` on ``host:port``, served from a thread."""

    def __init__(self, host: str, port: int, *, role: str, node_id: str,
                 registry: CollectorRegistry, checks: dict[str, Check]) -> None:
        self.role, self.node_id, self.checks = role, node_id, checks
        self._metrics_app = make_wsgi_app(registry)
        self._server = make_server(host, port, self._app, ThreadingWSGIServer,
                                   handler_class=_QuietHandler)
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        name="radlens-health", daemon=True)

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def start(self) -> HealthServer:
        self._thread.start()
        log.info("health and metrics served", extra=kv(port=self.port, role=self.role))
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def health(self) -> tuple[bool, dict[str, Any]]:
        results = {}
        for name, check in self.checks.items():
            try:
                results[name] = bool(check())
            except Exception as exc:  # a check that cannot run has failed
                log.warning("health check failed", extra=kv(check=name, error=str(exc)))
                results[name] = False
        healthy = all(results.values())
        return healthy, {"status": "ok" if healthy else "unhealthy", "role": self.role,
                         "node": self.node_id, "checks": results}

    def _app(self, environ: dict[str, Any], start_response: Callable) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path == "/metrics":
            return self._metrics_app(environ, start_response)
        if path == "/healthz":
            healthy, body = self.health()
            start_response("200 OK" if healthy else "503 Service Unavailable",
                           [("Content-Type", "application/json")])
            return [json.dumps(body).encode()]
        start_response("404 Not Found", [("Content-Type", "text/plain")])
        return [b"radlens serves /healthz and /metrics\n"]


def state_answers(db: Database) -> Check:
    def check() -> bool:
        return db.scalar("SELECT 1") == 1

    return check
