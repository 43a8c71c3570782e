"""The breast density task's research commands: phantom mammograms, training (k-fold, class
weights, your own CLIP weights) and evaluation, as ``radlens phantoms|train|evaluate --task
mammo_density`` run them."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from radlens.datasets.origin import mark_phantoms
from radlens.datasets.summary import DatasetSummary
from radlens.tasks.base import ResearchProgress, TaskError, TaskUsageError, TrainRequest


def write_phantoms(out: Path, *, n: int, seed: int, size: int | None, dicom: bool,
                   tomosynthesis: bool, progress: ResearchProgress) -> str:
    from radlens.tasks.mammo_density import phantoms

    size = size or 256
    counts: dict[str, int] = {}
    progress.start("phantoms", "patients", n)

    def advance_patient(views: list) -> None:
        category = phantoms.study_density(views)
        counts[category] = counts.get(category, 0) + 1
        progress.update("phantoms", sum(counts.values()))

    phantoms.write_dataset(out, phantoms.generate(n, seed, size=size), dicom=dicom,
                           uid_seed=f"radlens-mammo-{seed}-{size}", tomosynthesis=tomosynthesis,
                           on_patient=advance_patient)
    mark_phantoms(out, task="mammo_density", seed=seed, n=n, size=size)
    summary = ", ".join(f"{counts.get(k, 0)} {k}" for k in "ABCD")
    return f"wrote {n} patients, {4 * n} views (study density: {summary}) to {out}"


def train(request: TrainRequest, progress: ResearchProgress) -> str:
    from radlens.tasks.mammo_density.train import (
        DensityDataError,
        DensityEpoch,
        DensityTrainSettings,
        run_density_training,
    )

    options = request.options
    clip = options.get("clip")
    settings = DensityTrainSettings(epochs=request.epochs, batch_size=request.batch_size,
                                    learning_rate=request.learning_rate,
                                    patience=request.patience, folds=request.folds,
                                    seed=request.seed, device=request.device,
                                    size=request.size or 224,
                                    weighted=bool(options.get("class_weights", True)),
                                    clip=str(clip) if clip else None,
                                    test_fraction=float(options.get("test_fraction", 0.2)))
    if clip:
        from radlens.tasks.mammo_density.clip_backbone import (
            ClipUnavailableError,
            load_open_clip,
        )

        try:
            load_open_clip(Path(clip))  # fail before the first fold, with the reason
        except ClipUnavailableError as exc:
            raise TaskError(str(exc)) from exc

    def on_epoch(fold: int, record: DensityEpoch, planned: int) -> None:
        key = f"fold {fold}"
        if record.epoch == 1:
            progress.start(key, f"density fold {fold}", planned)
        progress.update(key, record.epoch,
                        f"loss {record.train_loss:.3f} / {record.val_loss:.3f}  "
                        f"accuracy {record.val_accuracy:.3f}")

    try:
        metrics = run_density_training(request.data, settings, request.out,
                                       command=request.command, on_epoch=on_epoch,
                                       test=options.get("test"),
                                       ablation=bool(options.get("ablation", False)))
    except (DensityDataError, ValueError) as exc:
        raise TaskError(str(exc)) from exc
    summary = metrics["summary"]
    lines = [f"trained the density model on {metrics['data']['views']} views of "
             f"{metrics['data']['patients']} patients; validation accuracy "
             f"{summary['accuracy']['mean']:.3f}, mean AUC "
             f"{summary['mean_auc']['mean']:.3f}; wrote {request.out}"]
    test = metrics.get("test")
    test_label = ("fresh cases" if options.get("test")
                  else f"test ({test['cases']} held-out views)" if test else "")
    for label, figures in ((test_label, test),
                           ("without class weights",
                            (metrics.get("ablation") or {}).get("without_class_weights"))):
        if figures:
            aucs = ", ".join(f"{k} {v:.3f}" for k, v in figures["auc"].items() if v is not None)
            line = f"{label}: accuracy {figures['accuracy']:.3f}; AUC {aucs}"
            calibration = figures.get("calibration") or {}
            stated = calibration.get("after") or calibration.get("before")
            if stated:
                line += f"; ECE {stated['ece']:.3f} (as the agent states the probabilities)"
            lines.append(line)
    return "\n".join(lines)


def evaluate(data: Path, model: str, out: Path, *, device: str,
             options: Mapping[str, Any]) -> Path:
    from radlens.errors import RadlensError
    from radlens.models.cards import ModelError, model_folder
    from radlens.tasks.mammo_density.train import DensityDataError, evaluate_density_folder

    try:
        folder = model_folder("density" if model == "default" else model)
        evaluate_density_folder(data, folder, out, device=device)
    except (DensityDataError, ModelError, ValueError, RadlensError) as exc:
        raise TaskError(str(exc)) from exc
    return out / "report.md"


LAYOUT = "labels.csv (case_id, patient_id, density A-D, view, laterality) with images/<case_id>.png"


def check_dataset(data: Path, layout: str | None) -> DatasetSummary:
    """What a density folder holds, read as training reads it."""
    from collections import Counter

    from PIL import Image

    from radlens.tasks.mammo_density.model import DENSITY_CLASSES
    from radlens.tasks.mammo_density.train import DensityDataError, load_density_cases

    if layout not in (None, "density"):
        raise TaskUsageError(f"the density task reads one layout ({LAYOUT}); not {layout!r}")
    try:
        cases = load_density_cases(data)
    except DensityDataError as exc:
        raise TaskError(str(exc)) from exc
    sizes: Counter[str] = Counter()
    for case in cases:
        with Image.open(case.path) as image:
            sizes[f"{image.size[1]} x {image.size[0]}"] += 1
    listed = {case.path.name for case in cases}
    unlisted = sorted(p.name for p in (data / "images").glob("*.png") if p.name not in listed)
    notes = [f"layout: {LAYOUT}"]
    if unlisted:
        notes.append(f"{len(unlisted)} image(s) in images/ are not in labels.csv and are not "
                     f"read: {', '.join(unlisted[:5])}" + (" ..." if len(unlisted) > 5 else ""))
    labels = Counter(DENSITY_CLASSES[case.label] for case in cases)
    return DatasetSummary(
        folder=str(data), layout="density", how="labels.csv names each case's category",
        cases=len(cases), patients=len({case.patient_id for case in cases}),
        labels={name: labels.get(name, 0) for name in DENSITY_CLASSES},
        tables={"views": dict(Counter(case.view or "not stated" for case in cases)),
                "laterality": dict(Counter(case.laterality or "not stated" for case in cases)),
                "image sizes (rows x columns)": dict(sizes.most_common())},
        notes=tuple(notes))
