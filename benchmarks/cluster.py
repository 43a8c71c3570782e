"""Cluster throughput: studies per hour with 1, 2 and 4 worker processes on one PostgreSQL state,
beside a single node (``radlens serve``, SQLite) on the same studies.

A throw-away PostgreSQL (Debian's package) and a listener node run on loopback; the workers
(``radlens serve --role worker``, model on the CPU unless ``--device``) are started, the
studies (one-image phantom ultrasound, a lesion in most) pushed with ``storescu``, and the
clock runs from the first job queued to the last job done, read from the jobs table. No
destination is configured: delivery is the senders' work, measured by the ingest benchmark.
Prints a Markdown table and never fails a build.

    .venv/bin/python benchmarks/cluster.py [--studies 24] [--workers 1,2,4] [--device cpu]

Target (issue 12): near-linear up to the machine's cores.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from radlens.db import Database, state_url  # noqa: E402
from radlens.demo.postgres import ThrowawayPostgres  # noqa: E402
from radlens.demo.tools import free_port, port_open, require_tool, wait_for  # noqa: E402

QUIET_PERIOD_S = 1.0


def serve(role: str, env: dict[str, str], log: Path) -> subprocess.Popen:
    log.parent.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen([sys.executable, "-m", "radlens.cli", "serve", "--role", role],
                            env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT)


def stop(processes: list[subprocess.Popen]) -> None:
    for process in processes:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
    for process in processes:
        try:
            process.wait(timeout=120)
        except subprocess.TimeoutExpired:
            process.kill()


def push(port: int, files: list[Path]) -> None:
    sent = subprocess.run([require_tool("storescu"), "-aec", "RADLENS", "127.0.0.1", str(port),
                           *map(str, files)], capture_output=True, text=True,
                          env=dict(os.environ, TCP_NODELAY="1"))
    if sent.returncode != 0:
        raise RuntimeError(f"storescu failed: {sent.stderr[-500:]}")


def base_env(work: Path, device: str) -> dict[str, str]:
    return dict(os.environ, RADLENS_STORAGE__DATA_DIR=str(work / "data"),
                RADLENS_DICOM__HOST="127.0.0.1", RADLENS_STORAGE__MIN_FREE_MB="0",
                RADLENS_MODEL__DEVICE=device, RADLENS_ASSEMBLY__QUIET_PERIOD_S=str(QUIET_PERIOD_S),
                RADLENS_CLUSTER__SWEEP_INTERVAL_S="0.5", RADLENS_WORKER__CONCURRENCY="1")


def single_node(work: Path, files: list[Path], device: str) -> float:
    port = free_port()
    env = dict(base_env(work, device), RADLENS_DICOM__PORT=str(port))
    agent = serve("all", env, work / "single.log")
    try:
        wait_for(lambda: port_open(port), 120, "radlens to listen")
        push(port, files[:1])  # warm-up: the one-time imports are paid before the clock
        wait_for(lambda: _done(work / "data" / "radlens.sqlite") >= 1, 300, "the warm-up job")
        db = Database(work / "data" / "radlens.sqlite")
        before = db.scalar("SELECT MAX(id) FROM jobs")
        push(port, files[1:])
        wait_for(lambda: db.scalar("SELECT COUNT(*) FROM jobs WHERE id > :b AND state IN "
                                   "('done', 'failed')", {"b": before}) >= len(files) - 1,
                 900, "the single node's jobs")
        first, last = db.rows("SELECT MIN(created_at) AS first, MAX(finished_at) AS last"
                              " FROM jobs WHERE id > :b", {"b": before})[0].values()
        return float(last - first)
    finally:
        stop([agent])


def _done(path: Path) -> int:
    if not path.is_file():
        return 0
    return int(Database(path).scalar("SELECT COUNT(*) FROM jobs WHERE state = 'done'"))


def threads_per_worker(workers: int) -> int:
    """Each worker's share of the cores (model.threads), as a deployment on one machine sets."""
    return max(1, (os.cpu_count() or 1) // workers)


def cluster(work: Path, postgres: ThrowawayPostgres, files: list[Path], workers: int,
            device: str) -> float:
    url = state_url(postgres.create_database(f"b{uuid.uuid4().hex[:10]}"), work)
    port = free_port()
    env = dict(base_env(work, device), RADLENS_STATE__URL=url, RADLENS_DICOM__PORT=str(port),
               RADLENS_MODEL__THREADS=str(threads_per_worker(workers)))
    processes = [serve("listener", env, work / "listener.log")]
    try:
        wait_for(lambda: port_open(port), 120, "the listener")
        processes += [serve("worker", env, work / f"worker{i}.log") for i in range(workers)]
        db = Database(url)
        wait_for(lambda: db.scalar("SELECT COUNT(*) FROM nodes WHERE role = 'worker' AND "
                                   "stopped_at IS NULL") == workers, 120, "the workers")
        push(port, files[:workers])  # warm-up: each worker's first job pays its imports
        wait_for(lambda: db.scalar("SELECT COUNT(*) FROM jobs WHERE state = 'done'")
                 >= workers, 300, "the warm-up jobs")
        before = db.scalar("SELECT MAX(id) FROM jobs")
        push(port, files[workers:])
        count = len(files) - workers
        wait_for(lambda: db.scalar("SELECT COUNT(*) FROM jobs WHERE id > :b AND state IN "
                                   "('done', 'failed')", {"b": before}) >= count, 900,
                 f"{count} jobs on {workers} workers")
        first, last = db.rows("SELECT MIN(created_at) AS first, MAX(finished_at) AS last"
                              " FROM jobs WHERE id > :b", {"b": before})[0].values()
        return float(last - first)
    finally:
        stop(processes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--studies", type=int, default=24)
    parser.add_argument("--workers", default="1,2,4")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    counts = [int(n) for n in args.workers.split(",")]
    root = Path(tempfile.mkdtemp(prefix="radlens-cluster-"))
    postgres = ThrowawayPostgres(Path(tempfile.mkdtemp(prefix="radlens-pg-")))
    try:
        phantoms = root / "phantoms"
        made = subprocess.run([sys.executable, "-m", "radlens.cli", "phantoms", "--out",
                               str(phantoms), "--n", str(args.studies + max(counts)),
                               "--seed", "12", "--dicom"], capture_output=True, text=True)
        if made.returncode != 0:
            raise RuntimeError(made.stderr)
        files = sorted((phantoms / "dicom").glob("*/IM0001.dcm"))
        rows = []
        single_files = files[:args.studies + 1]
        seconds = single_node(root / "single", single_files, args.device)
        rows.append(("single node (SQLite, --role all)", args.studies, seconds))
        postgres.start()
        for workers in counts:
            work = root / f"cluster{workers}"
            seconds = cluster(work, postgres, files[:args.studies + workers], workers,
                              args.device)
            rows.append((f"{workers} worker process{'es' if workers > 1 else ''} (PostgreSQL, "
                         f"model.threads {threads_per_worker(workers)})", args.studies, seconds))
        print_table(rows, args.device)
    finally:
        postgres.remove()
        shutil.rmtree(root, ignore_errors=True)


def print_table(rows: list[tuple[str, int, float]], device: str) -> None:
    print(f"## Cluster throughput ({platform.node()}: {os.cpu_count()} cores, device {device}; "
          f"one-image phantom studies, quiet period {QUIET_PERIOD_S:.0f} s)\n")
    print("| setup | studies | seconds | studies/hour | × single node | s/study |")
    print("|---|---:|---:|---:|---:|---:|")
    single = rows[0][1] / rows[0][2]
    for name, studies, seconds in rows:
        rate = studies / seconds
        print(f"| {name} | {studies} | {seconds:.1f} | {rate * 3600:,.0f} | "
              f"{rate / single:.2f}× | {seconds / studies:.2f} |")


if __name__ == "__main__":
    main()
