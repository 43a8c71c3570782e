"""Finding the real DICOM peers (dcmtk, dicom3tools, Orthanc) on PATH.

pynetdicom installs console scripts named like dcmtk's tools (storescu, echoscu, storescp...) into
any virtual environment it is installed in, and an activated environment puts them first on
PATH: those are Python scripts, not the peers the tests and the demo mean."""

from __future__ import annotations

import os
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
