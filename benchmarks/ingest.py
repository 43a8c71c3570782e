"""Ingest throughput: the same files sent by dcmtk's storescu to storescp and to radlens serve.

Prints a Markdown table (instances/s, MB/s, ratio to storescp) and never fails a build.
Target (issue 2): radlens with durability on >= 0.5x storescp on ~0.5 MB ultrasound frames.
Each round starts every receiver with an empty folder; rounds interleave receivers so that the
machine's drift (disk writeback, a noisy neighbour) hits all of them alike; the best round counts.

    .venv/bin/python benchmarks/ingest.py [--instances 200] [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from radlens.demo.tools import system_tool  # noqa: E402
from radlens.dicom_io.synthetic import write_us_studies  # noqa: E402


def tool(name: str) -> str:
    """dcmtk's tool, not pynetdicom's console script of the same name in a venv on PATH."""
    path = system_tool(name)
    if path is None:
        raise RuntimeError(f"{name} is not installed (dcmtk): make tools")
    return path

BARE_PYNETDICOM_SCP = r'''
import sys
from pathlib import Path
from pynetdicom import AE, AllStoragePresentationContexts, ALL_TRANSFER_SYNTAXES, evt
out = Path(sys.argv[2])
def on_store(event):
    (out / (event.request.AffectedSOPInstanceUID + ".dcm")).write_bytes(event.encoded_dataset())
    return 0
ae = AE("BARE")
for cx in AllStoragePresentationContexts:
    ae.add_supported_context(cx.abstract_syntax, ALL_TRANSFER_SYNTAXES)
ae.start_server(("127.0.0.1", int(sys.argv[1])), evt_handlers=[(evt.EVT_C_STORE, on_store)])
'''


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_listening(port: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"nothing listening on {port}")


def send(port: int, called: str, files: list[Path]) -> float:
    env = dict(os.environ, TCP_NODELAY="1")
    started = time.perf_counter()
    result = subprocess.run([tool("storescu"), "-aec", called, "127.0.0.1", str(port),
                             *map(str, files)], env=env, capture_output=True, text=True)
    elapsed = time.perf_counter() - started
    if result.returncode != 0:
        raise RuntimeError(f"storescu failed: {result.stderr[-500:]}")
    return elapsed


def run_receiver(name: str, files: list[Path], work: Path) -> float:
    """Start the receiver with an empty folder, send every file once, stop it; seconds taken."""
    port = free_port()
    target = work / f"{name}-{time.monotonic_ns()}"
    target.mkdir()
    env = dict(os.environ, TCP_NODELAY="1")  # dcmtk reads it in the receiver too
    if name == "storescp (TCP_NODELAY unset)":
        env.pop("TCP_NODELAY")
        name = "storescp"
    if name == "storescp":
        args = [tool("storescp"), "-aet", "STORESCP", "+xa", "-od", str(target), str(port)]
        called = "STORESCP"
    elif name == "bare pynetdicom":
        args, called = [sys.executable, "-c", BARE_PYNETDICOM_SCP, str(port), str(target)], "BARE"
    else:
        fsync = "true" if "durable" in name else "false"
        env.update(RADLENS_STORAGE__DATA_DIR=str(target), RADLENS_DICOM__PORT=str(port),
                   RADLENS_DICOM__HOST="127.0.0.1", RADLENS_STORAGE__FSYNC=fsync,
                   RADLENS_STORAGE__MIN_FREE_MB="0",
                   # measure ingest alone: the study is assembled after the run
                   RADLENS_ASSEMBLY__QUIET_PERIOD_S="600", RADLENS_LOG__LEVEL="WARNING")
        args, called = [sys.executable, "-m", "radlens.cli", "serve"], "RADLENS"
    process = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    try:
        wait_listening(port)
        time.sleep(0.5)
        return send(port, called, files)
    finally:
        process.terminate()
        process.wait(timeout=60)
        shutil.rmtree(target, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instances", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--receivers", default="storescp,storescp (TCP_NODELAY unset),"
                        "radlens (durable),radlens (no fsync),bare pynetdicom")
    options = parser.parse_args()
    receivers = [r.strip() for r in options.receivers.split(",")]
    with tempfile.TemporaryDirectory(prefix="radlens-bench-") as tmp:
        work = Path(tmp)
        files = list(write_us_studies(work / "input", studies=1,
                                      instances_per_study=options.instances))
        megabytes = sum(f.stat().st_size for f in files) / 1e6
        best: dict[str, float] = {}
        for _ in range(options.rounds):  # interleaved rounds: drift hits every receiver alike
            for name in receivers:
                seconds = run_receiver(name, files, work)
                best[name] = min(best.get(name, float("inf")), seconds)
    dcmtk = subprocess.run(["storescu", "--version"], capture_output=True, text=True)
    print(f"## Ingest: {len(files)} US frames, {megabytes / len(files):.2f} MB each, "
          f"best of {options.rounds}\n")
    print(f"machine: {platform.platform()}, {os.cpu_count()} CPUs; python "
          f"{platform.python_version()}; pynetdicom {version('pynetdicom')}; pydicom "
          f"{version('pydicom')}; {dcmtk.stdout.splitlines()[0].strip('$ ')}\n")
    print("| receiver | seconds | instances/s | MB/s | vs storescp |")
    print("|---|---:|---:|---:|---:|")
    reference = best.get("storescp")
    for name in receivers:
        seconds = best[name]
        ratio = f"{reference / seconds:.2f}x" if reference else "n/a"
        print(f"| {name} | {seconds:.2f} | {len(files) / seconds:.0f} | "
              f"{megabytes / seconds:.0f} | {ratio} |")
    print("\nRatios are against storescp with TCP_NODELAY=1 in its own environment too (the fast,"
          " strict reference); without it dcmtk leaves Nagle on in the receiver and every"
          " response waits on a delayed ACK. Target: radlens (durable) >= 0.50x storescp."
          " storescp writes without fsync; radlens (durable) fsyncs each file and its folder"
          " before Success. storescu always runs with TCP_NODELAY=1.")


if __name__ == "__main__":
    main()
