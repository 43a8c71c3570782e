"""The one reader of a folder's ``labels.csv``: a row per case, keyed by ``case_id``, each
label checked against the task's labels. A file without a case_id column, a case listed
twice or a label the task does not know is refused with the file and the case named: a
training set read with a guess is a model trained on one."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path


class LabelsCsvError(ValueError):
    """A labels.csv that cannot be read without guessing."""


def read_labels_csv(path: Path, *, labels: Sequence[str] | None = None,
                    label_column: str = "label",
                    required: Sequence[str] = ()) -> dict[str, dict[str, str]]:
    """Rows by case id (cells stripped of spaces); ``labels``: the values ``label_column``
    may take (an empty cell is allowed); ``required``: columns that must be there."""
    try:
        with open(path, newline="") as handle:
            reader = csv.DictReader(handle)
            columns = list(reader.fieldnames or [])
            rows = list(reader)
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise LabelsCsvError(f"{path}: cannot be read as CSV: {exc}") from exc
    missing = [name for name in ("case_id", *required) if name not in columns]
    if missing:
        noun = "column" if len(missing) == 1 else "columns"
        raise LabelsCsvError(f"{path}: no {', '.join(missing)} {noun} (columns: {columns})")
    listed: dict[str, dict[str, str]] = {}
    for row in rows:
        cells = {key: (value or "").strip() for key, value in row.items() if key is not None}
        case_id = cells.get("case_id", "")
        if not case_id:
            raise LabelsCsvError(f"{path}: a row without a case_id: {row}")
        if case_id in listed:
            raise LabelsCsvError(f"{path}: case {case_id!r} is listed twice")
        label = cells.get(label_column, "")
        if labels is not None and label and label not in labels:
            raise LabelsCsvError(f"{path}: case {case_id!r} has {label_column} {label!r}; the "
                                 f"task's labels are {', '.join(labels)}")
        listed[case_id] = cells
    return listed
