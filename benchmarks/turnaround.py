"""Turnaround: from the last image sent to the last result in the PACS, per stage.

``radlens serve`` with a dcmtk ``storescp`` as its destination; phantom ultrasound studies of 1,
30 and 120 frames (lesions in most frames, so every stage runs) are pushed with ``storescu``.
Turnaround is the time from storescu's last C-STORE response to the destination's receipt of
the study's last output object (the outbox's ``sent_at``), minus the quiet period the agent
waits to call a study complete. Each job's own stage times come from its ``findings.json``.
Beside them: the **compute floor**, the model's batched forward over the same frames on the
same device, measured in the same run, and the agent's peak RSS. Prints Markdown tables and
never fails a build.

    .venv/bin/python benchmarks/turnaround.py [--frames 1,30,120] [--device cpu]

Targets (issue 11): 30 frames <= 10 s, 1 frame <= 1.5 s, each within 4x its compute floor;
120 frames <= 30 s; serving RSS <= 1 GB. With ``--dermoscopy-model DIR`` (a trained
dermoscopy weights folder), a 1-image dermoscopy study gets a row too: <= 2 s (issue 24), its
floor the model's whole analysis of the photograph.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from radlens.demo.tools import free_port, port_open, require_tool, wait_for  # noqa: E402
from radlens.timing import STAGES  # noqa: E402

QUIET_PERIOD_S = 1.0
TARGETS: dict[int | str, tuple[float, float | None]] = {
    1: (1.5, 4.0), 30: (10.0, 4.0), 120: (30.0, None),  # seconds, x compute floor
    "dermoscopy": (2.0, None)}


def clip(path: Path, frames: int, seed: int) -> Path:
    """A phantom US study: one image (1 frame) or a multi-frame clip, lesions in most frames."""
    from pydicom.uid import generate_uid

    from radlens.tasks.breast_us.dicom import us_dataset, us_multiframe_dataset
    from radlens.tasks.breast_us.phantoms import make_phantom

    images = [make_phantom(seed, i, label="benign" if i % 2 else "malignant").image
              for i in range(frames)]
    study = generate_uid(entropy_srcs=["turnaround", str(frames), str(seed)])
    series = generate_uid(entropy_srcs=["turnaround", str(frames), str(seed), "series"])
    if frames == 1:
        ds = us_dataset(images[0], study_uid=study, series_uid=series, instance_number=1,
                        spacing_cm=0.02, patient_id="TURNAROUND")
    else:
        ds = us_multiframe_dataset(np.stack(images), study_uid=study, series_uid=series,
                                   instance_number=1, spacing_cm=0.02,
                                   patient_id="TURNAROUND")
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def compute_floor(path: Path, device: str) -> float:
    """Seconds of the model's batched forward over the study's frames, warm."""
    from radlens.dicom_io.pixels import decode_file
    from radlens.tasks.breast_us.infer import Segmenter

    segmenter = Segmenter(device=device)
    frames = list(decode_file(path).pixels)
    segmenter.predict(frames[:2])  # warm-up
    started = time.perf_counter()
    segmenter.predict(frames)
    return time.perf_counter() - started


def rss_mb(pid: int) -> float:
    """Peak resident memory of a process (VmHWM), in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def family_peak_mb(pid: int) -> float:
    """The agent's peak plus each of its worker processes' peaks (an upper bound of their
    peak together: they need not peak at the same moment)."""
    try:
        children = [int(p) for p in
                    Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        children = []
    return rss_mb(pid) + sum(rss_mb(child) for child in children)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--frames", default="1,30,120")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--burst", type=int, default=3,
                        help="then this many 30-frame studies sent at once (0: none)")
    parser.add_argument("--concurrency", type=int, default=None,
                        help="worker.concurrency for the agent (default: the agent's)")
    parser.add_argument("--dermoscopy-model", type=Path, default=None,
                        help="a trained dermoscopy weights folder: also time a 1-image "
                             "dermoscopy study with the task on (the shipped one: dermoscopy)")
    parser.add_argument("--isolation", choices=("process", "thread"), default=None,
                        help="worker.isolation: jobs in worker processes (the default) or in "
                             "the agent's own process, to measure what isolation costs")
    args = parser.parse_args()
    sizes = [int(n) for n in args.frames.split(",")]
    work = Path(tempfile.mkdtemp(prefix="radlens-turnaround-"))
    received = work / "pacs"
    received.mkdir()
    pacs_port, port = free_port(), free_port()
    pacs = subprocess.Popen([require_tool("storescp"), "-od", str(received), "+uf", str(pacs_port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=dict(os.environ, TCP_NODELAY="1"))
    env = dict(os.environ, RADLENS_STORAGE__DATA_DIR=str(work / "data"),
               RADLENS_DICOM__PORT=str(port), RADLENS_DICOM__HOST="127.0.0.1",
               RADLENS_STORAGE__MIN_FREE_MB="0", RADLENS_MODEL__DEVICE=args.device,
               RADLENS_ASSEMBLY__QUIET_PERIOD_S=str(QUIET_PERIOD_S),
               RADLENS_OUTBOX__POLL_INTERVAL_S="0.2",
               **({"RADLENS_WORKER__CONCURRENCY": str(args.concurrency)}
                  if args.concurrency else {}),
               **({"RADLENS_WORKER__ISOLATION": args.isolation} if args.isolation else {}),
               **({"RADLENS_DERMOSCOPY__ENABLED": "true",
                   "RADLENS_DERMOSCOPY__WEIGHTS": str(args.dermoscopy_model)}
                  if args.dermoscopy_model else {}),
               RADLENS_DESTINATIONS=json.dumps([{"name": "pacs", "ae_title": "STORESCP",
                                                 "host": "127.0.0.1", "port": pacs_port}]))
    log = open(work / "serve.log", "wb")  # noqa: SIM115 (open for the agent's lifetime)
    agent = subprocess.Popen([sys.executable, "-m", "radlens.cli", "serve"], env=env,
                             stdout=log, stderr=subprocess.STDOUT)
    rows = []
    try:
        wait_for(lambda: port_open(port), 60, "radlens to listen")
        db = work / "data" / "radlens.sqlite"
        # A warm-up study: the agent pays its one-time imports before anything is timed.
        studies: list[tuple[int | str, int]] = [(1, 900), *[(n, 321) for n in sizes]]
        if args.dermoscopy_model:
            studies += [("dermoscopy", 901), ("dermoscopy", 321)]
        for n, seed in studies:
            if n == "dermoscopy":
                path = dermoscopy_photograph(work / "in" / f"derm-{seed}" / "x.dcm", seed)
                floor = (dermoscopy_floor(path, args.dermoscopy_model, args.device)
                         if seed != 901 else None)
            else:
                path = clip(work / "in" / f"clip{n}-{seed}.dcm", int(n), seed)
                floor = compute_floor(path, args.device) if seed != 900 else None
            jobs_before = _count(db, "SELECT COUNT(*) FROM jobs WHERE state IN ('done','failed')")
            # -R: propose the file's own SOP class (storescu's default list lacks DMS)
            sent = subprocess.run([require_tool("storescu"), "-R", "-aec", "RADLENS",
                                   "127.0.0.1", str(port), str(path)], capture_output=True,
                                  text=True, env=dict(os.environ, TCP_NODELAY="1"))
            last_response = time.time()
            if sent.returncode != 0:
                raise RuntimeError(f"storescu failed: {sent.stderr[-500:]}")
            wait_for(lambda b=jobs_before: _count(
                db, "SELECT COUNT(*) FROM jobs WHERE state IN ('done','failed')") > b,
                600, f"the {n}-frame job")
            job = _query(db, "SELECT id, state, started_at, finished_at, study_instance_uid"
                             " FROM jobs ORDER BY id DESC LIMIT 1")[0]
            wait_for(lambda j=job: _count(db, "SELECT COUNT(*) FROM outbox WHERE job_id = ? AND"
                                              " state != 'sent'", (j["id"],)) == 0,
                     300, "the outputs to reach the destination")
            delivered = _query(db, "SELECT MAX(sent_at) AS last, COUNT(*) AS n FROM outbox"
                                   " WHERE job_id = ?", (job["id"],))[0]
            if floor is None:
                continue
            findings = json.loads((work / "data" / "results" / job["study_instance_uid"] /
                                   "findings.json").read_text())
            timings = findings.get("timings", {})
            lesions = _lesions(findings)
            turnaround = delivered["last"] - last_response - QUIET_PERIOD_S
            rows.append({"frames": n, "lesions": lesions, "turnaround": turnaround,
                         "floor": floor, "job": job["finished_at"] - job["started_at"],
                         "delivery": delivered["last"] - job["finished_at"],
                         "objects": delivered["n"], "timings": timings})
        burst = _burst(work, db, port, args.burst) if args.burst else None
        peak = family_peak_mb(agent.pid)
    finally:
        agent.terminate()
        agent.wait(timeout=60)
        pacs.terminate()
        pacs.wait(timeout=30)
        log.close()
    print_tables(rows, peak, args.device)
    if burst is not None:
        concurrency = args.concurrency or "default"
        print(f"\nBurst: {args.burst} studies of 30 frames sent in one association, "
              f"worker.concurrency {concurrency}: the last study's last output "
              f"{burst:.2f} s after the last image (quiet period subtracted), "
              f"{burst / args.burst:.2f} s a study.")
    shutil.rmtree(work, ignore_errors=True)


def _lesions(findings: dict) -> int:
    """Lesions found in a findings.json: the lesion task's frames, and one per dermoscopy
    reading."""
    count = 0
    for image in findings["images"]:
        for analysis in image.get("analyses", []):
            if analysis.get("kind") == "frames":
                count += sum(len(frame["lesions"]) for frame in analysis["frames"])
            elif analysis.get("task") == "dermoscopy" and analysis.get("lesion_pixels"):
                count += 1
    return count


def dermoscopy_photograph(path: Path, seed: int) -> Path:
    """A phantom dermoscopic photograph (Dermoscopic Photography Image, 256 pixels)."""
    from radlens.tasks.dermoscopy.dicom import write_dermoscopy_study
    from radlens.tasks.dermoscopy.phantoms import make_case

    case = make_case(seed, 0, label="melanoma")
    return write_dermoscopy_study(path.parent, case, uid_seed=f"turnaround-{seed}",
                                  kind="DMS")


def dermoscopy_floor(path: Path, model_dir: Path, device: str) -> float:
    """Seconds of the dermoscopy model's whole analysis of the photograph (both mask stages,
    features, classifier), warm."""
    import pydicom

    from radlens.models.cards import read_card
    from radlens.tasks.dermoscopy.model import DermoscopyModel

    model = DermoscopyModel.load(model_dir, card=read_card(model_dir), device=device)
    image = pydicom.dcmread(path).pixel_array
    model.analyse(image, 0.08)  # warm-up
    started = time.perf_counter()
    model.analyse(image, 0.08)
    return time.perf_counter() - started


def _burst(work: Path, db: Path, port: int, studies: int) -> float:
    """Seconds from the last image of ``studies`` 30-frame studies, sent at once, to the
    destination's receipt of the last output, minus the quiet period."""
    paths = [clip(work / "in" / f"burst-{seed}.dcm", 30, seed) for seed in range(studies)]
    jobs_before = _count(db, "SELECT MAX(id) FROM jobs")
    sent = subprocess.run([require_tool("storescu"), "-aec", "RADLENS", "127.0.0.1", str(port),
                           *map(str, paths)], capture_output=True, text=True,
                          env=dict(os.environ, TCP_NODELAY="1"))
    last_response = time.time()
    if sent.returncode != 0:
        raise RuntimeError(f"storescu failed: {sent.stderr[-500:]}")
    wait_for(lambda: _count(db, "SELECT COUNT(*) FROM jobs WHERE id > ? AND state IN"
                                " ('done', 'failed')", (jobs_before,)) == studies,
             900, "the burst's jobs")
    wait_for(lambda: _count(db, "SELECT COUNT(*) FROM outbox WHERE job_id > ? AND"
                                " state != 'sent'", (jobs_before,)) == 0, 300,
             "the burst's outputs to reach the destination")
    last = _query(db, "SELECT MAX(sent_at) FROM outbox WHERE job_id > ?", (jobs_before,))[0][0]
    return float(last) - last_response - QUIET_PERIOD_S


def _query(db: Path, sql: str, params: tuple = ()) -> list[sqlite3.Row]:
    if not db.is_file():
        return []
    conn = sqlite3.connect(db, timeout=30)
    conn.row_factory = sqlite3.Row
    try:
        return conn.execute(sql, params).fetchall()
    finally:
        conn.close()


def _count(db: Path, sql: str, params: tuple = ()) -> int:
    rows = _query(db, sql, params)
    return int(rows[0][0]) if rows else 0


def print_tables(rows: list[dict], peak_mb: float, device: str) -> None:
    import torch

    print(f"## Turnaround ({platform.node()}: {os.cpu_count()} cores, {platform.machine()}, "
          f"device {device}; radlens {version('radlens')}, torch {torch.__version__}; quiet "
          f"period {QUIET_PERIOD_S:.0f} s subtracted)\n")
    print("| frames | lesions | turnaround | target | compute floor | x floor (target) | "
          "job | delivery | objects |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        target, factor = TARGETS.get(row["frames"], (None, None))
        ratio = row["turnaround"] / row["floor"] if row["floor"] > 0 else float("nan")
        print(f"| {row['frames']} | {row['lesions']} | {row['turnaround']:.2f} s | "
              f"{f'<= {target:.1f} s' if target else '-'} | {row['floor']:.2f} s | "
              f"{ratio:.1f}x ({f'<= {factor:.0f}x' if factor else '-'}) | {row['job']:.2f} s | "
              f"{row['delivery']:.2f} s | {row['objects']} |")
    print(f"\nPeak RSS, agent plus each of its processes' peak (listeners, workers, sender): "
          f"{peak_mb:.0f} MB\n")
    print("### Seconds per stage (the job's own timings, findings.json)\n")
    stages = [*STAGES, *sorted({name for row in rows for name in row["timings"]
                                if name not in STAGES and name != "total"})]  # a task's own
    print("| frames | " + " | ".join(stages) + " | job total |")
    print("|---:|" + "---:|" * (len(stages) + 1))
    for row in rows:
        timings = row["timings"]
        print(f"| {row['frames']} | " + " | ".join(
            f"{timings.get(stage, 0.0):.2f}" for stage in stages)
            + f" | {timings.get('total', 0.0):.2f} |")


if __name__ == "__main__":
    main()
