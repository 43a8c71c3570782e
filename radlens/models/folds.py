"""Cross-validation folds for every task's training: patient-grouped (every image of a patient
in one fold, so no patient is both trained and validated on) and stratified by label, with
scikit-learn's ``StratifiedGroupKFold``."""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass
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


@dataclass(frozen=True)
class Splits:
    """A held-out test set (reported only: nothing is chosen on it) and the train/validation
    folds of the other cases (validation: early stopping, model selection, calibration, the
    OOD threshold), all as indices into the case list."""

    test: list[int]
    folds: list[tuple[list[int], list[int]]]


def split_with_test(labels: Sequence[Hashable], patients: Sequence[Hashable], *,
                    test_fraction: float, folds: int, val_fraction: float,
                    seed: int) -> Splits:
    """Patient-grouped, label-stratified: first about ``test_fraction`` of the cases as the
    test set (0: none), then ``folds`` folds of the rest (fewer than 2: one split with about
    ``val_fraction`` for validation). Raises ValueError when there are too few patients."""
    if not 0 <= test_fraction < 1 or not 0 < val_fraction < 1:
        raise ValueError(f"fractions must lie in [0, 1): test {test_fraction}, validation "
                         f"{val_fraction}")
    everyone = list(range(len(labels)))
    test: list[int] = []
    if test_fraction > 0:
        # With few patients, a larger share than asked: one part per patient at most.
        parts = min(max(2, round(1 / test_fraction)), len(set(patients)))
        if parts < 3:
            raise ValueError(f"{len(set(patients))} patients cannot make a test set, a "
                             "validation set and a training set (--test-fraction 0: no test "
                             "set)")
        rest, test = patient_folds(labels, patients, parts, seed)[0]
        everyone = rest
    rest_labels = [labels[i] for i in everyone]
    rest_patients = [patients[i] for i in everyone]
    if folds >= 2:
        inner = patient_folds(rest_labels, rest_patients, folds, seed)
    else:
        parts = min(max(2, round(1 / val_fraction)), len(set(rest_patients)))
        inner = patient_folds(rest_labels, rest_patients, max(parts, 2), seed)[:1]
    return Splits(sorted(test), [([everyone[i] for i in train], [everyone[i] for i in val])
                                 for train, val in inner])


SPLIT_FILE = "split.json"


def write_split(folder: Path, case_ids: Sequence[str], splits: Sequence[tuple[Sequence[int],
                Sequence[int]]], *, seed: int, selected: int,
                test: Sequence[int] = ()) -> str:
    """Which case trained and which validated each fold, by case ID, beside the model
    (``split.json``), so that a model's figures can be recomputed on the same cases; returns
    the file's name for the card."""
    import json

    folder.mkdir(parents=True, exist_ok=True)
    (folder / SPLIT_FILE).write_text(json.dumps({
        "seed": seed, "selected_fold": selected,
        "test": sorted(case_ids[i] for i in test),
        "folds": [{"fold": fold, "train": sorted(case_ids[i] for i in train),
                   "validation": sorted(case_ids[i] for i in val)}
                  for fold, (train, val) in enumerate(splits)]}, indent=2) + "\n")
    return SPLIT_FILE
