"""The dermoscopy task's research commands, as ``radlens phantoms --task dermoscopy`` runs
them."""

from __future__ import annotations

from pathlib import Path

from radlens.datasets.origin import mark_phantoms
from radlens.tasks.base import ResearchProgress, TaskUsageError

MAX_VISITS = 12


def write_phantoms(out: Path, *, n: int, seed: int, size: int | None, dicom: bool,
                   visits: int, progress: ResearchProgress) -> str:
    from radlens.tasks.dermoscopy import phantoms

    if not 1 <= visits <= MAX_VISITS:
        raise TaskUsageError(f"--visits must be 1 to {MAX_VISITS}, not {visits}")
    size = size or 256
    counts = {label: 0 for label in phantoms.LABELS}
    written = 0
    progress.start("phantoms", "dermoscopy images", n * visits)

    def advance(case: phantoms.DermoscopyCase) -> None:
        nonlocal written
        written += 1
        if case.visit == 1:
            counts[case.label] += 1
        progress.update("phantoms", written)

    phantoms.write_dataset(out, phantoms.generate(n, seed, size=size, visits=visits),
                           dicom=dicom, uid_seed=f"radlens-dermoscopy-{seed}-{size}",
                           on_case=advance)
    mark_phantoms(out, task="dermoscopy", seed=seed, n=n, size=size)
    seen = f", each seen on {visits} visits six months apart" if visits > 1 else ""
    return (f"wrote {n} lesions ({counts['nevus']} nevus, {counts['melanoma']} melanoma)"
            f"{seen} to {out}")
