"""Model folders and their cards, for every task: a weights folder holds ``model.pt`` (or the
task's own format) beside ``card.json``, which states the model's name, version, scope and
figures. A shipped model lives in its task's package, ``radlens/tasks/<task>/weights/<name>``;
a configuration names one of them or a folder of its own.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

TASKS_DIR = Path(__file__).resolve().parent.parent / "tasks"


class ModelError(RuntimeError):
    """A weights folder that cannot be loaded."""


def shipped_models() -> dict[str, Path]:
    """Every model shipped with radlens, by name: the folders with a ``card.json`` under a
    built-in task's ``weights/``."""
    return {card.parent.name: card.parent
            for card in sorted(TASKS_DIR.glob("*/weights/*/card.json"))}


def model_folder(name_or_path: str | Path) -> Path:
    """A folder path, or the name of a shipped model (``shipped_models``)."""
    path = Path(name_or_path)
    if path.is_dir():
        return path
    shipped = shipped_models()
    if str(name_or_path) in shipped:
        return shipped[str(name_or_path)]
    raise ModelError(f"no model folder {name_or_path!r} (nor a shipped model of that name: "
                     f"{', '.join(sorted(shipped)) or 'none'})")


def read_card(folder: Path) -> dict[str, Any]:
    """A folder's ``card.json``. Raises ModelError when it is missing or not a JSON object."""
    try:
        card = json.loads((folder / "card.json").read_text())
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot read {folder / 'card.json'}: {exc}") from exc
    if not isinstance(card, dict):
        raise ModelError(f"{folder / 'card.json'} is not a JSON object")
    return card
