"""Per-frame analyses kept in SQLite: what the model made of each frame, its latents and its
largest lesion's measurements, so the cohort analysis can run over everything processed."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from radlens.db import DB_FILENAME, Database, open_readonly


@dataclass(frozen=True)
class FrameRecord:
    sop_instance_uid: str
    frame: int
    predicted_class: str
    probabilities: tuple[float, float, float]  # normal, benign, malignant
    latent: np.ndarray
    lesion_latent: np.ndarray | None
    largest_lesion: dict[str, Any] | None


def record(db: Database, job_id: int, study_uid: str, records: list[FrameRecord]) -> None:
    """One transaction per job: a job's analyses are kept whole or not at all."""
    now = time.time()
    with db.transaction() as conn:
        conn.executemany(
            "INSERT INTO frame_analyses (job_id, study_instance_uid, sop_instance_uid, frame,"
            " predicted_class, p_normal, p_benign, p_malignant, latent, lesion_latent,"
            " largest_lesion, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [(job_id, study_uid, r.sop_instance_uid, r.frame, r.predicted_class,
              *r.probabilities, r.latent.astype(np.float32).tobytes(),
              None if r.lesion_latent is None else r.lesion_latent.astype(np.float32).tobytes(),
              None if r.largest_lesion is None else json.dumps(r.largest_lesion), now)
             for r in records])


def load(data_dir: Path) -> list[dict[str, Any]]:
    """Every frame of each study's latest job, oldest study first."""
    path = data_dir / DB_FILENAME
    if not path.is_file():
        return []
    conn = open_readonly(path)
    try:
        rows = conn.execute(
            "SELECT * FROM frame_analyses f WHERE job_id = (SELECT MAX(job_id) FROM"
            " frame_analyses g WHERE g.study_instance_uid = f.study_instance_uid)"
            " ORDER BY id").fetchall()
    finally:
        conn.close()
    return [{**dict(row),
             "latent": np.frombuffer(row["latent"], dtype=np.float32),
             "lesion_latent": (np.frombuffer(row["lesion_latent"], dtype=np.float32)
                               if row["lesion_latent"] is not None else None),
             "largest_lesion": (json.loads(row["largest_lesion"]) if row["largest_lesion"]
                                else None)} for row in rows]
