"""Cross-validation folds for every task's training: patient-grouped (every image of a patient
in one fold, so no patient is both trained and validated on) and stratified by label, with
scikit-learn's ``StratifiedGroupKFold``."""

from __future__ import annotations

from collections.abc import Hashable, Sequence

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
