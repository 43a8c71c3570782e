"""The lesion task's research commands: phantoms, training (k-fold, the published settings) and
evaluation, as ``radlens phantoms|train|evaluate --task breast_us`` run them."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from radlens.datasets.origin import mark_phantoms
from radlens.datasets.summary import DatasetSummary
from radlens.tasks.base import ResearchProgress, TaskError, TaskUsageError, TrainRequest


def _layout(value: object) -> Any:
    from radlens.datasets.segmentation import LAYOUTS

    if value is None:
        return None
    if value not in LAYOUTS:
        raise TaskUsageError(f"unknown layout {value!r} (known: {', '.join(LAYOUTS)})")
    return value


def check_dataset(data: Path, layout: str | None) -> DatasetSummary:
    from radlens.datasets.segmentation import DatasetError, read_segmentation_folder
    from radlens.datasets.summary import segmentation_summary
    from radlens.tasks.breast_us.classes import LESION_MASKS

    try:
        return segmentation_summary(read_segmentation_folder(data, LESION_MASKS,
                                                             layout=_layout(layout)))
    except DatasetError as exc:
        raise TaskError(str(exc)) from exc


def write_phantoms(out: Path, *, n: int, seed: int, size: int | None, dicom: bool,
                   progress: ResearchProgress) -> str:
    from radlens.tasks.breast_us.phantoms import Phantom, generate, write_dataset

    size = size or 256
    counts: dict[str, int] = {}
    progress.start("phantoms", "phantoms", n)

    def advance(phantom: Phantom) -> None:
        counts[phantom.label] = counts.get(phantom.label, 0) + 1
        progress.update("phantoms", sum(counts.values()))

    write_dataset(out, generate(n, seed, size=size), dicom=dicom,
                  uid_seed=f"radlens-phantoms-{seed}-{size}", on_case=advance)
    mark_phantoms(out, task="breast_us", seed=seed, n=n, size=size)
    summary = ", ".join(f"{counts.get(k, 0)} {k}" for k in ("normal", "benign", "malignant"))
    return f"wrote {n} phantoms ({summary}) to {out}"


def train(request: TrainRequest, progress: ResearchProgress) -> str:
    from radlens.models.networks import REGISTRY
    from radlens.tasks.breast_us.datasets import DatasetError
    from radlens.tasks.breast_us.preprocess import ASPECTS
    from radlens.tasks.breast_us.train import EpochRecord, TrainSettings, run_training

    arch = str(request.options.get("arch", "unet"))
    if arch not in REGISTRY:
        raise TaskUsageError(f"unknown architecture {arch!r} (known: {', '.join(REGISTRY)})")
    aspect = str(request.options.get("aspect", "pad"))
    if aspect not in ASPECTS:
        raise TaskUsageError(f"unknown --aspect {aspect!r} (known: {', '.join(ASPECTS)})")
    settings = TrainSettings(arch=arch, epochs=request.epochs, batch_size=request.batch_size,
                             learning_rate=request.learning_rate, patience=request.patience,
                             folds=request.folds, seed=request.seed, device=request.device,
                             size=request.size or 256,
                             workers=int(request.options.get("workers", 0)),
                             layout=_layout(request.options.get("layout")),
                             test_fraction=float(request.options.get("test_fraction", 0.2)),
                             aspect=aspect)

    def on_epoch(fold: int, record: EpochRecord, planned: int) -> None:
        key = f"fold {fold}"
        if record.epoch == 1:
            progress.start(key, f"{arch} fold {fold}", planned)
        dice = record.val_lesion_dice
        progress.update(key, record.epoch,
                        f"loss {record.train_loss:.3f} / {record.val_loss:.3f}  lesion Dice "
                        + (f"{dice:.3f}" if dice is not None else "n/a"))

    try:
        metrics = run_training(request.data, settings, request.out, command=request.command,
                               on_epoch=on_epoch)
    except (DatasetError, ValueError) as exc:
        raise TaskError(str(exc)) from exc
    summary = metrics["summary"]
    line = (f"trained {arch} on {metrics['data']['cases']} cases; validation lesion Dice "
            f"{summary['lesion_dice']['mean']:.3f}; image accuracy "
            f"{summary['from_segmentation']['accuracy']['mean']:.3f}; wrote {request.out}")
    test = metrics.get("test")
    if test:
        def figure(value: float | None) -> str:
            return "n/a" if value is None else f"{value:.3f}"

        bounds = (test.get("intervals") or {}).get("lesion_dice")
        line += (f"\ntest ({test['images']} held-out images): lesion Dice "
                 f"{figure(test['segmentation']['lesion']['dice'])}"
                 + (f" (95 % CI {bounds[0]:.3f}-{bounds[1]:.3f})" if bounds else "")
                 + f", lesion sensitivity {figure(test['detection']['sensitivity'])}, "
                 f"image accuracy {figure(test['image_level']['from_segmentation']['accuracy'])}")
    return line


def evaluate(data: Path, model: str, out: Path, *, device: str, seed: int,
             options: Mapping[str, Any]) -> Path:
    from radlens.errors import RadlensError
    from radlens.tasks.breast_us import evaluate as evaluation
    from radlens.tasks.breast_us.datasets import DatasetError

    try:
        compare = options.get("compare")
        if compare:
            evaluation.compare_architectures(
                data, [a.strip() for a in str(compare).split(",") if a.strip()], out,
                epochs=int(options.get("epochs", 100)), folds=int(options.get("folds", 0)),
                device=device, seed=seed)
        else:
            evaluation.evaluate_folder(data, model, out, device=device, seed=seed,
                                       unlike=options.get("unlike"),
                                       layout=_layout(options.get("layout")))
    except (DatasetError, ValueError, RadlensError) as exc:
        raise TaskError(str(exc)) from exc
    return out / "report.md"
