"""Training and evaluating the breast density model.

The published recipe, scaled to a CPU: patient-level stratified k-fold splits (every view of a
patient in one fold), undersampling of the majority categories each epoch (at most
``undersample_ratio`` times the rarest), inverse-frequency class weights in the weighted
contrastive loss, AdamW with cosine annealing, early stopping on the validation loss. Seeded:
the same data, settings and seed give the same weights on the same device.
"""

from __future__ import annotations

import csv
import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.transforms import Compose, RandAffine, RandGaussianNoise, RandScaleIntensity
from monai.utils import set_determinism
from PIL import Image
from sklearn.metrics import confusion_matrix, roc_auc_score

from radlens import __version__
from radlens.datasets.origin import training_data_sentence
from radlens.logs import kv
from radlens.models.calibration import (
    apply_temperature,
    as_trained_and_stated,
    card_temperature,
    fit_temperature,
    measure,
)
from radlens.models.cards import seal
from radlens.models.device import resolve_device
from radlens.models.folds import Splits, split_with_test, write_split
from radlens.models.metrics import classification_intervals
from radlens.models.training import EarlyStopping, cross_validate, fit
from radlens.tasks.mammo_density.model import (
    DENSITY_CLASSES,
    DESCRIPTIONS,
    INPUT_SIZE,
    DensityCLIP,
    DensityModel,
    Vocabulary,
    class_weights,
    prepare,
    weighted_contrastive_loss,
)

log = logging.getLogger(__name__)

MODEL_FILE = "model.pt"
CARD_FILE = "card.json"


class DensityDataError(ValueError):
    """A density dataset folder is missing or malformed."""


@dataclass(frozen=True)
class DensityCase:
    case_id: str
    patient_id: str
    label: int  # index into DENSITY_CLASSES
    path: Path
    view: str = ""
    laterality: str = ""


@dataclass(frozen=True)
class DensityTrainSettings:
    epochs: int = 40
    batch_size: int = 32
    learning_rate: float = 5e-4
    weight_decay: float = 1e-4
    patience: int = 8
    min_delta: float = 1e-4
    folds: int = 5
    seed: int = 0
    device: str = "auto"
    size: int = INPUT_SIZE
    weighted: bool = True  # inverse-frequency weights and undersampling (off: the ablation)
    undersample_ratio: float = 2.0
    # An open_clip folder (e.g. BiomedCLIP) to fine-tune instead of radlens's own encoders.
    clip: str | None = None
    test_fraction: float = 0.2  # patients held out first, reported only; 0: none


def new_density_model(settings: DensityTrainSettings, vocabulary: Vocabulary,
                      device: torch.device) -> DensityModel:
    """A fresh model for a fold: radlens's small encoders, or the user's CLIP weights."""
    if settings.clip is not None:
        from radlens.tasks.mammo_density.clip_backbone import load_open_clip

        return load_open_clip(Path(settings.clip), device)
    return DensityCLIP(vocabulary).to(device)


@dataclass
class DensityEpoch:
    epoch: int
    train_loss: float
    val_loss: float
    val_accuracy: float
    seconds: float


@dataclass
class DensityFold:
    fold: int
    best_epoch: int
    val_loss: float
    metrics: dict[str, Any]
    history: list[DensityEpoch] = field(default_factory=list)
    state: dict[str, torch.Tensor] | None = None


def load_density_cases(folder: Path) -> list[DensityCase]:
    """``labels.csv`` (case_id, patient_id, density, ...) and ``images/<case_id>.png``."""
    labels = folder / "labels.csv"
    if not labels.is_file():
        raise DensityDataError(f"{folder} has no labels.csv (make one with radlens phantoms "
                               "--task mammo_density)")
    cases, seen = [], set()
    with labels.open(newline="") as handle:
        for row in csv.DictReader(handle):
            try:
                density = row["density"].strip().upper()
                label = DENSITY_CLASSES.index(density)
            except (KeyError, ValueError):
                raise DensityDataError(f"{labels}: case {row.get('case_id')!r} has no density "
                                       f"A-D (got {row.get('density')!r})") from None
            if not (row.get("case_id") or "").strip():
                raise DensityDataError(f"{labels}: a row without a case_id ({dict(row)})")
            if row["case_id"] in seen:
                raise DensityDataError(f"{labels}: case {row['case_id']!r} is listed twice")
            seen.add(row["case_id"])
            path = folder / "images" / f"{row['case_id']}.png"
            if not path.is_file():
                raise DensityDataError(f"{path} is missing")
            cases.append(DensityCase(row["case_id"], row.get("patient_id") or row["case_id"],
                                     label, path, row.get("view", ""), row.get("laterality", "")))
    if not cases:
        raise DensityDataError(f"{labels} lists no cases")
    return cases


def prepared_images(cases: list[DensityCase], size: int) -> np.ndarray:
    """Every case prepared once (uint8, to keep a few thousand in memory)."""
    stack = np.zeros((len(cases), size, size), dtype=np.uint8)
    for i, case in enumerate(cases):
        image = np.asarray(Image.open(case.path).convert("L"))
        stack[i] = np.round(prepare(image, size).pixels * 255).astype(np.uint8)
    return stack


def balanced_epoch(labels: np.ndarray, rng: np.random.Generator, ratio: float) -> np.ndarray:
    """Indices for one epoch: each category at most ``ratio`` x the rarest one's count."""
    counts = np.bincount(labels, minlength=len(DENSITY_CLASSES))
    cap = int(max(1, ratio * counts[counts > 0].min()))
    chosen = []
    for label in range(len(DENSITY_CLASSES)):
        members = np.flatnonzero(labels == label)
        if len(members) > cap:
            members = rng.choice(members, cap, replace=False)
        chosen.append(members)
    order = np.concatenate(chosen)
    rng.shuffle(order)
    return order


def _augment(seed: int) -> Compose:
    augment = Compose([
        RandAffine(prob=0.7, rotate_range=0.12, scale_range=0.1, translate_range=(10, 10),
                   padding_mode="zeros"),
        RandScaleIntensity(factors=0.15, prob=0.5),
        RandGaussianNoise(prob=0.3, std=0.02),
    ])
    augment.set_random_state(seed)
    return augment


def _batched(model: DensityModel, images: np.ndarray, device: torch.device,
             run: Callable[[torch.Tensor], torch.Tensor], batch_size: int) -> list[np.ndarray]:
    """``run`` over a uint8 prepared stack in batches, in eval mode, without gradients."""
    model.eval()
    out = []
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            batch = torch.from_numpy(images[start:start + batch_size]).float().div(255.0)
            out.append(run(batch.unsqueeze(1).to(device)).cpu().numpy())
    return out


def predict_probabilities(model: DensityModel, images: np.ndarray, device: torch.device,
                          batch_size: int = 64) -> np.ndarray:
    """Softmax over the four descriptions, per image (uint8 prepared stack)."""
    out = _batched(model, images, device, lambda x: model(x).softmax(dim=1), batch_size)
    return np.concatenate(out) if out else np.zeros((0, len(DENSITY_CLASSES)))


def pooled_features(model: DensityModel, images: np.ndarray, device: torch.device,
                    batch_size: int = 64) -> np.ndarray:
    return np.concatenate(_batched(model, images, device, model.pooled_features, batch_size))


def density_metrics(labels: np.ndarray, probabilities: np.ndarray) -> dict[str, Any]:
    """Accuracy, one-vs-rest AUC per category and their mean, the confusion matrix (rows:
    truth, columns: prediction), and how many errors fall on a neighbouring category."""
    predicted = probabilities.argmax(axis=1)
    aucs: dict[str, float | None] = {}
    for index, name in enumerate(DENSITY_CLASSES):
        positives = labels == index
        aucs[name] = (float(roc_auc_score(positives, probabilities[:, index]))
                      if 0 < positives.sum() < len(labels) else None)
    errors = predicted != labels
    adjacent = int((np.abs(predicted - labels)[errors] == 1).sum())
    known = [v for v in aucs.values() if v is not None]
    return {
        "cases": int(len(labels)),
        "accuracy": float((~errors).mean()) if len(labels) else 0.0,
        "auc": aucs,
        "mean_auc": float(np.mean(known)) if known else None,
        "confusion": confusion_matrix(labels, predicted,
                                      labels=range(len(DENSITY_CLASSES))).tolist(),
        "errors": int(errors.sum()),
        "adjacent_errors": adjacent,
    }


def train_density_fold(fold: int, images: np.ndarray, labels: np.ndarray,
                       train_index: np.ndarray, val_index: np.ndarray,
                       settings: DensityTrainSettings, vocabulary: Vocabulary,
                       on_epoch: Callable[[int, DensityEpoch, int], None] | None = None
                       ) -> DensityFold:
    device = resolve_device(settings.device)
    torch.manual_seed(settings.seed + fold)
    model = new_density_model(settings, vocabulary, device)
    optimiser = torch.optim.AdamW(model.parameters(), lr=settings.learning_rate,
                                  weight_decay=settings.weight_decay)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, T_max=settings.epochs,
                                                          eta_min=settings.learning_rate / 100)
    train_labels = labels[train_index]
    weights = (class_weights(train_labels).to(device) if settings.weighted else None)
    val_weights = class_weights(labels[val_index]).to(device) if settings.weighted else None
    augment = _augment(settings.seed + fold)
    rng = np.random.default_rng([settings.seed, fold])
    val_labels = labels[val_index]
    latest: dict[str, np.ndarray] = {}

    def run_epoch(epoch: int) -> DensityEpoch:
        started = time.perf_counter()
        model.train()
        order = (train_index[balanced_epoch(train_labels, rng, settings.undersample_ratio)]
                 if settings.weighted else rng.permutation(train_index))
        losses = []
        for start in range(0, len(order), settings.batch_size):
            chosen = order[start:start + settings.batch_size]
            if len(chosen) < 2:
                continue
            batch = torch.stack([augment(torch.from_numpy(images[i]).float().div(255.0)[None])
                                 for i in chosen]).to(device)
            target = torch.from_numpy(labels[chosen]).long().to(device)
            loss = weighted_contrastive_loss(model(batch), target, weights)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            losses.append(float(loss.detach()))
        schedule.step()
        probabilities = predict_probabilities(model, images[val_index], device)
        latest["probabilities"] = probabilities
        with torch.no_grad():
            val_logits = torch.from_numpy(np.log(np.clip(probabilities, 1e-8, 1.0)))
            val_loss = float(weighted_contrastive_loss(
                val_logits.to(device), torch.from_numpy(val_labels).long().to(device),
                val_weights))
        accuracy = float((probabilities.argmax(1) == val_labels).mean())
        return DensityEpoch(epoch, float(np.mean(losses)) if losses else float("nan"),
                            val_loss, accuracy, time.perf_counter() - started)

    kept: dict[str, dict[str, Any]] = {}
    fitted = fit(model, epochs=settings.epochs,
                 stopping=EarlyStopping(settings.patience, settings.min_delta),
                 run_epoch=run_epoch, val_loss=lambda record: record.val_loss,
                 on_epoch=(None if on_epoch is None
                           else lambda record: on_epoch(fold, record, settings.epochs)),
                 on_best=lambda _record: kept.update(
                     metrics=density_metrics(val_labels, latest["probabilities"])))
    best = DensityFold(fold, fitted.best_epoch, fitted.best_val_loss, kept["metrics"],
                       history=fitted.history, state=fitted.best_state)
    log.info("density fold trained", extra=kv(fold=fold, best_epoch=best.best_epoch,
                                              accuracy=round(best.metrics["accuracy"], 3)))
    return best


def patient_folds(cases: list[DensityCase], folds: int, seed: int
                  ) -> list[tuple[np.ndarray, np.ndarray]]:
    """Patient-level folds stratified by category (every view of a patient in one fold); with
    fewer than two folds, the first of five as one hold-out split."""
    from radlens.models.folds import patient_folds as shared_folds

    splits = shared_folds([c.label for c in cases], [c.patient_id for c in cases],
                          folds if folds >= 2 else 5, seed)
    chosen = splits[:1] if folds < 2 else splits
    return [(np.array(train), np.array(val)) for train, val in chosen]


def density_splits(cases: list[DensityCase], settings: DensityTrainSettings) -> Splits:
    """Patient-level and stratified by category (every view of a patient on one side): the
    held-out test patients first, then the folds of the rest (fewer than two folds: one
    split with a fifth for validation)."""
    try:
        return split_with_test([c.label for c in cases], [c.patient_id for c in cases],
                               test_fraction=settings.test_fraction, folds=settings.folds,
                               val_fraction=0.2, seed=settings.seed)
    except ValueError as exc:
        raise DensityDataError(str(exc)) from exc


def save_card(folder: Path, card: dict[str, Any]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / CARD_FILE).write_text(json.dumps(card, indent=2) + "\n")


def save_model(folder: Path, state: dict[str, torch.Tensor], vocabulary: Vocabulary,
               card: dict[str, Any]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": state, "vocabulary": vocabulary.tokens,
                "descriptions": DESCRIPTIONS, "size": card["input_size"]}, folder / MODEL_FILE)
    save_card(folder, card)


def load_model(folder: Path, device: torch.device | str = "cpu") -> tuple[DensityModel,
                                                                           dict[str, Any]]:
    """A trained density model and its card: radlens's own (model.pt), or a fine-tuned
    open_clip model (clip/)."""
    from radlens.tasks.mammo_density.clip_backbone import CLIP_DIR, is_clip_folder, load_open_clip

    if is_clip_folder(folder / CLIP_DIR):
        card = json.loads((folder / CARD_FILE).read_text()) if (folder / CARD_FILE).is_file() \
            else {}
        return load_open_clip(folder / CLIP_DIR, device).eval(), card
    if not (folder / MODEL_FILE).is_file():
        raise DensityDataError(f"{folder} holds no {MODEL_FILE} (nor an open_clip {CLIP_DIR}/)")
    saved = torch.load(folder / MODEL_FILE, map_location="cpu", weights_only=True)
    model = DensityCLIP(Vocabulary.of_tokens(saved["vocabulary"]))
    model.load_state_dict(saved["state_dict"])
    card = json.loads((folder / CARD_FILE).read_text()) if (folder / CARD_FILE).is_file() else {}
    return model.to(device).eval(), card


def plot_density_curves(folds: list[DensityFold], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for result in folds:
        epochs = [r.epoch for r in result.history]
        left.plot(epochs, [r.train_loss for r in result.history], label=f"fold {result.fold} train")
        left.plot(epochs, [r.val_loss for r in result.history], "--",
                  label=f"fold {result.fold} validation")
        right.plot(epochs, [r.val_accuracy for r in result.history], label=f"fold {result.fold}")
    left.set(xlabel="epoch", ylabel="weighted contrastive loss")
    right.set(xlabel="epoch", ylabel="validation accuracy", ylim=(0, 1))
    left.legend(fontsize=7)
    right.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def run_density_training(data: Path, settings: DensityTrainSettings, out: Path, *,
                         command: str = "",
                         on_epoch: Callable[[int, DensityEpoch, int], None] | None = None,
                         test: Path | None = None, ablation: bool = False
                         ) -> dict[str, Any]:
    """Train over the folds, keep the fold with the lowest validation loss, write model.pt,
    card.json, metrics.json and curves.png into ``out``. With ``test`` (a folder of fresh
    cases) the model's figures on it go into the card; with ``ablation`` a model trained
    identically but without class weights and undersampling is measured beside it."""
    if test is not None:  # a test folder of its own: nothing held out of the training one
        settings = replace(settings, test_fraction=0.0)
    metrics = _train_and_save(data, settings, out, command=command, on_epoch=on_epoch)
    if test is None:
        return metrics
    card = json.loads((out / CARD_FILE).read_text())
    card["test"] = {"data": str(test), **evaluate_density_folder(test, out, out / "test",
                                                                   device=settings.device)}
    if ablation:
        unweighted = out / "ablation-unweighted"
        _train_and_save(data, replace(settings, weighted=False), unweighted, command=command,
                        on_epoch=on_epoch)
        card["ablation"] = {"without_class_weights": evaluate_density_folder(
            test, unweighted, unweighted / "test", device=settings.device)}
    save_card(out, card)
    metrics["test"] = card["test"]
    if ablation:
        metrics["ablation"] = card["ablation"]
    return metrics


def _train_and_save(data: Path, settings: DensityTrainSettings, out: Path, *, command: str,
                    on_epoch: Callable[[int, DensityEpoch, int], None] | None
                    ) -> dict[str, Any]:
    set_determinism(seed=settings.seed)
    cases = load_density_cases(data)
    images = prepared_images(cases, settings.size)
    labels = np.array([c.label for c in cases])
    vocabulary = Vocabulary(list(DESCRIPTIONS.values()))
    split = density_splits(cases, settings)
    splits = [(np.array(train), np.array(val)) for train, val in split.folds]
    results, chosen = cross_validate(
        splits,
        lambda fold, train_index, val_index: train_density_fold(
            fold, images, labels, np.asarray(train_index), np.asarray(val_index), settings,
            vocabulary, on_epoch),
        val_loss=lambda result: result.val_loss)
    selected = results[chosen]
    summary = {
        "accuracy": _mean_sd([r.metrics["accuracy"] for r in results]),
        "mean_auc": _mean_sd([r.metrics["mean_auc"] for r in results
                              if r.metrics["mean_auc"] is not None]),
        "auc": {name: _mean_sd([r.metrics["auc"][name] for r in results
                                if r.metrics["auc"][name] is not None])
                for name in DENSITY_CLASSES},
    }
    metrics = {
        "settings": asdict(settings),
        "data": {"folder": str(data), "views": len(cases),
                 "patients": len({c.patient_id for c in cases}),
                 "per_category": {name: int((labels == i).sum())
                                  for i, name in enumerate(DENSITY_CLASSES)}},
        "folds": [{"fold": r.fold, "best_epoch": r.best_epoch, "val_loss": r.val_loss,
                   **r.metrics} for r in results],
        "summary": summary,
        "selected_fold": selected.fold,
    }
    assert selected.state is not None
    card = density_card(settings, metrics, command)
    # Abstention: the distance of an image's pooled features to the training images', the
    # threshold at the 99th percentile of the held-out fold's.
    from radlens.models import ood

    device = resolve_device(settings.device)
    model = new_density_model(settings, vocabulary, device)
    model.load_state_dict(selected.state)
    train_index, val_index = splits[selected.fold]
    # Temperature scaling of the category probabilities, fitted on the selected fold's
    # validation views: what the agent states is then a probability that was measured as one.
    validation = predict_probabilities(model, images[val_index], device)
    temperature = fit_temperature(validation, labels[val_index])
    card["calibration"] = metrics["calibration"] = {
        "method": "temperature scaling of the category probabilities' logarithms",
        "temperature": temperature, "fitted_on": f"validation, fold {selected.fold}",
        "validation": {
            "before": measure(validation, labels[val_index]).as_dict(),
            "after": measure(apply_temperature(validation, temperature),
                             labels[val_index]).as_dict()}}
    out.mkdir(parents=True, exist_ok=True)
    if split.test:  # the selected model on patients nothing was chosen on
        test_index = np.array(split.test)
        probabilities = predict_probabilities(model, images[test_index], device)
        metrics["test"] = {**density_metrics(labels[test_index], probabilities),
                           "intervals": classification_intervals(
                               labels[test_index], probabilities, DENSITY_CLASSES,
                               settings.seed),
                           "calibration": calibration_report(
                               probabilities, labels[test_index], temperature, out),
                           "held_out": "patients held out before training"}
        card["test"] = metrics["test"]
    held_out = pooled_features(model, images[val_index], device)
    detector = ood.OodDetector.fit(pooled_features(model, images[train_index], device),
                                   held_out)
    detector.save(out)
    card["ood"] = {"method": "mahalanobis distance of the image encoder's pooled last block",
                   "threshold": detector.threshold, "quantile": 0.99,
                   "held_out": ood.summary(detector.score(held_out), detector.threshold)}
    if settings.clip is not None:
        from radlens.tasks.mammo_density.clip_backbone import CLIP_DIR

        model.cpu().save(out / CLIP_DIR)  # an open_clip folder: the user's tools read it too
        vision = model.config.get("model_cfg", {}).get("vision_cfg", {})
        tower = vision.get("timm_model_name") or f"ViT ({vision.get('layers')} layers)"
        card["architecture"] = (f"open_clip CLIP, {tower} image tower, fine-tuned from "
                                f"{settings.clip}")
        card["clip"] = {"from": str(settings.clip), "folder": CLIP_DIR}
        save_card(out, card)
    else:
        save_model(out, selected.state, vocabulary, card)
    split_file = write_split(out, [c.case_id for c in cases], splits, seed=settings.seed,
                             selected=selected.fold, test=split.test)
    save_card(out, seal(json.loads((out / CARD_FILE).read_text()), out, seed=settings.seed,
                        command=command, split_file=split_file))
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    plot_density_curves(results, out / "curves.png")
    return metrics


def _mean_sd(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"mean": None, "sd": None}
    return {"mean": float(np.mean(values)), "sd": float(np.std(values))}


# What the model was built for, in the form the agent's routing reads (ModelScope).
DENSITY_SCOPE = {
    "modalities": ["MG"],
    "body_parts": ["BREAST"],
    "anatomic_regions": [{"value": "76752008", "scheme": "SCT", "meaning": "Breast"}],
    "sop_classes": ["1.2.840.10008.5.1.4.1.1.1.2",  # Digital Mammography - For Presentation
                    "1.2.840.10008.5.1.4.1.1.13.1.4"],  # Breast Projection - For Presentation
    "photometric_interpretations": ["MONOCHROME1", "MONOCHROME2"],
    # One projection per image, as mammography units and the phantoms (12 bits stored) write
    # them: a multi-frame object, a thumbnail or an 8-bit secondary capture is not one.
    "geometry": {"frames": "single", "min_size": 96, "max_size": 6000, "min_bits_stored": 10,
                 "max_bits_stored": 16},
    "intended_use": "BI-RADS breast density category (A-D) of 2-D mammograms for presentation "
                    "(digital mammography and synthesized 2D), CC and MLO views; research "
                    "only, not for diagnostic use",
}


def density_card(settings: DensityTrainSettings, metrics: dict[str, Any],
                 command: str) -> dict[str, Any]:
    return {
        "name": "radlens-density",
        "task": "density",
        "version": f"{__version__}+{datetime.now(UTC).strftime('%Y%m%d')}",
        "architecture": "DensityCLIP (MONAI ResNet image encoder, transformer text encoder)",
        "input_size": settings.size,
        "classes": list(DENSITY_CLASSES),
        "descriptions": DESCRIPTIONS,
        "scope": DENSITY_SCOPE,
        "trained_on": metrics["data"],
        "validation": metrics["summary"],
        "command": command,
        "intended_use": "research only; not for diagnostic use",
        "training_data": training_data_sentence(Path(metrics["data"]["folder"]),
                                                images=metrics["data"]["views"],
                                                patients=metrics["data"]["patients"]),
    }


def density_markdown(metrics: dict[str, Any], title: str) -> str:
    """Accuracy, per-category AUC (with 95 % bootstrap intervals when measured), the
    confusion matrix and the calibration of the probabilities, as Markdown."""
    aucs = metrics["auc"]
    intervals = metrics.get("intervals") or {}

    def bounds(key: str) -> str:
        found = intervals.get(key)
        return f" ({found[0]:.3f}-{found[1]:.3f})" if found else ""

    lines = [f"## {title}", "",
             f"{metrics['cases']} views; accuracy {metrics['accuracy']:.3f}{bounds('accuracy')}"
             "; mean AUC "
             + (f"{metrics['mean_auc']:.3f}{bounds('mean_auc')}"
                if metrics["mean_auc"] is not None else "n/a")
             + f"; {metrics['errors']} errors, {metrics['adjacent_errors']} of them between "
               "neighbouring categories"
             + ("; in brackets, 95 % bootstrap intervals" if intervals else ""), "",
             "| category | AUC (one vs rest) |", "|---|---:|"]
    for name in DENSITY_CLASSES:
        value = aucs.get(name)
        lines.append(f"| {name} ({DESCRIPTIONS[name].rstrip('.')}) | "
                     + (f"{value:.3f}{bounds(f'auc_{name}')}" if value is not None else "n/a")
                     + " |")
    lines += ["", "Confusion matrix (rows: truth, columns: prediction):", "",
              "| truth \\ predicted | " + " | ".join(DENSITY_CLASSES) + " |",
              "|---|" + "---:|" * len(DENSITY_CLASSES)]
    for name, row in zip(DENSITY_CLASSES, metrics["confusion"], strict=True):
        lines.append(f"| {name} | " + " | ".join(str(v) for v in row) + " |")
    calibration = metrics.get("calibration")
    if calibration:
        before, after = calibration["before"], calibration["after"]
        line = (f"Calibration of the category probabilities: as trained, ECE "
                f"{before['ece']:.3f} and Brier {before['brier']:.3f}")
        if after:
            line += (f"; as the agent states them (temperature "
                     f"{calibration['temperature']:.2f}), ECE {after['ece']:.3f} and Brier "
                     f"{after['brier']:.3f}")
        else:
            line += "; the card states no calibration, so the agent states these"
        lines += ["", line + f". Reliability diagram: `{calibration['diagram']}`."]
    return "\n".join(lines) + "\n"


def evaluate_density_folder(data: Path, model_dir: Path, out: Path, *,
                            device: str = "auto", seed: int = 0) -> dict[str, Any]:
    """Run a density model over a labelled folder; write report.json and report.md."""
    resolved = resolve_device(device)
    model, card = load_model(model_dir, resolved)
    cases = load_density_cases(data)
    images = prepared_images(cases, int(card.get("input_size", INPUT_SIZE)))
    labels = np.array([c.label for c in cases])
    probabilities = predict_probabilities(model, images, resolved)
    out.mkdir(parents=True, exist_ok=True)
    metrics = {**density_metrics(labels, probabilities),
               "intervals": classification_intervals(labels, probabilities, DENSITY_CLASSES,
                                                     seed),
               "calibration": calibration_report(probabilities, labels,
                                                 card_temperature(card), out)}
    title = f"{card.get('name', model_dir.name)} {card.get('version', '')} on {data}"
    (out / "report.json").write_text(json.dumps({"model": card.get("name"),
                                                 "version": card.get("version"),
                                                 "data": str(data), **metrics}, indent=2) + "\n")
    (out / "report.md").write_text(density_markdown(metrics, title))
    return metrics


def calibration_report(probabilities: np.ndarray, labels: np.ndarray, temperature: float,
                       out: Path) -> dict[str, Any]:
    """ECE and Brier score of the category probabilities as the network gives them and as the
    agent states them (after ``temperature``), with ``reliability.png`` in ``out``."""
    before, after = as_trained_and_stated(probabilities, labels, temperature,
                                          out / "reliability.png",
                                          "Density category probabilities")
    return {"temperature": temperature, "before": before.as_dict(),
            "after": after.as_dict() if after else None, "diagram": "reliability.png"}
