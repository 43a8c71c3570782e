"""``make demo``: Orthanc (the PACS), OHIF (the viewer) and the agent on loopback; a phantom study
pushed with storescu; its answer shown in the terminal and in the browser.

    python -m radlens.demo run [--exit]     start everything, push, wait, print the OHIF URL
    python -m radlens.demo fetch-ohif       download OHIF's prebuilt viewer into .cache/ohif
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

from rich.console import Console

from radlens.demo.ohif import OhifServer, fetch_ohif
from radlens.demo.orthanc import Orthanc
from radlens.demo.tools import free_port, port_open, system_tool, wait_for

REPO = Path(__file__).resolve().parents[2]
CACHE = REPO / ".cache" / "ohif"
console = Console(highlight=False, soft_wrap=True)


def say(text: object = "") -> None:
    console.print(str(text), markup=False)


def _port(preferred: int) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", preferred))
            return preferred
        except OSError:
            return free_port()


def _storescu(aet: str, port: int, files: list[Path]) -> None:
    storescu = system_tool("storescu")
    if storescu is None:
        raise RuntimeError("dcmtk's storescu is not installed: apt-get install -y dcmtk")
    say(f"$ storescu -aec {aet} 127.0.0.1 {port} {' '.join(str(f) for f in files)}")
    subprocess.run([storescu, "-aec", aet, "127.0.0.1", str(port), *map(str, files)],
                   check=True, timeout=120)


def _phantom_study(folder: Path) -> Path:
    """The phantom with the largest lesion among a few held-out cases."""
    from radlens.tasks.breast_us.dicom import write_phantom_study
    from radlens.tasks.breast_us.phantoms import make_phantom

    phantom = max((make_phantom(321, index) for index in range(8)),
                  key=lambda p: int((p.mask > 0).sum()))
    return write_phantom_study(folder, phantom.image, spacing_mm=0.2, case_id="demo",
                               patient_id="DEMO-0001", uid_seed="radlens demo")


def _summary(findings: dict) -> list[str]:
    """What the demo's lesion task read, from findings.json (either schema)."""
    from radlens.findings import FrameReadings, StudyFindings

    study = StudyFindings.model_validate(findings)
    lines = []
    for image in study.images:
        for reading in image.analyses:
            if not isinstance(reading, FrameReadings):
                continue
            lines.append(f"model {reading.model.name} {reading.model.version}")
            for frame in reading.frames:
                probabilities = frame.class_probabilities
                lines.append(f"image: {frame.predicted_class} (normal "
                             f"{probabilities.normal:.2f}, benign "
                             f"{probabilities.benign:.2f}, malignant "
                             f"{probabilities.malignant:.2f})")
                for lesion in frame.lesions:
                    lines.append(f"  lesion {lesion.index}: {lesion.lesion_class}, "
                                 f"{lesion.longest_diameter_mm:.1f} x "
                                 f"{lesion.perpendicular_diameter_mm:.1f} mm, area "
                                 f"{lesion.area_mm2:.1f} mm², probability "
                                 f"{lesion.probability:.2f}")
    return lines


def run(exit_when_done: bool) -> int:
    work = Path(tempfile.mkdtemp(prefix="radlens-demo-"))
    orthanc = Orthanc(work / "orthanc", http_port=_port(8042), dicom_port=_port(4242))
    agent_port = _port(int(os.environ.get("DEMO_PORT", "11112")))
    agent: subprocess.Popen | None = None
    viewer: OhifServer | None = None
    try:
        say(f"demo folder: {work}")
        orthanc.start()
        say(f"Orthanc (PACS): {orthanc.url}, DICOM {orthanc.aet}@127.0.0.1:"
            f"{orthanc.dicom_port}")
        viewer = OhifServer(fetch_ohif(CACHE), orthanc.url, port=_port(3000)).start()
        env = dict(os.environ,
                   RADLENS_STORAGE__DATA_DIR=str(work / "data"),
                   RADLENS_DICOM__HOST="127.0.0.1", RADLENS_DICOM__PORT=str(agent_port),
                   RADLENS_ASSEMBLY__QUIET_PERIOD_S="2", RADLENS_OUTBOX__POLL_INTERVAL_S="0.5",
                   RADLENS_DESTINATIONS=json.dumps([{"name": "orthanc", "ae_title": orthanc.aet,
                                                     "host": "127.0.0.1",
                                                     "port": orthanc.dicom_port}]))
        log = (work / "radlens.log").open("wb")
        agent = subprocess.Popen([sys.executable, "-m", "radlens.cli", "serve"], env=env,
                                 stdout=log, stderr=subprocess.STDOUT)

        def listening() -> bool:
            if agent is not None and agent.poll() is not None:
                raise RuntimeError(f"radlens serve exited; see {work / 'radlens.log'}")
            return port_open(agent_port)

        wait_for(listening, 120, "radlens to listen")
        say(f"radlens: RADLENS@127.0.0.1:{agent_port}, log {work / 'radlens.log'}")

        source = _phantom_study(work / "study")
        _storescu(orthanc.aet, orthanc.dicom_port, [source])  # the modality sends to the PACS
        _storescu("RADLENS", agent_port, [source])  # ... and to radlens
        import pydicom

        study_uid = pydicom.dcmread(source, stop_before_pixels=True).StudyInstanceUID

        outputs = work / "data" / "results" / study_uid / "dicom"

        def answered() -> bool:
            """Every object radlens wrote for the study is in Orthanc, beside the source."""
            written = list(outputs.glob("revision-*/*.dcm"))
            study = orthanc.find_study(study_uid)
            if not written or study is None:
                return False
            return len(orthanc.get(f"/studies/{study}/instances")) == len(written) + 1

        wait_for(answered, 300, "radlens's SEG, SR and maps to reach Orthanc")
        findings = json.loads((work / "data" / "results" / study_uid / "findings.json")
                              .read_text())
        say("\nradlens found:")
        for line in _summary(findings):
            say(f"  {line}")
        series = orthanc.series_by_modality(study_uid)
        say("\nin Orthanc, study " + study_uid + ": "
              + ", ".join(f"{k} x{len(v)}" for k, v in sorted(series.items())))
        say(f"\nopen in OHIF: {viewer.viewer_url(study_uid)}")
        say("  (double-click SEG, SR or the saliency overlay in the left panel)")
        if not exit_when_done:
            say("\nPress Ctrl-C to stop the demo.")
            signal.sigwait({signal.SIGINT, signal.SIGTERM})
        return 0
    finally:
        if agent is not None and agent.poll() is None:
            agent.send_signal(signal.SIGTERM)
            try:
                agent.wait(timeout=30)
            except subprocess.TimeoutExpired:
                agent.kill()
        if viewer is not None:
            viewer.stop()
        orthanc.stop()


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m radlens.demo")
    commands = parser.add_subparsers(dest="command", required=True)
    run_parser = commands.add_parser("run", help="start the demo")
    run_parser.add_argument("--exit", action="store_true",
                            help="stop once the results are in (for tests)")
    commands.add_parser("fetch-ohif", help="download OHIF's prebuilt viewer")
    args = parser.parse_args()
    if args.command == "fetch-ohif":
        say(fetch_ohif(CACHE))
        return 0
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    return run(args.exit)


if __name__ == "__main__":
    sys.exit(main())
