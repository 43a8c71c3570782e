"""The dermoscopy task's research commands, as ``radlens phantoms|train|evaluate --task
dermoscopy`` run them."""

from __future__ import annotations

from pathlib import Path

from radlens.datasets.origin import mark_phantoms
from radlens.datasets.summary import DatasetSummary
from radlens.tasks.base import ResearchProgress, TaskError, TaskUsageError, TrainRequest

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


def _given(options: dict, key: str, default: float) -> float:
    value = options.get(key)
    return default if value is None else value


def train(request: TrainRequest, progress: ResearchProgress) -> str:
    from radlens.tasks.dermoscopy.datasets import DermoscopyDataError
    from radlens.tasks.dermoscopy.train import DermoscopyTrainSettings, run_training

    options = request.options
    settings = DermoscopyTrainSettings(
        epochs=request.epochs,
        segmenter_epochs=int(options.get("segmenter_epochs") or request.epochs),
        batch_size=max(2, request.batch_size), learning_rate=request.learning_rate,
        patience=request.patience, folds=request.folds, seed=request.seed,
        device=request.device, size=request.size or 128,
        test_fraction=float(options.get("test_fraction", 0.2)),
        alignment_weight=float(_given(options, "alignment_weight", 1.0)),
        alignment_temperature=float(_given(options, "alignment_temperature", 0.1)))
    started: set[str] = set()

    def tell(key: str, label: str, done: int, total: int, info: str = "") -> None:
        if key not in started:
            started.add(key)
            progress.start(key, label, total)
        progress.update(key, done, info)

    try:
        metrics = run_training(request.data, settings, request.out, command=request.command,
                               ablation=bool(options.get("ablation", False)), progress=tell)
    except (DermoscopyDataError, ValueError) as exc:
        raise TaskError(str(exc)) from exc
    card = metrics["card"]
    trained = card["trained_on"]
    lines = [f"trained the dermoscopy model on {trained['images']} images of "
             f"{trained['patients']} patients ({trained['melanoma']} melanoma); coarse UNet "
             f"validation Dice {card['segmentation']['validation_dice']:.3f}; wrote "
             f"{request.out}"]
    for label, figures in (("test", metrics.get("test")),
                           ("without alignment", (metrics.get("ablation") or {}).get(
                               "without_alignment"))):
        if figures:
            c = figures["classification"]
            line = (f"{label}: accuracy {c['accuracy']:.3f}, AUC "
                    + ("n/a" if c["auc"] is None else f"{c['auc']:.3f}"))
            alignment = figures.get("alignment") or {}
            if alignment.get("positive_median") is not None:
                line += (f"; pair similarity {alignment['positive_median']:.2f} positive, "
                         f"{alignment['negative_median']:.2f} negative")
            segmentation = (figures.get("segmentation") or {}).get("all")
            if segmentation and segmentation.get("refined_dice") is not None:
                line += (f"; Dice coarse {segmentation['coarse_dice']:.3f}, refined "
                         f"{segmentation['refined_dice']:.3f}")
            lines.append(line)
    return "\n".join(lines)


def load_model(model: str, *, device: str = "cpu"):
    """A weights folder (or, once one ships, the shipped model) as a ``DermoscopyModel``."""
    from radlens.models.cards import model_folder, read_card
    from radlens.tasks.dermoscopy.model import DermoscopyModel

    folder = model_folder("dermoscopy" if model == "default" else model)
    return DermoscopyModel.load(folder, card=read_card(folder), device=device)


def evaluate(data: Path, model: str, out: Path, *, device: str, seed: int,
             progress: ResearchProgress) -> Path:
    from radlens.models.cards import ModelError
    from radlens.models.device import resolve_device
    from radlens.tasks.dermoscopy.datasets import DermoscopyDataError, read_folder
    from radlens.tasks.dermoscopy.evaluate import evaluate_records, report, write_report

    try:
        loaded = load_model(model, device=str(resolve_device(device)))
        records = read_folder(data)
        progress.start("evaluate", "images", len(records))
        results = evaluate_records(loaded, records,
                                   on_case=lambda n: progress.update("evaluate", n))
        figures = report(results, out, temperature=loaded.temperature, seed=seed)
        return write_report(figures, out, f"Dermoscopy model on {data.name}")
    except (DermoscopyDataError, ModelError, ValueError, OSError) as exc:
        raise TaskError(str(exc)) from exc


LAYOUT = ("labels.csv (case_id, patient_id, label nevus or melanoma; optionally "
          "pixel_spacing_mm, descriptors, confounders, fitzpatrick) with images/<case_id>.png "
          "or .jpg and masks/<case_id>.png")


def check_dataset(data: Path, layout: str | None) -> DatasetSummary:
    """What a dermoscopy folder holds, read as training reads it."""
    from collections import Counter

    from PIL import Image

    from radlens.tasks.dermoscopy.datasets import DermoscopyDataError, read_folder

    if layout not in (None, "dermoscopy"):
        raise TaskUsageError(f"the dermoscopy task reads one layout ({LAYOUT}); not {layout!r}")
    try:
        records = read_folder(data)
    except DermoscopyDataError as exc:
        raise TaskError(str(exc)) from exc
    sizes: Counter[str] = Counter()
    for record in records:
        with Image.open(record.image) as image:
            sizes[f"{image.size[1]} x {image.size[0]}"] += 1
    notes = [f"layout: {LAYOUT}"]
    unmasked = [r.case_id for r in records if r.mask is None]
    if unmasked:
        notes.append(f"{len(unmasked)} case(s) without a mask: training needs one for each "
                     f"(evaluation reads them without): {', '.join(unmasked[:5])}"
                     + (" ..." if len(unmasked) > 5 else ""))
    unspaced = sum(r.spacing_mm is None for r in records)
    if unspaced:
        notes.append(f"{unspaced} case(s) without pixel_spacing_mm: their diameter is not "
                     "measured")
    labels = Counter(r.label for r in records)
    return DatasetSummary(
        folder=str(data), layout="dermoscopy", how="labels.csv names each case's label",
        cases=len(records), patients=len({r.patient_id for r in records}),
        labels={name: labels.get(name, 0) for name in ("nevus", "melanoma")},
        tables={"descriptors": dict(Counter(d for r in records for d in r.descriptors)
                                    .most_common()),
                "confounders": dict(Counter(c for r in records for c in r.confounders)
                                    .most_common()),
                "Fitzpatrick skin type": {str(k): v for k, v in sorted(Counter(
                    r.fitzpatrick for r in records if r.fitzpatrick is not None).items())},
                "image sizes (rows x columns)": dict(sizes.most_common())},
        notes=tuple(notes))
