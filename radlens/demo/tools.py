"""Finding the real DICOM peers (dcmtk, dicom3tools, Orthanc) on PATH, free ports and waiting:
what the demo and the tests share when they start real peers.

pynetdicom installs console scripts named like dcmtk's tools (storescu, echoscu, storescp...) into
any virtual environment it is installed in, and an activated environment puts them first on
PATH: those are Python scripts, not the peers the tests and the demo mean."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable
from pathlib import Path


def _is_python_script(path: Path) -> bool:
    try:
        with path.open("rb") as handle:
            first = handle.readline(200)
    except OSError:
        return False
    return first.startswith(b"#!") and b"python" in first


def system_tool(name: str) -> str | None:
    """The first executable called ``name`` on PATH that is not a Python console script."""
    for folder in os.environ.get("PATH", os.defpath).split(os.pathsep):
        if not folder:
            continue
        candidate = Path(folder) / name
        if candidate.is_file() and os.access(candidate, os.X_OK) \
                and not _is_python_script(candidate):
            return str(candidate)
    return None


def require_tool(name: str) -> str:
    """The system's tool (see ``system_tool``), or a RuntimeError saying how to install it."""
    path = system_tool(name)
    if path is None:
        raise RuntimeError(f"{name} is not installed: run `make tools` (or `make test`), "
                           "which installs it")
    return path


def acknowledged_files(storescu_output: str) -> list[str]:
    """Files dcmtk's storescu saw answered with Success, from its ``-v`` log (for tests
    and benchmarks that kill the receiver mid-burst)."""
    acked, current = [], None
    for line in storescu_output.splitlines():
        if "Sending file:" in line:
            current = line.split("Sending file:", 1)[1].strip()
        elif "Received Store Response" in line and "(Success)" in line and current:
            acked.append(current)
            current = None
    return acked


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    """True when something accepts TCP connections on the port."""
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def wait_for(predicate: Callable[[], object], timeout: float, what: str,
             interval: float = 0.1) -> object:
    """Poll ``predicate`` until it returns something true (returned) or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
