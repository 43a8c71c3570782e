"""Hostile input at scale: thousands of malformed datasets and PDUs against one agent.

Starts ``radlens serve`` on loopback (model off unless ``--model``: the door is measured, not
the pipeline), sends every case of ``radlens.demo.fuzz`` over its own association, and after
each one times a fresh C-ECHO. Prints, per family, how the node answered (C-STORE statuses for
datasets; closed or left open for PDU cases), the slowest echo after a case, and at the end
the agent's peak memory, tracebacks in its log and whether it stopped cleanly. Never fails a
build; the test suite runs a few hundred of the same cases with assertions.

    .venv/bin/python benchmarks/fuzz.py [--datasets 2800] [--pdus 1600] [--seed 7] [--model]

Targets: every case answered, every echo within a second, no traceback, no crash (issue 13);
with the model on (``--model``, jobs in worker processes), peak resident memory of the agent
and its processes (listeners, workers, sender) together at most 1.5 GB through 1,000 cases,
and no worker process lost but to its memory limit, each such loss listed with its case
(issue 20). With ``--model``
the cases go ten to a study and the quiet period is 1 s, so studies are analysed while the
fuzz goes on.
"""

from __future__ import annotations

import argparse
import collections
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from radlens.demo.fuzz import (  # noqa: E402
    dataset_cases,
    echo_seconds,
    fuzz_uid,
    pdu_cases,
    send_dataset_case,
    send_pdu_case,
    write_case_file,
)
from radlens.demo.tools import free_port, port_open, require_tool, wait_for  # noqa: E402


def peak_rss_mb(pid: int) -> float:
    return _status_mb(pid, "VmHWM:")


def _status_mb(pid: int, field: str) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def _family(pid: int) -> list[int]:
    pids = [pid]
    try:
        pids += [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        pass
    return pids


def family_rss_mb(pid: int) -> dict[int, float]:
    """Resident memory of the agent and every process it started (listener, worker and sender
    processes, multiprocessing's resource tracker)."""
    return {p: _status_mb(p, "VmRSS:") for p in _family(pid)}


def family_pss_mb(pid: int) -> float:
    """Proportional set size of the agent and its processes together: shared pages (the
    libraries every worker process maps) counted once, the memory the machine really spends."""
    total = 0.0
    for p in _family(pid):
        try:
            for line in Path(f"/proc/{p}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1]) / 1024
        except OSError:
            continue
    return total


def process_kind(pid: int) -> str:
    """What one of the agent's children is, from its command line."""
    try:
        command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return "child"
    for marker, kind in (("radlens.agent.listeners", "listener"),
                         ("radlens.agent.sender", "sender"), ("resource_tracker", "tracker"),
                         ("spawn_main", "worker")):
        if marker in command:
            return kind
    return "child"


class MemoryWatch:
    """Samples the agent's and its children's RSS every 0.2 s: the peak of their sum."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak_total = 0.0
        self.peak_pss = 0.0
        self.peak_by_pid: dict[int, float] = {}
        self.kinds: dict[int, str] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            sample = {p: mb for p, mb in family_rss_mb(self.pid).items() if mb == mb}
            self.peak_total = max(self.peak_total, sum(sample.values()))
            self.peak_pss = max(self.peak_pss, family_pss_mb(self.pid))
            for p, mb in sample.items():
                self.peak_by_pid[p] = max(self.peak_by_pid.get(p, 0.0), mb)
                if p not in self.kinds:
                    self.kinds[p] = process_kind(p)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def jobs_in_state(data_dir: Path, table: str = "jobs") -> dict[str, int]:
    import sqlite3

    conn = sqlite3.connect(data_dir / "radlens.sqlite", timeout=30)
    try:
        return dict(conn.execute(f"SELECT state, COUNT(*) FROM {table} GROUP BY state")
                    .fetchall())
    finally:
        conn.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", type=int, default=2800)
    parser.add_argument("--pdus", type=int, default=1600)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--model", action="store_true", help="run the shipped model too")
    parser.add_argument("--per-study", type=int, default=10,
                        help="dataset cases per study with --model")
    options = parser.parse_args()

    from rich.progress import Progress

    work = Path(tempfile.mkdtemp(prefix="radlens-fuzz-"))
    port = free_port()
    env = dict(os.environ, RADLENS_STORAGE__DATA_DIR=str(work / "data"),
               RADLENS_DICOM__PORT=str(port), RADLENS_DICOM__HOST="127.0.0.1",
               RADLENS_STORAGE__MIN_FREE_MB="0", RADLENS_STORAGE__FSYNC="false",
               RADLENS_MODEL__ENABLED="true" if options.model else "false")
    archive = None
    if options.model:
        env["RADLENS_ASSEMBLY__QUIET_PERIOD_S"] = "1"
        # A destination (dcmtk's storescp), so that the sender process runs and sends what the
        # workers write: the whole node is measured.
        archive_port = free_port()
        (work / "archive").mkdir(parents=True)
        archive = subprocess.Popen([require_tool("storescp"), "-aet", "ARCHIVE", "--fork",
                                    "+xa", "-od", str(work / "archive"), str(archive_port)],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        env["RADLENS_DESTINATIONS"] = (f'[{{"name": "archive", "ae_title": "ARCHIVE", '
                                       f'"host": "127.0.0.1", "port": {archive_port}}}]')
    log_path = work / "serve.log"
    agent = subprocess.Popen([sys.executable, "-m", "radlens.cli", "serve"], env=env,
                             stdout=log_path.open("wb"), stderr=subprocess.STDOUT)
    wait_for(lambda: port_open(port), 60, "radlens to listen")
    watch = MemoryWatch(agent.pid)
    cases_dir = work / "cases"
    cases_dir.mkdir()

    answers: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    slowest: dict[str, float] = collections.defaultdict(float)
    failures: list[str] = []
    study_of_case: dict[str, str] = {}
    started = time.monotonic()
    with Progress() as progress:
        task = progress.add_task("dataset cases", total=options.datasets)
        for case, study in _cases(options):
            path = write_case_file(case, cases_dir)
            study_of_case[case.name] = study
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
    data_dir = work / "data"
    if options.model:  # the studies still queued or running when the fuzz ended
        deadline = time.monotonic() + 1800
        while time.monotonic() < deadline and (
                time.sleep(2) or any(jobs_in_state(data_dir).get(state, 0)
                                     for state in ("queued", "running"))):
            pass
        time.sleep(3)
    watch.stop()
    after = family_rss_mb(agent.pid)
    after_pss = family_pss_mb(agent.pid)
    peak = peak_rss_mb(agent.pid)
    alive = agent.poll() is None
    jobs = jobs_in_state(data_dir) if (data_dir / "radlens.sqlite").exists() else {}
    if archive is not None:  # the sender's last round; what stays pending is printed
        try:
            wait_for(lambda: not jobs_in_state(data_dir, "outbox").get("pending"), 120,
                     "the outbox to be sent")
        except TimeoutError:
            pass
    outbox = jobs_in_state(data_dir, "outbox") if (data_dir / "radlens.sqlite").exists() else {}
    agent.send_signal(signal.SIGTERM)
    code = agent.wait(timeout=120)
    if archive is not None:
        archive.terminate()
        archive.wait(timeout=30)
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
          f"tracebacks in its log: {log.count('Traceback')}; echoes that failed: "
          f"{len(failures)}; jobs: {dict(sorted(jobs.items()))}; outbox: "
          f"{dict(sorted(outbox.items()))}\n")
    print("| memory | MB |")
    print("|---|---:|")
    print(f"| peak RSS, agent and its processes together (sampled every 0.2 s) | "
          f"{watch.peak_total:.0f} |")
    print(f"| peak PSS, agent and its processes together (shared pages once) | "
          f"{watch.peak_pss:.0f} |")
    print(f"| peak RSS, agent process alone (VmHWM) | {peak:.0f} |")
    for pid, mb in sorted(watch.peak_by_pid.items()):
        if pid != agent.pid:
            print(f"| peak RSS, {watch.kinds.get(pid, 'child')} process {pid} | {mb:.0f} |")
    print(f"| RSS after the run, agent and its processes together | "
          f"{sum(v for v in after.values() if v == v):.0f} (PSS {after_pss:.0f}) |")
    lost = [line for line in log.splitlines() if "worker process lost" in line]
    print(f"\nworker processes lost: {len(lost)}")
    for line in lost:
        study = line.split("study=", 1)[1].split()[0] if "study=" in line else "?"
        cases = [name for name, uid in study_of_case.items() if uid == study]
        print(f"- {line.split('reason=', 1)[-1][:200]}; study {study}, cases "
              f"{', '.join(cases) or '?'}")
    print(f"log and data: {work}")


def _cases(options: argparse.Namespace):
    """(case, study UID): one study for all (the door alone), or ``--per-study`` cases to a
    study with the model on, so that the pipeline reads them while the fuzz goes on."""
    if not options.model:
        study = fuzz_uid("study", options.seed)
        for case in dataset_cases(options.datasets, seed=options.seed):
            yield case, study
        return
    for start in range(0, options.datasets, options.per_study):
        study = fuzz_uid("bench-study", options.seed, start)
        for case in dataset_cases(min(options.per_study, options.datasets - start),
                                  seed=options.seed * 100_000 + start, study_uid=study,
                                  start=start):
            yield case, study


if __name__ == "__main__":
    main()
