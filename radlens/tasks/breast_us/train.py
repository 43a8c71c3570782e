"""Training with the published settings (docs/method.md), identical for every architecture.

AdamW at 1e-4, cosine annealing (T_max 100, eta_min 1e-6), Dice + cross-entropy, early stopping on
validation loss (min improvement 1e-4, patience 4), optional k-fold cross-validation grouped by
patient. Seeded: the same data, settings and seed give the same weights on the same device.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data import DataLoader
from monai.losses import DiceCELoss
from monai.utils import set_determinism

from radlens import __version__
from radlens.datasets.origin import training_data_sentence
from radlens.logs import kv
from radlens.models.calibration import (
    apply_temperature,
    fit_temperature,
    measure,
    reliability_diagram,
)
from radlens.models.cards import seal
from radlens.models.device import resolve_device
from radlens.models.folds import split_with_test, write_split
from radlens.models.metrics import (
    SegmentationMetrics,
    evaluation_report,
    markdown_table,
    predict,
)
from radlens.models.networks import CLASS_NAMES, build, parameter_count
from radlens.models.scope import ImageGeometry
from radlens.models.training import EarlyStopping, cpu_state, cross_validate, fit
from radlens.tasks.breast_us.datasets import (
    INPUT_SIZE,
    Case,
    DatasetError,
    SegmentationDataset,
    augmentations,
    load_cases,
)
from radlens.tasks.breast_us.preprocess import training_policy
from radlens.tasks.breast_us.scope import BREAST_ULTRASOUND_SCOPE

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainSettings:
    arch: str = "unet"
    epochs: int = 100
    batch_size: int = 8
    learning_rate: float = 1e-4
    weight_decay: float = 1e-4
    t_max: int = 100
    eta_min: float = 1e-6
    patience: int = 4
    min_delta: float = 1e-4
    folds: int = 0  # 0 or 1: one patient-grouped hold-out split
    val_fraction: float = 0.2
    test_fraction: float = 0.2  # held out first, reported only; 0: no test set
    seed: int = 0
    device: str = "auto"
    size: int = INPUT_SIZE
    workers: int = 0  # data-loading processes; MONAI re-seeds each, so results stay seeded
    layout: str | None = None  # the dataset's layout (radlens.datasets); None: as the masks show
    aspect: str = "pad"  # "pad" keeps the aspect ratio, "stretch" fills the square (preprocess)

    @property
    def preprocessing(self) -> dict[str, str]:
        """The input policy this training uses and its card records."""
        return training_policy(self.aspect)


@dataclass
class EpochRecord:
    epoch: int
    train_loss: float
    val_loss: float
    val_lesion_dice: float | None
    learning_rate: float
    seconds: float


@dataclass
class FoldResult:
    fold: int
    train_cases: int
    val_cases: int
    best_epoch: int
    best_val_loss: float
    stopped_early: bool
    history: list[EpochRecord] = field(default_factory=list)
    report: dict[str, Any] = field(default_factory=dict)


EpochCallback = Callable[[int, EpochRecord, int], None]  # fold, record, planned epochs


def _loader(dataset: SegmentationDataset, batch_size: int, shuffle: bool, seed: int,
            workers: int = 0) -> torch.utils.data.DataLoader:
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=generator,
                      num_workers=workers, persistent_workers=workers > 0)


def train_fold(fold: int, train_cases: list[Case], val_cases: list[Case],
               settings: TrainSettings, out: Path,
               on_epoch: EpochCallback | None = None) -> tuple[FoldResult, torch.nn.Module]:
    """Train one model; returns its result and the weights of its best validation epoch."""
    set_determinism(settings.seed + fold)
    device = resolve_device(settings.device)
    model = build(settings.arch).to(device)
    train_data = SegmentationDataset(train_cases, size=settings.size,
                                     transform=augmentations(settings.seed + fold),
                                     policy=settings.preprocessing)
    val_data = SegmentationDataset(val_cases, size=settings.size, policy=settings.preprocessing)
    train_loader = _loader(train_data, settings.batch_size, True, settings.seed + fold,
                           settings.workers)
    val_loader = _loader(val_data, settings.batch_size, False, settings.seed + fold)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.learning_rate,
                                  weight_decay=settings.weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=settings.t_max,
                                                           eta_min=settings.eta_min)

    def run_epoch(epoch: int) -> EpochRecord:
        started = time.perf_counter()
        model.train()
        losses = []
        for batch in train_loader:
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(model(batch["image"].to(device)), batch["mask"].to(device))
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        learning_rate = optimizer.param_groups[0]["lr"]
        scheduler.step()
        val_loss, val_dice = _validate(model, val_loader, loss_fn, device)
        record = EpochRecord(epoch, float(np.mean(losses)), val_loss, val_dice, learning_rate,
                             time.perf_counter() - started)
        log.info("epoch", extra=kv(fold=fold, epoch=epoch, train_loss=round(record.train_loss, 4),
                                   val_loss=round(val_loss, 4), val_lesion_dice=val_dice))
        return record

    fitted = fit(model, epochs=settings.epochs,
                 stopping=EarlyStopping(settings.patience, settings.min_delta),
                 run_epoch=run_epoch, val_loss=lambda record: record.val_loss,
                 on_epoch=(None if on_epoch is None
                           else lambda record: on_epoch(fold, record, settings.epochs)))
    best_state = fitted.best_state
    result = FoldResult(fold, len(train_cases), len(val_cases), fitted.best_epoch,
                        fitted.best_val_loss, fitted.stopped_early, fitted.history)
    result.report = evaluation_report(predict(model, val_loader, device), settings.seed,
                                      intervals=False)
    fold_dir = out / f"fold{fold}"
    fold_dir.mkdir(parents=True, exist_ok=True)
    torch.save(best_state, fold_dir / "model.pt")
    plot_curves(result.history, fold_dir / "curves.png", title=f"{settings.arch}, fold {fold}")
    return result, model


@torch.inference_mode()
def _validate(model: torch.nn.Module, loader: torch.utils.data.DataLoader,
              loss_fn: DiceCELoss, device: torch.device) -> tuple[float, float | None]:
    model.eval()
    losses = []
    metrics = SegmentationMetrics(detect=False)
    for batch in loader:
        logits = model(batch["image"].to(device))
        mask = batch["mask"].to(device)
        losses.append(float(loss_fn(logits, mask)) * len(mask))
        metrics.update(logits.max(dim=1).indices, mask[:, 0])  # argmax, ~15x faster on CPU
    return (float(np.sum(losses) / len(loader.dataset)),
            metrics.aggregate()["lesion"]["dice"])


def plot_curves(history: list[EpochRecord], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r.epoch for r in history]
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.plot(epochs, [r.train_loss for r in history], label="training")
    left.plot(epochs, [r.val_loss for r in history], label="validation")
    left.set_xlabel("epoch")
    left.set_ylabel("Dice + cross-entropy loss")
    left.legend()
    right.plot(epochs, [r.val_lesion_dice or 0 for r in history], color="tab:green")
    right.set_xlabel("epoch")
    right.set_ylabel("validation lesion Dice")
    right.set_ylim(0, 1)
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def summarise(results: list[FoldResult]) -> dict[str, Any]:
    """Mean and standard deviation over folds of every averaged pixel metric and image score."""
    def spread(values: list[float | None]) -> dict[str, float | None]:
        present = [v for v in values if v is not None]
        if not present:
            return {"mean": None, "std": None}
        return {"mean": float(np.mean(present)), "std": float(np.std(present))}

    summary: dict[str, Any] = {"average": {}, "lesion_dice": spread(
        [r.report["segmentation"]["lesion"]["dice"] for r in results])}
    for metric in results[0].report["segmentation"]["average"]:
        summary["average"][metric] = spread(
            [r.report["segmentation"]["average"][metric] for r in results])
    for source in ("from_segmentation", "linear_probe_on_latents"):
        summary[source] = {m: spread([r.report["image_level"][source][m] for r in results])
                           for m in ("accuracy", "auc_ovr")}
    return summary


def run_training(data: Path, settings: TrainSettings, out: Path, *, command: str = "",
                 on_epoch: EpochCallback | None = None) -> dict[str, Any]:
    """Train (with k-fold cross-validation when ``settings.folds > 1``) and write ``out``:
    ``model.pt`` + ``card.json`` + ``card.md`` (a weights folder), ``metrics.json``,
    ``metrics.md`` and per-fold curves."""
    cases = load_cases(data, settings.layout)  # type: ignore[arg-type]
    try:
        split = split_with_test([c.label for c in cases], [c.patient_id for c in cases],
                                test_fraction=settings.test_fraction, folds=settings.folds,
                                val_fraction=settings.val_fraction, seed=settings.seed)
    except ValueError as exc:
        raise DatasetError(str(exc)) from exc
    splits = split.folds
    out.mkdir(parents=True, exist_ok=True)
    trained, selected = cross_validate(
        splits,
        lambda fold, train_idx, val_idx: train_fold(
            fold, [cases[i] for i in train_idx], [cases[i] for i in val_idx], settings, out,
            on_epoch),
        val_loss=lambda outcome: outcome[0].best_val_loss)
    results = [result for result, _ in trained]
    best_fold, best_model = trained[selected]
    metrics = {
        "settings": asdict(settings),
        "data": {"path": str(data), "cases": len(cases),
                 "labels": {k: sum(c.label == k for c in cases)
                            for k in ("normal", "benign", "malignant")},
                 "patients": len({c.patient_id for c in cases})},
        "folds": [{**asdict(r), "history": [asdict(h) for h in r.history]} for r in results],
        "summary": summarise(results),
        "selected_fold": best_fold.fold,
        "test": None,
    }
    device = next(best_model.parameters()).device
    # Temperature scaling of the image probabilities, fitted on the selected fold's validation.
    _, selected_val = splits[best_fold.fold]
    validation = predict(best_model, _loader(SegmentationDataset(
        [cases[i] for i in selected_val], size=settings.size, policy=settings.preprocessing),
        settings.batch_size, False, settings.seed), device)
    temperature = fit_temperature(validation.image_probabilities, validation.labels)
    metrics["calibration"] = {
        "method": "temperature scaling of the image probabilities' logarithms",
        "temperature": temperature, "fitted_on": f"validation, fold {best_fold.fold}",
        "validation": {
            "before": measure(validation.image_probabilities, validation.labels).as_dict(),
            "after": measure(apply_temperature(validation.image_probabilities, temperature),
                             validation.labels).as_dict()}}
    if split.test:  # the selected model on cases nothing was chosen on
        test_data = SegmentationDataset([cases[i] for i in split.test], size=settings.size,
                                        policy=settings.preprocessing)
        tested = predict(best_model, _loader(test_data, settings.batch_size, False,
                                             settings.seed), device)
        metrics["test"] = evaluation_report(tested, settings.seed)
        calibrated = apply_temperature(tested.image_probabilities, temperature)
        metrics["test"]["calibration"] = {
            "before": measure(tested.image_probabilities, tested.labels).as_dict(),
            "after": measure(calibrated, tested.labels).as_dict(),
            "diagram": "reliability.png"}
        reliability_diagram({"as trained": (tested.image_probabilities, tested.labels),
                             f"temperature {temperature:.2f}": (calibrated, tested.labels)},
                            out / "reliability.png", "Test set: image probabilities")
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    (out / "metrics.md").write_text(
        (markdown_table(metrics["test"], f"{settings.arch}, fold {best_fold.fold}: test "
                        "(held out, reported only)") if metrics["test"] else "")
        + "".join(markdown_table(r.report, f"{settings.arch}, fold {r.fold} (validation)")
                  for r in results))
    torch.save(cpu_state(best_model), out / "model.pt")  # loads without a GPU
    card = model_card(settings, metrics, best_fold, command, parameter_count(best_model))
    write_card(card, out)
    train_idx, val_idx = splits[best_fold.fold]
    card["ood"] = calibrate_ood(out, [cases[i] for i in train_idx], [cases[i] for i in val_idx],
                                device=settings.device)
    split_file = write_split(out, [c.case_id for c in cases], splits, seed=settings.seed,
                             selected=best_fold.fold, test=split.test)
    card = seal(card, out, seed=settings.seed, command=command, split_file=split_file)
    write_card(card, out)
    return metrics


def calibrate_ood(folder: Path, fit_cases: list, calibration_cases: list, *,
                  device: str = "auto") -> dict[str, Any]:
    """The OOD detector of a trained weights folder: fitted on its training images, the
    threshold set on its validation images; returns the card's ``ood`` section."""
    from radlens.models.ood import calibrate, case_images
    from radlens.tasks.breast_us.infer import Segmenter

    segmenter = Segmenter(folder, device=device)
    _, section = calibrate(segmenter, case_images(fit_cases), case_images(calibration_cases),
                           described={"fit_on": "the training split",
                                      "calibrated_on": "the validation split"})
    return section


def model_card(settings: TrainSettings, metrics: dict[str, Any], selected: FoldResult,
               command: str, parameters: int) -> dict[str, Any]:
    return {
        "name": f"radlens-{settings.arch}",
        "version": datetime.now(UTC).strftime("%Y.%m.%d"),
        "architecture": settings.arch,
        "in_channels": 1,
        "classes": list(CLASS_NAMES),
        "image_labels": ["normal", "benign", "malignant"],
        "input_size": [settings.size, settings.size],
        "input_normalisation": "greyscale, divided by 255 (or by its bit depth's top value "
                               "when it exceeds 255), resized bilinearly to the input size"
                               + (", keeping the aspect ratio (padded with black)"
                                  if settings.aspect == "pad" else ""),
        "preprocessing": settings.preprocessing,
        "parameters": parameters,
        "training": {"data": metrics["data"], "command": command, "settings": asdict(settings),
                     "selected_fold": selected.fold, "best_epoch": selected.best_epoch,
                     "radlens_version": __version__, "torch_version": torch.__version__},
        "validation": selected.report,
        "test": metrics.get("test"),
        "calibration": metrics.get("calibration"),
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "intended_use": BREAST_ULTRASOUND_SCOPE["intended_use"],
        "scope": BREAST_ULTRASOUND_SCOPE,
        "training_data": training_data_sentence(Path(metrics["data"]["path"]),
                                                images=metrics["data"]["cases"],
                                                patients=metrics["data"]["patients"]),
    }


def write_card(card: dict[str, Any], folder: Path) -> None:
    (folder / "card.json").write_text(json.dumps(card, indent=2))
    validation = card.get("validation") or {}
    lines = [f"# {card['name']} {card['version']}", "",
             "**Research use only. Not for diagnostic use.**", "",
             f"- architecture: {card['architecture']} ({card['parameters']:,} parameters)",
             f"- input: {card['input_size'][0]}x{card['input_size'][1]} greyscale, "
             f"classes {', '.join(card['classes'])}",
             f"- trained with: `{card['training']['command']}`",
             f"- data: {card['training']['data']}", ""]
    provenance = card.get("provenance")
    if provenance:
        env = provenance["environment"]
        lines += ["## Provenance", "",
                  f"- seed {provenance['seed']}; split by case ID: `{provenance['split']}`",
                  f"- radlens {env['radlens']} (commit {env['git_commit'] or 'not a checkout'}), "
                  f"Python {env['python']}, "
                  + ", ".join(f"{k} {v}" for k, v in env["libraries"].items() if v),
                  *[f"- SHA-256 `{name}`: `{digest}`"
                    for name, digest in provenance["sha256"].items()],
                  "- `radlens models verify FOLDER` checks the files against these hashes", ""]
    scope, ood = card.get("scope"), card.get("ood")
    if scope:
        lines += ["## Scope", "", scope["intended_use"], "",
                  f"- modalities: {', '.join(scope['modalities'])}; body parts: "
                  f"{', '.join(scope['body_parts'])} (SNOMED CT "
                  f"{', '.join(r['value'] for r in scope['anatomic_regions'])})",
                  f"- SOP classes: {', '.join(scope['sop_classes'])}",
                  f"- photometric interpretations: "
                  f"{', '.join(scope['photometric_interpretations'])}"]
        if scope.get("geometry"):
            geometry = ImageGeometry.model_validate(scope["geometry"]).describe()
            lines.append(f"- image geometry: {geometry}")
        lines.append("")
    if ood:
        lines += ["## Abstention (out-of-distribution score)", "",
                  f"- {ood['method']}; threshold {ood['threshold']:.2f} (quantile "
                  f"{ood['quantile']} of {ood['calibration_images']} held-out images)", ""]
        lines += [f"- {name}: {s['n']} frames, abstain rate {s['abstain_rate']:.3f}, median "
                  f"score {s['median']:.1f} (min {s['min']:.1f}, max {s['max']:.1f})"
                  for name, s in (ood.get("measured") or {}).items()]
        lines.append("")
    calibration = card.get("calibration")
    if calibration:
        tested = (card.get("test") or {}).get("calibration")
        lines += ["## Calibration", "",
                  f"- {calibration['method']}: T = {calibration['temperature']:.3f}, fitted on "
                  f"{calibration['fitted_on']}; the probabilities the agent states are these",
                  *([f"- test: ECE {tested['before']['ece']:.3f} as trained, "
                     f"{tested['after']['ece']:.3f} calibrated; Brier "
                     f"{tested['before']['brier']:.3f}, {tested['after']['brier']:.3f} "
                     f"({tested['after']['images']} images; `{tested['diagram']}`)"]
                    if tested else []), ""]
    if card.get("test"):
        lines.append(markdown_table(card["test"], "Test (held out: nothing was chosen on it)"))
    if validation:
        lines.append(markdown_table(validation, "Validation (early stopping, model selection "
                                                "and the OOD threshold were chosen on it)"))
    for name, measured in (card.get("measured") or {}).items():
        lines += ["", markdown_table(measured, f"Measured: {name}")]
    (folder / "card.md").write_text("\n".join(lines) + "\n")
