"""Cross-validation folds for every task's training: patient-grouped (every image of a patient
in one fold, so no patient is both trained and validated on) and stratified by label, with
scikit-learn's ``StratifiedGroupKFold``."""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from pathlib import Path

from sklearn.model_selection import StratifiedGroupKFold


def patient_folds(labels: Sequence[Hashable], patients: Sequence[Hashable], n_folds: int,
                  seed: int) -> list[tuple[list[int], list[int]]]:
    """(train indices, validation indices) of each of ``n_folds`` folds. Raises ValueError
    when there are fewer patients than folds."""
    if len(labels) != len(patients):
        raise ValueError(f"{len(labels)} labels for {len(patients)} patients")
    if len(set(patients)) < n_folds:
        raise ValueError(f"{len(set(patients))} patients cannot make {n_folds} folds")
    splitter = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    return [(list(map(int, train)), list(map(int, val)))
            for train, val in splitter.split(list(labels), list(labels), list(patients))]


SPLIT_FILE = "split.json"


def write_split(folder: Path, case_ids: Sequence[str], splits: Sequence[tuple[Sequence[int],
                Sequence[int]]], *, seed: int, selected: int) -> str:
    """Which case trained and which validated each fold, by case ID, beside the model
    (``split.json``), so that a model's figures can be recomputed on the same cases; returns
    the file's name for the card."""
    import json

    folder.mkdir(parents=True, exist_ok=True)
    (folder / SPLIT_FILE).write_text(json.dumps({
        "seed": seed, "selected_fold": selected,
        "folds": [{"fold": fold, "train": sorted(case_ids[i] for i in train),
                   "validation": sorted(case_ids[i] for i in val)}
                  for fold, (train, val) in enumerate(splits)]}, indent=2) + "\n")
    return SPLIT_FILE
