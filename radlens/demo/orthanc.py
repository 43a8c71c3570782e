"""A real Orthanc (Debian's package, DICOMweb plugin) on loopback: the PACS of `make demo` and
of the end-to-end tests. HTTP answers on 127.0.0.1 only (RemoteAccessAllowed false)."""

from __future__ import annotations

import json
import subprocess
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from radlens.demo.tools import free_port, system_tool, wait_for

DICOMWEB_PLUGIN_DIRS = (Path("/usr/share/orthanc/plugins"), Path("/usr/lib/orthanc/plugins"))


def dicomweb_plugin() -> Path:
    for folder in DICOMWEB_PLUGIN_DIRS:
        candidate = folder / "libOrthancDicomWeb.so"
        if candidate.exists():
            return candidate
    raise RuntimeError("Orthanc's DICOMweb plugin is not installed: run `make test`, which "
                       "installs orthanc-dicomweb")


@dataclass
class Orthanc:
    """One Orthanc process with its own storage; ``start`` and ``stop`` may be repeated."""

    folder: Path
    aet: str = "ORTHANC"
    http_port: int = field(default_factory=free_port)
    dicom_port: int = field(default_factory=free_port)
    process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def config(self) -> dict[str, Any]:
        return {
            "Name": "radlens-test",
            "StorageDirectory": str(self.folder / "storage"),
            "IndexDirectory": str(self.folder / "storage"),
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomAet": self.aet,
            "DicomPort": self.dicom_port,
            "DicomCheckCalledAet": True,
            "DicomAlwaysAllowStore": True,
            "UnknownSopClassAccepted": True,
            "Plugins": [str(dicomweb_plugin())],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": True,
                         "WadoRoot": "/wado", "StudiesMetadata": "Full",
                         "SeriesMetadata": "Full"},
            "StableAge": 1,
        }

    def start(self) -> Orthanc:
        self.folder.mkdir(parents=True, exist_ok=True)
        config = self.folder / "orthanc.json"
        config.write_text(json.dumps(self.config(), indent=2))
        log = (self.folder / "orthanc.log").open("ab")
        binary = system_tool("Orthanc")
        if binary is None:
            raise RuntimeError("Orthanc is not installed: apt-get install -y orthanc "
                               "orthanc-dicomweb (make test and make demo do it)")
        self.process = subprocess.Popen([binary, str(config)],
                                        stdout=log, stderr=subprocess.STDOUT)
        wait_for(self._ready, 60, "Orthanc to answer on its REST API")
        return self

    def _ready(self) -> bool:
        if self.process is not None and self.process.poll() is not None:
            raise RuntimeError(f"Orthanc exited: {self.log()[-2000:]}")
        try:
            self.get("/system")
            return True
        except (urllib.error.URLError, ConnectionError, OSError):
            return False

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        self.process = None

    def log(self) -> str:
        path = self.folder / "orthanc.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def get(self, path: str) -> Any:
        with urllib.request.urlopen(self.url + path, timeout=10) as response:
            body = response.read()
        return json.loads(body) if body else None

    def post(self, path: str, payload: Any) -> Any:
        request = urllib.request.Request(self.url + path, data=json.dumps(payload).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read())

    def find_study(self, study_uid: str) -> str | None:
        """Orthanc's id of a study, by StudyInstanceUID."""
        request = urllib.request.Request(self.url + "/tools/lookup", data=study_uid.encode())
        with urllib.request.urlopen(request, timeout=10) as response:
            found = json.loads(response.read())
        return next((item["ID"] for item in found if item["Type"] == "Study"), None)

    def series_by_modality(self, study_uid: str) -> dict[str, list[dict]]:
        """Series of a study (REST), grouped by modality, with their instances' tags."""
        study = self.find_study(study_uid)
        if study is None:
            return {}
        grouped: dict[str, list[dict]] = {}
        for series in self.get(f"/studies/{study}/series"):
            modality = series["MainDicomTags"].get("Modality", "")
            grouped.setdefault(modality, []).append(series)
        return grouped

    def instance_tags(self, instance_id: str) -> dict:
        return self.get(f"/instances/{instance_id}/simplified-tags")
