"""Analyses kept in SQLite: what the model made of each frame (class probabilities, latent) and
each lesion (class, probability, latent pooled inside it, measurements), so the cohort analysis
can run over everything processed."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from radlens.db import DB_FILENAME, Database, open_readonly


@dataclass(frozen=True)
class LesionRecord:
    index: int
    lesion_class: str
    probability: float
    latent: np.ndarray
    measurements: dict[str, Any]


@dataclass(frozen=True)
class FrameRecord:
    sop_instance_uid: str
    frame: int
    predicted_class: str
    probabilities: tuple[float, float, float]  # normal, benign, malignant
    latent: np.ndarray
    lesions: list[LesionRecord]


def record(db: Database, job_id: int, study_uid: str, records: list[FrameRecord]) -> None:
    """One transaction per job: a job's analyses are kept whole or not at all."""
    now = time.time()
    with db.transaction() as conn:
        for r in records:
            frame_id = conn.execute(
                "INSERT INTO frame_analyses (job_id, study_instance_uid, sop_instance_uid, frame,"
                " predicted_class, p_normal, p_benign, p_malignant, latent, created_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (job_id, study_uid, r.sop_instance_uid, r.frame, r.predicted_class,
                 *r.probabilities, r.latent.astype(np.float32).tobytes(), now)).lastrowid
            conn.executemany(
                "INSERT INTO lesion_analyses (frame_analysis_id, lesion_index, lesion_class,"
                " probability, latent, measurements) VALUES (?, ?, ?, ?, ?, ?)",
                [(frame_id, lesion.index, lesion.lesion_class, lesion.probability,
                  lesion.latent.astype(np.float32).tobytes(), json.dumps(lesion.measurements))
                 for lesion in r.lesions])


_LATEST_JOB = ("f.job_id = (SELECT MAX(job_id) FROM frame_analyses g"
               " WHERE g.study_instance_uid = f.study_instance_uid)")


def _query(data_dir: Path, sql: str) -> list[dict[str, Any]]:
    path = data_dir / DB_FILENAME
    if not path.is_file():
        return []
    conn = open_readonly(path)
    try:
        return [dict(row) for row in conn.execute(sql).fetchall()]
    finally:
        conn.close()


def load_frames(data_dir: Path) -> list[dict[str, Any]]:
    """Every frame of each study's latest job, with its largest lesion's measurements."""
    rows = _query(data_dir,
                  "SELECT f.*, (SELECT measurements FROM lesion_analyses l WHERE"
                  " l.frame_analysis_id = f.id AND l.lesion_index = 1) AS largest_lesion"
                  f" FROM frame_analyses f WHERE {_LATEST_JOB} ORDER BY f.id")
    return [{**row, "latent": np.frombuffer(row["latent"], dtype=np.float32),
             "largest_lesion": json.loads(row["largest_lesion"]) if row["largest_lesion"]
             else None} for row in rows]


def load_lesions(data_dir: Path) -> list[dict[str, Any]]:
    """Every lesion of each study's latest job."""
    rows = _query(data_dir,
                  "SELECT l.* FROM lesion_analyses l JOIN frame_analyses f"
                  f" ON l.frame_analysis_id = f.id WHERE {_LATEST_JOB} ORDER BY l.id")
    return [{**row, "latent": np.frombuffer(row["latent"], dtype=np.float32),
             "measurements": json.loads(row["measurements"])} for row in rows]
