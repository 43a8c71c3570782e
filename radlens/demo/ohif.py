"""OHIF's prebuilt viewer (npm ``@ohif/app``, which ships ``dist/``) served on loopback, with its
``app-config.js`` pointed at a same-origin proxy to Orthanc's DICOMweb.

Same origin keeps the browser out of CORS, and the viewer never talks to anything but this
server. Used by ``make demo`` and the browser test; not part of the agent.
"""

from __future__ import annotations

import json
import logging
import mimetypes
import shutil
import subprocess
import tarfile
import threading
import urllib.error
import urllib.request
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

log = logging.getLogger(__name__)

OHIF_PACKAGE = "@ohif/app"
OHIF_VERSION = "3.13.2"
PROXIED_PREFIXES = ("/dicom-web/", "/wado")
HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade",
              "proxy-authenticate", "proxy-authorization", "content-length"}

APP_CONFIG = """/** radlens: OHIF reading Orthanc's DICOMweb through this same-origin server. */
window.config = {
  routerBasename: null,
  extensions: [],
  modes: [],
  customizationService: {},
  showStudyList: true,
  maxNumberOfWebWorkers: 2,
  showWarningMessageForCrossOrigin: false,
  showCPUFallbackMessage: false,
  showLoadingIndicator: true,
  strictZSpacingForVolumeViewport: false,
  defaultDataSourceName: 'orthanc',
  investigationalUseDialog: { option: 'never' },
  dataSources: [
    {
      namespace: '@ohif/extension-default.dataSourcesModule.dicomweb',
      sourceName: 'orthanc',
      configuration: {
        friendlyName: 'Orthanc (radlens demo)',
        name: 'orthanc',
        wadoUriRoot: '/wado',
        qidoRoot: '/dicom-web',
        wadoRoot: '/dicom-web',
        qidoSupportsIncludeField: false,
        imageRendering: 'wadors',
        thumbnailRendering: 'wadors',
        enableStudyLazyLoad: true,
        supportsFuzzyMatching: false,
        supportsWildcard: true,
        staticWado: false,
        singlepart: 'bulkdata,video',  // PDFs as bulk data: Orthanc cannot render them
        bulkDataURI: { enabled: true, relativeResolution: 'studies' },
        omitQuotationForMultipartRequest: true,
      },
    },
  ],
};
"""


def fetch_ohif(cache: Path, version: str = OHIF_VERSION) -> Path:
    """OHIF's ``dist/`` from the npm registry (``npm pack``: the tarball only, none of its
    dependencies), unpacked once into ``cache``."""
    dist = cache / f"ohif-app-{version}" / "dist"
    if (dist / "index.html").exists():
        return dist
    npm = shutil.which("npm")
    if npm is None:
        raise RuntimeError("npm is not installed: OHIF's viewer comes from the npm registry")
    cache.mkdir(parents=True, exist_ok=True)
    packed = subprocess.run([npm, "pack", f"{OHIF_PACKAGE}@{version}", "--silent"], cwd=cache,
                            capture_output=True, text=True, timeout=600, check=False)
    if packed.returncode != 0:
        raise RuntimeError(f"npm pack {OHIF_PACKAGE}@{version} failed: {packed.stderr.strip()}")
    tarball = cache / packed.stdout.strip().splitlines()[-1]
    target = cache / f"ohif-app-{version}"
    partial = cache / f".ohif-app-{version}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    with tarfile.open(tarball) as archive:
        archive.extractall(partial, filter="data")
    shutil.rmtree(target, ignore_errors=True)
    (partial / "package").rename(target)
    shutil.rmtree(partial, ignore_errors=True)
    tarball.unlink(missing_ok=True)
    return dist


class OhifServer:
    """Serves ``dist`` with a generated app-config.js, proxies DICOMweb to ``upstream``, and
    answers any other unknown path with index.html (OHIF routes in the browser)."""

    def __init__(self, dist: Path, upstream: str, *, port: int = 0) -> None:
        self.dist = dist.resolve()
        self.upstream = upstream.rstrip("/")
        handler = _handler(self.dist, self.upstream)
        self.httpd = ThreadingHTTPServer(("127.0.0.1", port), handler)
        self.httpd.daemon_threads = True
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="ohif",
                                        daemon=True)

    @property
    def port(self) -> int:
        return int(self.httpd.server_address[1])

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def viewer_url(self, study_instance_uid: str) -> str:
        return f"{self.url}/viewer?StudyInstanceUIDs={study_instance_uid}"

    def start(self) -> OhifServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def _handler(dist: Path, upstream: str) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002
            log.debug("ohif http " + format, *args)

        def do_GET(self) -> None:  # noqa: N802
            if self.path.startswith(PROXIED_PREFIXES):
                self._proxy()
            elif self.path.split("?")[0] == "/app-config.js":
                self._send(HTTPStatus.OK, APP_CONFIG.encode(), "application/javascript")
            else:
                self._static()

        def do_POST(self) -> None:  # noqa: N802
            if self.path.startswith(PROXIED_PREFIXES):
                self._proxy()
            else:
                self._send(HTTPStatus.METHOD_NOT_ALLOWED, b"", "text/plain")

        def _static(self) -> None:
            relative = self.path.split("?")[0].split("#")[0].lstrip("/")
            candidate = (dist / relative).resolve()
            if not candidate.is_relative_to(dist) or not candidate.is_file():
                candidate = dist / "index.html"  # a viewer route: the app handles it
            kind = mimetypes.guess_type(candidate.name)[0] or "application/octet-stream"
            if candidate.suffix in (".js", ".mjs"):
                kind = "application/javascript"
            elif candidate.suffix == ".wasm":
                kind = "application/wasm"
            self._send(HTTPStatus.OK, candidate.read_bytes(), kind)

        def _proxy(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else None
            # The browser's Host goes through: Orthanc writes the BulkDataURIs of its metadata
            # from it, so they point back at this same-origin server.
            headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
            request = urllib.request.Request(upstream + self.path, data=body, headers=headers,
                                             method=self.command)
            try:
                with urllib.request.urlopen(request, timeout=120) as response:
                    payload, status = response.read(), response.status
                    reply_headers = response.headers.items()
            except urllib.error.HTTPError as exc:
                payload, status, reply_headers = exc.read(), exc.code, exc.headers.items()
            except (urllib.error.URLError, OSError) as exc:
                message = json.dumps({"error": f"PACS unreachable: {exc}"}).encode()
                self._send(HTTPStatus.BAD_GATEWAY, message, "application/json")
                return
            self.send_response(status)
            for key, value in reply_headers:
                if key.lower() not in HOP_BY_HOP:
                    self.send_header(key, value)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def _send(self, status: HTTPStatus, payload: bytes, kind: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

    return Handler
