from __future__ import annotations

import os
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.helpers import RadlensServer, free_port, port_open, require_tool, wait_for

# Under pytest-xdist every worker (and every agent a test starts) is one of several processes
# on few cores: torch's (and ITK's) default of a thread per core would run twice as many
# threads as there are cores. One thread each, set before any test imports torch or
# SimpleITK; a value the caller set stands.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", "1")  # SimpleITK's too

# Seconds each module took in the whole suite (pytest --durations=0 on the 2-core machine,
# 2026-12-07), each beside the others. The suite runs under pytest-xdist, whole modules per
# worker (pyproject's addopts), and a module that starts last decides when the suite ends: the
# longest go first. A module not listed runs after these; re-measure when one
# grows past a minute.
MODULE_SECONDS = {
    "integration/test_models.py": 263, "integration/test_ohif_viewer.py": 300,
    "integration/test_isolation.py": 197, "integration/test_cluster_roles.py": 162,
    "integration/test_agent_model.py": 154, "unit/test_saliency.py": 153,
    "integration/test_durability.py": 108, "integration/test_dicom_outputs.py": 105,
    "integration/test_outbox.py": 95, "integration/test_security.py": 94,
    "integration/test_llm.py": 89, "integration/test_listener_processes.py": 88,
    "integration/test_real_traffic.py": 84, "integration/test_clip_weights.py": 83,
    "integration/test_corpus.py": 73, "integration/test_demo.py": 70,
    "integration/test_associations.py": 69, "unit/test_density.py": 67,
    "integration/test_bad_input.py": 66, "integration/test_ray_compute.py": 65,
    "integration/test_orthanc_e2e.py": 60, "integration/test_hostile_input.py": 56,
    "integration/test_store.py": 45, "integration/test_retention.py": 40,
    "unit/test_dataset_layouts.py": 39, "integration/test_postgres_state.py": 38,
    "integration/test_delivery.py": 37, "unit/test_models.py": 36,
    "integration/test_task_plugins.py": 27, "integration/test_mammography.py": 27,
    "unit/test_config.py": 26, "unit/test_mammo_phantoms.py": 19,
    "integration/test_dermoscopy.py": 95, "unit/test_dermoscopy_segmentation.py": 20,
    "integration/test_retraction.py": 19, "integration/test_health_metrics.py": 19,
    "unit/test_brain_mri_registration.py": 30, "unit/test_brain_mri_dicom.py": 12,
    "unit/test_brain_mri_network.py": 10, "unit/test_brain_mri_phantoms.py": 10,
    "unit/test_brain_mri_training.py": 9,
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
