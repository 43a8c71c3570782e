"""Analyses kept in the state database: what the model made of each frame (class
probabilities, latent) and each lesion (class, probability, latent pooled inside it,
measurements), so the cohort analysis can run over everything processed."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import sqlalchemy as sa

from radlens.db import Database, frame_analyses, lesion_analyses, open_readonly


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
            normal, benign, malignant = r.probabilities
            frame_id = conn.execute(sa.insert(frame_analyses).values(
                job_id=job_id, study_instance_uid=study_uid, sop_instance_uid=r.sop_instance_uid,
                frame=r.frame, predicted_class=r.predicted_class, p_normal=normal,
                p_benign=benign, p_malignant=malignant,
                latent=r.latent.astype(np.float32).tobytes(), created_at=now,
            ).returning(frame_analyses.c.id)).scalar_one()
            if r.lesions:
                conn.execute(sa.insert(lesion_analyses), [
                    {"frame_analysis_id": frame_id, "lesion_index": lesion.index,
                     "lesion_class": lesion.lesion_class, "probability": lesion.probability,
                     "latent": lesion.latent.astype(np.float32).tobytes(),
                     "measurements": json.dumps(lesion.measurements)}
                    for lesion in r.lesions])


def _latest_job() -> sa.ColumnElement[bool]:
    """Rows of each study's latest job (a study re-processed keeps only its newest analyses)."""
    f, g = frame_analyses, frame_analyses.alias("g")
    return f.c.job_id == (sa.select(sa.func.max(g.c.job_id))
                          .where(g.c.study_instance_uid == f.c.study_instance_uid)
                          .scalar_subquery())


def _query(url: str, statement: sa.Select) -> list[dict[str, Any]]:
    db = open_readonly(url)
    if db is None:
        return []
    try:
        return [dict(row) for row in db.rows(statement)]
    finally:
        db.close()


def load_frames(url: str) -> list[dict[str, Any]]:
    """Every frame of each study's latest job, with its largest lesion's measurements."""
    f, lesion = frame_analyses, lesion_analyses
    largest = (sa.select(lesion.c.measurements)
               .where(lesion.c.frame_analysis_id == f.c.id, lesion.c.lesion_index == 1)
               .scalar_subquery().label("largest_lesion"))
    rows = _query(url, sa.select(f, largest).where(_latest_job()).order_by(f.c.id))
    return [{**row, "latent": np.frombuffer(row["latent"], dtype=np.float32),
             "largest_lesion": json.loads(row["largest_lesion"]) if row["largest_lesion"]
             else None} for row in rows]


def load_lesions(url: str) -> list[dict[str, Any]]:
    """Every lesion of each study's latest job."""
    f, lesion = frame_analyses, lesion_analyses
    rows = _query(url, sa.select(lesion).join(f, lesion.c.frame_analysis_id == f.c.id)
                  .where(_latest_job()).order_by(lesion.c.id))
    return [{**row, "latent": np.frombuffer(row["latent"], dtype=np.float32),
             "measurements": json.loads(row["measurements"])} for row in rows]
