from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import RadlensServer, free_port


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
