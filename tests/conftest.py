from __future__ import annotations

import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.helpers import RadlensServer, free_port, port_open, require_tool, wait_for

# Seconds each module took when the suite last ran in one process (pytest --durations=0 on the
# 2-core machine; the cluster's as it took beside others). The suite runs under pytest-xdist,
# whole modules per worker (pyproject's addopts), and a module that starts last decides when the
# suite ends: the longest go first. A module not listed runs after these; re-measure when one
# grows past a minute.
MODULE_SECONDS = {
    "integration/test_ohif_viewer.py": 174, "integration/test_cluster_roles.py": 150,
    "integration/test_isolation.py": 120, "integration/test_models.py": 85,
    "integration/test_agent_model.py": 80, "unit/test_saliency.py": 63,
    "integration/test_demo.py": 62, "integration/test_ray_compute.py": 61,
    "integration/test_durability.py": 51, "integration/test_listener_processes.py": 50,
    "integration/test_hostile_input.py": 49, "integration/test_clip_weights.py": 47,
    "integration/test_associations.py": 43, "integration/test_security.py": 42,
    "integration/test_orthanc_e2e.py": 40, "integration/test_llm.py": 38,
    "integration/test_real_traffic.py": 37, "integration/test_bad_input.py": 36,
    "integration/test_dicom_outputs.py": 34, "integration/test_outbox.py": 34,
    "integration/test_corpus.py": 33, "integration/test_retention.py": 29,
    "integration/test_store.py": 27, "unit/test_density.py": 26,
    "integration/test_mammography.py": 26, "integration/test_delivery.py": 26,
    "integration/test_postgres_state.py": 23, "integration/test_retraction.py": 16,
    "integration/test_health_metrics.py": 14, "integration/test_task_plugins.py": 55,
}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The longest modules first, each module's tests together and in their own order."""
    def weight(item: pytest.Item) -> int:
        return -MODULE_SECONDS.get(f"{item.path.parent.name}/{item.path.name}", 0)

    items.sort(key=weight)  # stable: within a module (and among the unlisted) order stays


@pytest.fixture
def server_factory(tmp_path: Path) -> Iterator:
    """Make ``radlens serve`` subprocesses; every one started is stopped at the end."""
    servers: list[RadlensServer] = []

    def make(**env: str) -> RadlensServer:
        data_dir = tmp_path / f"data{len(servers)}"
        server = RadlensServer(data_dir=data_dir, port=free_port(), env_overrides=dict(env))
        servers.append(server)
        return server

    yield make
    for server in servers:
        if server.process is not None and server.process.poll() is None:
            server.process.kill()
            server.process.wait(timeout=30)


@pytest.fixture
def server(server_factory) -> RadlensServer:
    return server_factory().start()


@pytest.fixture(scope="session")
def postgres():
    """A throw-away PostgreSQL cluster for the session (Debian's package, loopback, a free
    port); outside pytest's private tmp folders, since it runs as the postgres user."""
    from radlens.demo.postgres import ThrowawayPostgres

    cluster = ThrowawayPostgres(Path(tempfile.mkdtemp(prefix="radlens-pg-")))
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.remove()


@dataclass
class Archive:
    port: int
    folder: Path

    def files(self) -> list[Path]:
        return sorted(self.folder.iterdir())


@pytest.fixture
def archive(tmp_path: Path) -> Iterator[Archive]:
    """A dcmtk storescp destination (AE ARCHIVE) on a free port that accepts every transfer
    syntax and writes a file per C-STORE (+uf), so a file sent twice shows up twice."""
    folder = tmp_path / "archive"
    folder.mkdir()
    port = free_port()
    process = subprocess.Popen([require_tool("storescp"), "-aet", "ARCHIVE", "--fork", "+xa",
                                "+uf", "-od", str(folder), str(port)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: port_open(port), 20, "storescp to listen")
        yield Archive(port, folder)
    finally:
        process.terminate()
        process.wait(timeout=10)
