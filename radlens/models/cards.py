"""Model folders and their cards, for every task: a weights folder holds ``model.pt`` (or the
task's own format) beside ``card.json``, which states the model's name, version, scope and
figures. Shipped models live in ``radlens/models/weights/<name>``; a configuration names one of
them or a folder of its own.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

WEIGHTS_DIR = Path(__file__).with_name("weights")


class ModelError(RuntimeError):
    """A weights folder that cannot be loaded."""


def model_folder(name_or_path: str | Path) -> Path:
    """A folder path, or the name of a model shipped in ``radlens/models/weights``."""
    path = Path(name_or_path)
    if path.is_dir():
        return path
    shipped = WEIGHTS_DIR / str(name_or_path)
    if shipped.is_dir():
        return shipped
    raise ModelError(f"no model folder {name_or_path!r} (nor {shipped})")


def read_card(folder: Path) -> dict[str, Any]:
    """A folder's ``card.json``. Raises ModelError when it is missing or not a JSON object."""
    try:
        card = json.loads((folder / "card.json").read_text())
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot read {folder / 'card.json'}: {exc}") from exc
    if not isinstance(card, dict):
        raise ModelError(f"{folder / 'card.json'} is not a JSON object")
    return card
