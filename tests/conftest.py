from __future__ import annotations

import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.helpers import RadlensServer, free_port, port_open, require_tool, wait_for


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
