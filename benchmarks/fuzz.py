"""Hostile input at scale: thousands of malformed datasets and PDUs against one agent.

Starts ``radlens serve`` on loopback (model off unless ``--model``: the door is measured, not
the pipeline), sends every case of ``radlens.demo.fuzz`` over its own association, and after
each one times a fresh C-ECHO. Prints, per family, how the node answered (C-STORE statuses for
datasets; closed or left open for PDU cases), the slowest echo after a case, and at the end
the agent's peak memory, tracebacks in its log and whether it stopped cleanly. Never fails a
build; the test suite runs a few hundred of the same cases with assertions.

    .venv/bin/python benchmarks/fuzz.py [--datasets 2800] [--pdus 1600] [--seed 7] [--model]

Target (issue 13): every case answered, every echo within a second, no traceback, no crash.
"""

from __future__ import annotations

import argparse
import collections
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from radlens.demo.fuzz import (  # noqa: E402
    dataset_cases,
    echo_seconds,
    pdu_cases,
    send_dataset_case,
    send_pdu_case,
    write_case_file,
)
from radlens.demo.tools import free_port, port_open, wait_for  # noqa: E402


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", type=int, default=2800)
    parser.add_argument("--pdus", type=int, default=1600)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--model", action="store_true", help="run the shipped model too")
    options = parser.parse_args()

    from rich.progress import Progress

    work = Path(tempfile.mkdtemp(prefix="radlens-fuzz-"))
    port = free_port()
    env = dict(os.environ, RADLENS_STORAGE__DATA_DIR=str(work / "data"),
               RADLENS_DICOM__PORT=str(port), RADLENS_DICOM__HOST="127.0.0.1",
               RADLENS_STORAGE__MIN_FREE_MB="0", RADLENS_STORAGE__FSYNC="false",
               RADLENS_MODEL__ENABLED="true" if options.model else "false")
    log_path = work / "serve.log"
    agent = subprocess.Popen([sys.executable, "-m", "radlens.cli", "serve"], env=env,
                             stdout=log_path.open("wb"), stderr=subprocess.STDOUT)
    wait_for(lambda: port_open(port), 60, "radlens to listen")
    cases_dir = work / "cases"
    cases_dir.mkdir()

    answers: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    slowest: dict[str, float] = collections.defaultdict(float)
    failures: list[str] = []
    started = time.monotonic()
    with Progress() as progress:
        task = progress.add_task("dataset cases", total=options.datasets)
        for case in dataset_cases(options.datasets, seed=options.seed):
            path = write_case_file(case, cases_dir)
            outcome = send_dataset_case(path, "127.0.0.1", port)
            path.unlink()
            answers[case.family]["no answer" if outcome.status is None
                                 else f"0x{outcome.status:04X}"] += 1
            echo = echo_seconds("127.0.0.1", port)
            slowest[case.family] = max(slowest[case.family], echo if echo is not None else 99.0)
            if echo is None:
                failures.append(case.name)
            progress.advance(task)
        task = progress.add_task("PDU cases", total=options.pdus)
        for pdu_case in pdu_cases(options.pdus, seed=options.seed):
            result = send_pdu_case(pdu_case, "127.0.0.1", port, wait_s=10)
            family = f"pdu: {pdu_case.family}"
            answers[family]["closed" if result.closed else "left open"] += 1
            echo = echo_seconds("127.0.0.1", port)
            slowest[family] = max(slowest[family], echo if echo is not None else 99.0)
            if echo is None:
                failures.append(pdu_case.name)
            progress.advance(task)
    elapsed = time.monotonic() - started
    peak = peak_rss_mb(agent.pid)
    alive = agent.poll() is None
    agent.send_signal(signal.SIGTERM)
    code = agent.wait(timeout=120)
    log = log_path.read_text(errors="replace")

    print(f"\n{options.datasets} dataset and {options.pdus} PDU cases in {elapsed:.0f} s "
          f"(seed {options.seed}, model {'on' if options.model else 'off'})\n")
    print("| family | cases | answers | slowest next echo |")
    print("|---|---:|---|---:|")
    for family in sorted(answers):
        counts = answers[family]
        shown = ", ".join(f"{answer} {count}" for answer, count in counts.most_common())
        print(f"| {family} | {sum(counts.values())} | {shown} | "
              f"{slowest[family] * 1000:.0f} ms |")
    print(f"\nagent alive after the run: {alive}; exit code after SIGTERM: {code}; "
          f"peak RSS {peak:.0f} MB; tracebacks in its log: {log.count('Traceback')}; "
          f"echoes that failed: {len(failures)}")
    print(f"log and data: {work}")


if __name__ == "__main__":
    main()
