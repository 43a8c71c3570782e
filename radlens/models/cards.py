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


# ---- provenance: what a card needs to reproduce and to check its model ------------------------

# The files whose bytes are the model: hashed into the card, checked by ``radlens models verify``.
WEIGHT_PATTERNS = ("model.pt", "ood.npz", "clip/*")
PROVENANCE_LIBRARIES = ("torch", "monai", "numpy", "scikit-learn", "highdicom", "pydicom")


def sha256(path: Path) -> str:
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def weight_hashes(folder: Path) -> dict[str, str]:
    """SHA-256 of every weights file in ``folder`` (``WEIGHT_PATTERNS``), by relative path."""
    files = sorted({p for pattern in WEIGHT_PATTERNS for p in folder.glob(pattern) if p.is_file()})
    return {p.relative_to(folder).as_posix(): sha256(p) for p in files}


def source_commit() -> str | None:
    """The git commit radlens runs from (``-dirty`` with uncommitted changes), or None when it
    is not a git checkout (an installed wheel) or git is missing."""
    import subprocess

    root = Path(__file__).resolve().parents[2]
    if not (root / ".git").exists():
        return None
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True,
                              text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain",
                                "--untracked-files=no"], capture_output=True, text=True,
                               timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head + ("-dirty" if dirty else "")


def environment() -> dict[str, Any]:
    """Python, radlens and the libraries a trained model depends on, with their versions."""
    import platform
    from importlib import metadata

    from radlens import __version__

    versions = {}
    for name in PROVENANCE_LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return {"python": platform.python_version(), "platform": platform.platform(),
            "radlens": __version__, "git_commit": source_commit(), "libraries": versions}


def seal(card: dict[str, Any], folder: Path, *, seed: int, command: str,
         split_file: str | None) -> dict[str, Any]:
    """``card`` with its provenance (the weights' SHA-256, the environment, the seed, the
    command line, the split file) and a version unique to these weights: the training date
    and the first 8 hex digits of a hash over the weights' hashes. Call it when every weights
    file is written, then save the card."""
    import hashlib
    from datetime import UTC, datetime

    hashes = weight_hashes(folder)
    if "model.pt" not in hashes and not any(k.startswith("clip/") for k in hashes):
        raise ModelError(f"{folder}: no weights to seal")
    combined = hashlib.sha256("".join(f"{k}={v}\n" for k, v in hashes.items()).encode())
    now = datetime.now(UTC)
    return {**card, "version": f"{now:%Y.%m.%d}-{combined.hexdigest()[:8]}",
            "provenance": {"sha256": hashes, "environment": environment(), "seed": seed,
                           "command": command, "split": split_file,
                           "sealed": now.isoformat(timespec="seconds")}}


def rehash(card: dict[str, Any], folder: Path) -> dict[str, Any]:
    """``card`` with its recorded hashes brought up to date after a step that rewrote a
    weights file on purpose (``radlens calibrate-ood`` refits ``ood.npz``); the environment
    of that step is recorded beside the training's."""
    from datetime import UTC, datetime

    provenance = dict(card.get("provenance") or {})
    provenance["sha256"] = weight_hashes(folder)
    provenance["rehashed"] = {"at": datetime.now(UTC).isoformat(timespec="seconds"),
                              "environment": environment()}
    return {**card, "provenance": provenance}


def verify(folder: Path) -> list[str]:
    """What does not match the card's recorded hashes (empty: the weights are the ones the
    card describes). A card without recorded hashes is one problem."""
    card = read_card(folder)
    recorded = (card.get("provenance") or {}).get("sha256")
    if not recorded:
        return [f"{folder / 'card.json'} records no weight hashes (trained before radlens "
                "recorded them): nothing to verify against"]
    problems = []
    for name, expected in recorded.items():
        path = folder / name
        if not path.is_file():
            problems.append(f"{name} is missing")
        elif sha256(path) != expected:
            problems.append(f"{name} differs from the card (SHA-256 {sha256(path)[:16]}..., "
                            f"recorded {expected[:16]}...)")
    extra = sorted(set(weight_hashes(folder)) - set(recorded))
    problems += [f"{name} is not in the card" for name in extra]
    return problems
