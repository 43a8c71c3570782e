"""Shared test helpers: free ports, running ``radlens serve`` as a subprocess, dcmtk wrappers."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom

from radlens.demo.tools import (  # noqa: F401 (re-exported)
    acknowledged_files,
    free_port,
    port_open,
    require_tool,
    system_tool,
    wait_for,
)

TEST_FILES = Path(pydicom.__file__).parent / "data" / "test_files"
RADLENS = [sys.executable, "-m", "radlens.cli"]
REPO = Path(__file__).resolve().parent.parent

# storescu only proposes a compressed syntax when told to, as a modality configured for it would.
STORESCU_OPTION_BY_SYNTAX = {
    "1.2.840.10008.1.2": "-xi",
    "1.2.840.10008.1.2.1": "-xe",
    "1.2.840.10008.1.2.1.99": "-xd",
    "1.2.840.10008.1.2.2": "-xb",
    "1.2.840.10008.1.2.4.50": "-xy",
    "1.2.840.10008.1.2.4.51": "-xx",
    "1.2.840.10008.1.2.4.70": "-xs",
    "1.2.840.10008.1.2.4.80": "-xt",
    "1.2.840.10008.1.2.4.81": "-xu",
    "1.2.840.10008.1.2.4.90": "-xv",
    "1.2.840.10008.1.2.4.91": "-xw",
    "1.2.840.10008.1.2.5": "-xr",
}


@dataclass
class RadlensServer:
    """``radlens serve`` in a subprocess with its own data folder, port and environment."""

    data_dir: Path
    port: int
    env_overrides: dict[str, str] = field(default_factory=dict)
    config_file: Path | None = None
    process: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None
    starts: int = 0

    @property
    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update({
            "RADLENS_STORAGE__DATA_DIR": str(self.data_dir),
            "RADLENS_DICOM__PORT": str(self.port),
            "RADLENS_DICOM__HOST": "127.0.0.1",
            "RADLENS_STORAGE__MIN_FREE_MB": "0",
            "RADLENS_ASSEMBLY__QUIET_PERIOD_S": "1.5",
            "RADLENS_ASSEMBLY__RECOVERY_WAIT_S": "5",
            # One worker process unless a test asks for more: each loads torch and the model,
            # and a hundred agents start in the suite on two cores.
            "RADLENS_WORKER__CONCURRENCY": "1",
            # The density model only where a test reads mammograms (it asks for it): loading
            # it costs each agent 1.5 s of CPU, and some seventy agents start in the suite.
            "RADLENS_DENSITY__ENABLED": "false",
            "RADLENS_DICOM__SHUTDOWN_GRACE_S": "20",
            "PYTHONUNBUFFERED": "1",
        })
        env.update(self.env_overrides)
        return env

    def start(self, wait: bool = True) -> RadlensServer:
        self.starts += 1
        self.log_path = self.data_dir.parent / f"radlens-serve-{self.port}-{self.starts}.log"
        args = [*RADLENS, "serve"]
        if self.config_file is not None:
            args += ["--config", str(self.config_file)]
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(args, env=self.env, stdout=log,
                                            stderr=subprocess.STDOUT)
        if wait:
            wait_for(lambda: port_open(self.port) or self._died(), 30, "radlens to listen")
            if self.process.poll() is not None:
                raise AssertionError(f"radlens serve exited early:\n{self.log()}")
        return self

    def _died(self) -> bool:
        return self.process is not None and self.process.poll() is not None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path else ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(sig)
        return self.process.wait(timeout=timeout)

    def kill9(self) -> None:
        """kill -9 of the agent. Returns once its listener processes, which exit within a
        second of their agent, have let the port go: a restart must not take the old ones,
        still listening, for itself."""
        assert self.process is not None
        self.process.kill()
        self.process.wait(timeout=30)
        wait_for(lambda: not port_open(self.port), 30, "the killed node's listeners to exit")

    def db(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.data_dir / "radlens.sqlite", timeout=30)
        conn.row_factory = sqlite3.Row
        return conn

    def query(self, sql: str, params: Sequence[object] = ()) -> list[sqlite3.Row]:
        conn = self.db()
        try:
            return conn.execute(sql, params).fetchall()
        finally:
            conn.close()

    def jobs_done(self) -> list[sqlite3.Row]:
        return self.query("SELECT * FROM jobs WHERE state IN ('done', 'failed')")

    def findings(self, study_uid: str) -> dict:
        path = self.data_dir / "results" / study_uid / "findings.json"
        return json.loads(path.read_text())


def frames_of(image: dict) -> list[dict]:
    """The frame readings (class probabilities, lesions, saliency) of an image in a stored
    findings.json: the lesion task's entry under ``analyses``."""
    return [frame for analysis in image.get("analyses", [])
            if analysis.get("kind") == "frames" for frame in analysis["frames"]]


def folder_digest(folder: Path) -> str:
    """One SHA-256 over every file's relative path and bytes: equal for identical folders."""
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(path.relative_to(folder).as_posix().encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def dciodvfy_errors(path: Path) -> list[str]:
    """dciodvfy's Error lines for one file (its warnings are not errors)."""
    checked = subprocess.run([require_tool("dciodvfy"), str(path)], capture_output=True,
                             text=True, timeout=60)
    return [line for line in (checked.stdout + checked.stderr).splitlines()
            if line.startswith("Error")]


def storescu(port: int, files: Iterable[Path], *, called_aet: str = "RADLENS",
             calling_aet: str = "STORESCU", extra: Sequence[str] = (),
             timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """One storescu run; the files' own transfer syntax is proposed (grouped by the caller)."""
    args = [require_tool("storescu"), "-v", "-nh", "-aet", calling_aet, "-aec", called_aet,
            *extra, "127.0.0.1", str(port), *[str(f) for f in files]]
    env = dict(os.environ, TCP_NODELAY="1")
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=env)


def storescu_by_syntax(port: int, files: Iterable[Path], *, extra: Sequence[str] = (),
                       **kwargs: object) -> list[subprocess.CompletedProcess[str]]:
    """Send each group of files with the storescu option proposing their transfer syntax
    (and ``extra`` options: -R to propose the files' own SOP classes)."""
    groups: dict[str, list[Path]] = {}
    for path in files:
        syntax = str(pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID)
        groups.setdefault(STORESCU_OPTION_BY_SYNTAX[syntax], []).append(path)
    return [storescu(port, group, extra=[option, *extra], **kwargs)  # type: ignore[arg-type]
            for option, group in groups.items()]


def echoscu(port: int, *, called_aet: str = "RADLENS", calling_aet: str = "ECHOSCU",
            timeout: float = 30) -> subprocess.CompletedProcess[str]:
    args = [require_tool("echoscu"), "-v", "-aet", calling_aet, "-aec", called_aet, "127.0.0.1",
            str(port)]
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout)


def radlens_cli(*args: str, env: dict[str, str] | None = None,
                timeout: float = 120) -> subprocess.CompletedProcess[str]:
    full_env = dict(os.environ)
    full_env.update(env or {})
    return subprocess.run([*RADLENS, *args], capture_output=True, text=True, timeout=timeout,
                          env=full_env)


def train_small_dermoscopy_model(root: Path, *extra: str
                                 ) -> tuple[Path, Path, subprocess.CompletedProcess[str]]:
    """48 dermoscopy phantoms and a model trained on them for two epochs at 32 pixels, through
    the CLI: the real training path, small enough for a test. Returns the data folder, the
    weights folder and the training run (its return code is the caller's to assert)."""
    data, model = root / "data", root / "model"
    made = radlens_cli("phantoms", "--task", "dermoscopy", "--out", str(data), "--n", "48",
                       "--size", "64", "--seed", "3")
    assert made.returncode == 0, made.stderr
    result = radlens_cli("train", "--task", "dermoscopy", "--data", str(data), "--out",
                         str(model), "--epochs", "2", "--batch-size", "8", "--size", "32",
                         "--device", "cpu", *extra, timeout=300)
    return data, model, result


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a node's ``/metrics``, by name and labels."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def healthz(port: int) -> tuple[int, dict]:
    """A node's ``/healthz``: the HTTP status and the JSON body."""
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def closed_by_node(connection: socket.socket) -> bool:
    """Whether the other end closed ``connection`` (on which nothing was ever sent)."""
    connection.settimeout(0.05)
    try:
        return connection.recv(1) == b""
    except TimeoutError:
        return False
    except OSError:
        return True


def ct_slice(path: Path, pixels: np.ndarray, *, study: str, series: str,
             frame_of_reference: str, number: int, z: float,
             pixel_spacing: tuple[float, float], slice_thickness: float,
             **attributes: object) -> Path:
    """One axial CT Image Storage slice (uint16 ``pixels``, identity orientation, at height
    ``z``) written to ``path``; ``attributes`` add or override header attributes."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, ds.file_meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
    ds.Modality, ds.InstanceNumber = "CT", number
    ds.FrameOfReferenceUID = frame_of_reference
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.ImagePositionPatient = [0.0, 0.0, float(z)]
    ds.PixelSpacing, ds.SliceThickness = list(pixel_spacing), slice_thickness
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.RescaleIntercept, ds.RescaleSlope = 0, 1
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    ds.PixelData = np.ascontiguousarray(pixels, dtype=np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path
