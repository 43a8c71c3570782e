"""Re-sent studies after a crash: does every study run once?

Each trial starts ``radlens serve`` on loopback (model off: assembly is measured, not the
pipeline; quiet period 2 s), sends a burst of ten 50-instance ultrasound studies with one
``storescu`` association, kills the agent with SIGKILL after a random number of acknowledged
instances early in the burst, starts it again, and re-sends every file ``storescu`` did not see
acknowledged, as a modality does after a lost association. It then waits for every study to be
processed and counts the jobs per study. Prints a table; never fails a build.

    .venv/bin/python benchmarks/resend.py [--trials 20] [--seed 1] [--senders 10] [--model]

``--senders 10``: each study from its own ``storescu`` at once, as ten modalities would;
``--model``: with the shipped model on (slower jobs, a slower start).

Target (issue 20): every study processed once in every trial, nothing acknowledged lost.
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from radlens.demo.tools import acknowledged_files, free_port, port_open, wait_for  # noqa: E402
from radlens.tasks.breast_us.dicom import write_us_studies  # noqa: E402

STUDIES, PER_STUDY = 10, 50


def _query(data_dir: Path, sql: str) -> list[tuple]:
    conn = sqlite3.connect(data_dir / "radlens.sqlite", timeout=30)
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


def _indexed(data_dir: Path) -> int:
    try:
        return _query(data_dir, "SELECT COUNT(*) FROM instances")[0][0]
    except sqlite3.Error:
        return 0


def _storescu(port: int, files: list[Path], log: Path) -> subprocess.Popen:
    return subprocess.Popen(["storescu", "-v", "-aec", "RADLENS", "127.0.0.1", str(port),
                             *map(str, files)], stdout=log.open("w"),
                            stderr=subprocess.STDOUT, env=dict(os.environ, TCP_NODELAY="1"))


def _serve(work: Path, port: int, number: int, model: bool) -> subprocess.Popen:
    env = dict(os.environ, RADLENS_STORAGE__DATA_DIR=str(work / "data"),
               RADLENS_DICOM__PORT=str(port), RADLENS_DICOM__HOST="127.0.0.1",
               RADLENS_STORAGE__MIN_FREE_MB="0",
               RADLENS_DICOM__MAX_CONNECTIONS_PER_ADDRESS="0",  # ten senders on one address
               RADLENS_MODEL__ENABLED="true" if model else "false",
               RADLENS_ASSEMBLY__QUIET_PERIOD_S="2", RADLENS_WORKER__CONCURRENCY="1")
    agent = subprocess.Popen([sys.executable, "-m", "radlens.cli", "serve"], env=env,
                             stdout=(work / f"serve-{number}.log").open("wb"),
                             stderr=subprocess.STDOUT)
    wait_for(lambda: port_open(port), 60, "radlens to listen")
    return agent


def _send(port: int, files: list[Path], work: Path, name: str, senders: int
          ) -> list[tuple[subprocess.Popen, Path]]:
    """One storescu for everything, or one per study (all at once)."""
    if senders <= 1:
        return [(_storescu(port, files, work / f"{name}.log"), work / f"{name}.log")]
    by_study: dict[str, list[Path]] = {}
    for path in files:  # study007_00012.dcm: the study's files share the prefix
        by_study.setdefault(path.name.split("_")[0], []).append(path)
    return [(_storescu(port, group, work / f"{name}-{number}.log"), work / f"{name}-{number}.log")
            for number, group in enumerate(by_study.values()) if group]


def trial(files: list[Path], kill_after: int, senders: int, model: bool) -> dict[str, object]:
    work = Path(tempfile.mkdtemp(prefix="radlens-resend-"))
    port = free_port()
    agent = _serve(work, port, 1, model)
    sending = _send(port, files, work, "burst", senders)
    wait_for(lambda: _indexed(work / "data") >= kill_after, 120, "the burst to start")
    agent.kill()
    agent.wait(timeout=30)
    acked: set[str] = set()
    for process, log in sending:
        process.wait(timeout=60)
        acked |= set(acknowledged_files(log.read_text()))
    rest = [path for path in files if str(path) not in acked]
    agent = _serve(work, port, 2, model)
    started = time.monotonic()
    for process, _ in _send(port, rest, work, "resend", senders):
        process.wait(timeout=600)
    data = work / "data"
    wait_for(lambda: _query(data, "SELECT COUNT(*) FROM instances WHERE job_id IS NULL")[0][0]
             == 0 and _query(data, "SELECT COUNT(*) FROM jobs WHERE state IN "
                                   "('queued', 'running')")[0][0] == 0, 600, "the jobs")
    settled = time.monotonic() - started
    runs = [n for (n,) in _query(data, "SELECT COUNT(*) FROM jobs GROUP BY study_instance_uid")]
    held = _indexed(data)
    agent.send_signal(signal.SIGTERM)
    agent.wait(timeout=120)
    return {"acked": len(acked), "resent": len(rest), "studies": len(runs),
            "once": sum(1 for n in runs if n == 1), "more": sum(1 for n in runs if n > 1),
            "held": held, "settled_s": settled, "work": work}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--senders", type=int, default=1,
                        help="1: one storescu for the burst; more: one per study, all at once")
    parser.add_argument("--model", action="store_true", help="with the shipped model on")
    options = parser.parse_args()
    rng = random.Random(options.seed)
    files = list(write_us_studies(Path(tempfile.mkdtemp(prefix="radlens-burst-")),
                                  studies=STUDIES, instances_per_study=PER_STUDY,
                                  rows=128, columns=256))
    print(f"{options.trials} trials: a burst of {STUDIES} studies x {PER_STUDY} instances "
          f"({'one storescu' if options.senders <= 1 else 'one storescu per study'}, model "
          f"{'on' if options.model else 'off'}), kill -9 early in it, restart, re-send what "
          "was not acknowledged\n")
    print("| trial | killed after | acknowledged | re-sent | studies | processed once | "
          "processed more than once | instances held | settled after re-send |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    totals = {"once": 0, "more": 0, "studies": 0, "lost": 0}
    for number in range(1, options.trials + 1):
        kill_after = rng.randrange(5, PER_STUDY * 2)
        result = trial(files, kill_after, options.senders, options.model)
        totals["once"] += int(result["once"])
        totals["more"] += int(result["more"])
        totals["studies"] += int(result["studies"])
        totals["lost"] += len(files) - int(result["held"])
        print(f"| {number} | {kill_after} | {result['acked']} | {result['resent']} | "
              f"{result['studies']} | {result['once']} | {result['more']} | "
              f"{result['held']} of {len(files)} | {result['settled_s']:.1f} s |", flush=True)
    print(f"\nstudies processed once: {totals['once']} of {totals['studies']}; more than "
          f"once: {totals['more']}; instances missing after the re-send: {totals['lost']}")


if __name__ == "__main__":
    main()
