"""Where a training folder came from, in the one sentence every SR and PDF states about a
model ("trained on synthetic phantoms only" for radlens's own phantoms). ``radlens phantoms``
leaves ``phantoms.json`` in the folders it writes; any other folder is described by what it
holds, and its source is said to be unstated rather than guessed."""

from __future__ import annotations

import json
from pathlib import Path

from radlens import __version__

PHANTOMS_FILE = "phantoms.json"


def mark_phantoms(out: Path, *, task: str, seed: int, n: int, size: int) -> None:
    """Record in ``out`` that radlens's phantom generator wrote it, and how."""
    out.mkdir(parents=True, exist_ok=True)
    (out / PHANTOMS_FILE).write_text(json.dumps({
        "generator": "radlens phantoms", "task": task, "seed": seed, "n": n, "size": size,
        "radlens_version": __version__}, indent=2) + "\n")


def training_data_sentence(folder: Path, *, images: int, patients: int) -> str:
    """One sentence on what a model trained on ``folder`` was trained on."""
    marker = folder / PHANTOMS_FILE
    if marker.is_file():
        try:
            made = json.loads(marker.read_text())
        except ValueError:
            made = {}
        if made.get("generator") == "radlens phantoms":
            return (f"Trained on synthetic phantoms only ({images} images from radlens "
                    f"phantoms, seed {made.get('seed')}): no patient images.")
    return (f"Trained on {images} images of {patients} patients from the folder "
            f"{folder.name}; the card does not state their source.")
