"""Training the dermoscopy model: both segmentation stages' coarse UNet, the classifier with
its alignment, calibration, the OOD detector, and the held-out test set run through the
agent's own path.

The protocol the other tasks share: a test set of patients held out first (reported only),
then patient-grouped, label-stratified folds of the rest (``--folds``; one split with a fifth
for validation otherwise). The coarse UNet trains once, on the first split. The classifier
trains on every fold and the fold of lowest validation loss is kept; its temperature is
fitted on that fold's validation images, and its OOD threshold on them (the Mahalanobis
distance of the pooled image feature). The ABC(D) vector each image is paired with is
measured on its true mask. With ``ablation`` the classifier is also trained without the
alignment loss, and the card reports both on the test set. Seeded: the same data, settings
and seed give the same weights on the same device.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

from radlens import __version__
from radlens.datasets.origin import training_data_sentence
from radlens.logs import kv
from radlens.tasks.dermoscopy.classifier import (
    ClassifierEpoch,
    ClassifierShape,
    train_classifier,
)
from radlens.tasks.dermoscopy.datasets import (
    DermoscopyDataError,
    DermoscopyRecord,
    load_mask,
    load_rgb,
    read_folder,
)
from radlens.tasks.dermoscopy.descriptors import DESCRIPTORS
from radlens.tasks.dermoscopy.features import DEFAULT_CUT_POINTS, FeatureError, measure_abc
from radlens.tasks.dermoscopy.scope import DERMOSCOPY_SCOPE
from radlens.tasks.dermoscopy.segment import (
    SEGMENTER_SIZE,
    SegmenterEpoch,
    prepare_mask,
    prepare_rgb,
    train_coarse,
)

log = logging.getLogger(__name__)

CARD_FILE = "card.json"
@dataclass(frozen=True)
class DermoscopyTrainSettings:
    epochs: int = 60
    segmenter_epochs: int = 30
    batch_size: int = 32
    learning_rate: float = 3e-4
    patience: int = 8
    folds: int = 0
    seed: int = 0
    device: str = "auto"
    size: int = 128  # the classifier's input; the coarse UNet's is SEGMENTER_SIZE
    alignment_weight: float = 1.0
    alignment_temperature: float = 0.1  # NT-Xent's temperature
    confounder_rate: float = 0.2  # photographs painted with ink, and with hair, in training
    descriptor_weight: float = 1.0
    freeze_encoder: bool = False
    test_fraction: float = 0.2
    val_fraction: float = 0.2


@dataclass
class Prepared:
    records: list[DermoscopyRecord]
    images: torch.Tensor  # (N, 3, size, size) uint8: the classifier's input
    seg_images: torch.Tensor  # (N, 3, s, s) uint8: the coarse UNet's input
    seg_masks: torch.Tensor  # (N, 1, s, s) uint8
    abc: np.ndarray  # (N, 8) on the true masks
    targets: torch.Tensor  # (N,) 0 nevus, 1 melanoma
    descriptors: torch.Tensor  # (N, 13) 1/0 true descriptors, rows of -1 where none stated


def prepare(records: list[DermoscopyRecord], size: int,
            on_case: Callable[[int], None] | None = None) -> Prepared:
    """Each photograph read once: its inputs at both sizes (uint8, a quarter of float32's
    memory) and its ABC(D) vector on its true mask."""
    images, seg_images, seg_masks, vectors = [], [], [], []
    for number, record in enumerate(records, 1):
        image = load_rgb(record.image)
        assert record.mask is not None
        mask = load_mask(record.mask)
        if mask.shape != image.shape[:2]:
            raise DermoscopyDataError(f"{record.mask}: {mask.shape} does not match its image "
                                      f"{image.shape[:2]}")
        try:
            vectors.append(measure_abc(image, mask, spacing_mm=record.spacing_mm).vector())
        except FeatureError as exc:
            raise DermoscopyDataError(f"{record.mask}: {exc}") from exc
        images.append((prepare_rgb(image, size) * 255).round().to(torch.uint8))
        seg_images.append((prepare_rgb(image, SEGMENTER_SIZE) * 255).round().to(torch.uint8))
        seg_masks.append(prepare_mask(mask, SEGMENTER_SIZE).to(torch.uint8))
        if on_case is not None:
            on_case(number)
    truth = torch.tensor([[float(name in r.descriptors) for name in DESCRIPTORS]
                          if r.descriptors else [-1.0] * len(DESCRIPTORS) for r in records])
    return Prepared(records, torch.stack(images), torch.stack(seg_images),
                    torch.stack(seg_masks), np.stack(vectors),
                    torch.tensor([r.target for r in records], dtype=torch.long), truth)


def _curves(segmenter: list[SegmenterEpoch], folds: list[list[ClassifierEpoch]],
            path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, middle, right) = plt.subplots(1, 3, figsize=(13, 3.8))
    epochs = [r.epoch for r in segmenter]
    left.plot(epochs, [r.train_loss for r in segmenter], label="train")
    left.plot(epochs, [r.val_loss for r in segmenter], "--", label="validation")
    left.plot(epochs, [r.val_dice for r in segmenter], ":", label="validation Dice")
    left.set(xlabel="epoch", title="coarse UNet (Dice + cross-entropy)")
    for fold, history in enumerate(folds):
        epochs = [r.epoch for r in history]
        middle.plot(epochs, [r.train_loss for r in history], label=f"fold {fold} train")
        middle.plot(epochs, [r.val_loss for r in history], "--",
                    label=f"fold {fold} validation")
        right.plot(epochs, [r.val_accuracy for r in history], label=f"fold {fold}")
    middle.set(xlabel="epoch", title="classifier (BCE + NT-Xent)")
    right.set(xlabel="epoch", ylabel="validation accuracy", ylim=(0, 1))
    for axis in (left, middle, right):
        axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def run_training(data: Path, settings: DermoscopyTrainSettings, out: Path, *, command: str,
                 ablation: bool = False,
                 progress: Callable[[str, str, int, int, str], None] | None = None
                 ) -> dict[str, Any]:
    """Train into ``out`` (model.pt, card.json, split.json, metrics.json, curves.png, ood.npz,
    test/ with the held-out report); returns the metrics. ``progress(key, label, done,
    total, info)`` is called as cases are read and epochs end."""
    from monai.utils import set_determinism

    from radlens.models import ood
    from radlens.models.calibration import apply_temperature, fit_temperature, measure
    from radlens.models.cards import seal
    from radlens.models.device import resolve_device
    from radlens.models.folds import split_with_test, write_split
    from radlens.models.training import cross_validate
    from radlens.tasks.dermoscopy.evaluate import evaluate_records, report, write_report
    from radlens.tasks.dermoscopy.model import DermoscopyModel

    def tell(key: str, label: str, done: int, total: int, info: str = "") -> None:
        if progress is not None:
            progress(key, label, done, total, info)

    set_determinism(seed=settings.seed)
    device = str(resolve_device(settings.device))
    records = read_folder(data, masks=True)
    prepared = prepare(records, settings.size,
                       lambda n: tell("read", "reading images", n, len(records)))
    labels = [r.label for r in records]
    patients = [r.patient_id for r in records]
    split = split_with_test(labels, patients, test_fraction=settings.test_fraction,
                            folds=settings.folds, val_fraction=settings.val_fraction,
                            seed=settings.seed)
    first_train, first_val = split.folds[0]
    segmenter, seg_history, seg_best = train_coarse(
        prepared.seg_images, prepared.seg_masks, first_train, first_val,
        epochs=settings.segmenter_epochs, batch_size=settings.batch_size,
        learning_rate=1e-3, patience=settings.patience, seed=settings.seed, device=device,
        on_epoch=lambda r: tell("segmenter", "coarse UNet", r.epoch, settings.segmenter_epochs,
                                f"val Dice {r.val_dice:.3f}"))
    shape = ClassifierShape(image_size=settings.size,
                            temperature=settings.alignment_temperature)

    def train_fold(fold: int, train: list[int], val: list[int],
                   alignment_weight: float = settings.alignment_weight) -> dict[str, Any]:
        train_abc = prepared.abc[list(train)]
        mean, scale = train_abc.mean(axis=0), train_abc.std(axis=0) + 1e-6
        standardised = torch.as_tensor((prepared.abc - mean) / scale, dtype=torch.float32)
        key = f"fold {fold}" + ("" if alignment_weight else " (no alignment)")
        network, history, best = train_classifier(
            prepared.images, standardised, prepared.targets, list(train), list(val),
            shape=shape, epochs=settings.epochs, batch_size=settings.batch_size,
            learning_rate=settings.learning_rate, patience=settings.patience,
            alignment_weight=alignment_weight, freeze_encoder=settings.freeze_encoder,
            confounder_rate=settings.confounder_rate,
            seed=settings.seed + fold, device=device, descriptors=prepared.descriptors,
            descriptor_weight=settings.descriptor_weight,
            on_epoch=lambda r: tell(key, f"classifier {key}", r.epoch, settings.epochs,
                                    f"loss {r.train_loss:.3f} / {r.val_loss:.3f}  accuracy "
                                    f"{r.val_accuracy:.3f}"))
        kept = next(r for r in history if r.epoch == best)
        return {"network": network, "history": history, "best_epoch": best,
                "val_loss": kept.val_loss, "val_accuracy": kept.val_accuracy,
                "abc_mean": mean, "abc_scale": scale, "train": list(train), "val": list(val)}

    outcomes, chosen = cross_validate(split.folds, train_fold, lambda o: o["val_loss"])
    selected = outcomes[chosen]

    def assemble(outcome: dict[str, Any], card: dict[str, Any] | None) -> DermoscopyModel:
        return DermoscopyModel(segmenter, outcome["network"], segmenter_size=SEGMENTER_SIZE,
                               abc_mean=outcome["abc_mean"], abc_scale=outcome["abc_scale"],
                               card=card, device=device)

    model = assemble(selected, None)
    val = selected["val"]
    validation, pooled_val = model.classify(prepared.images[val])
    targets = prepared.targets.numpy()
    pairs = np.stack([1 - validation, validation], axis=1)
    temperature = fit_temperature(pairs, targets[val])
    _, pooled_train = model.classify(prepared.images[selected["train"]])
    detector = ood.OodDetector.fit(pooled_train, pooled_val)
    card = dermoscopy_card(settings, records, data, command, shape)
    card["calibration"] = {
        "method": "temperature scaling of the melanoma probability's logit",
        "temperature": temperature, "fitted_on": f"validation, fold {chosen}",
        "validation": {"before": measure(pairs, targets[val]).as_dict(),
                       "after": measure(apply_temperature(pairs, temperature),
                                        targets[val]).as_dict()}}
    card["ood"] = {"method": "mahalanobis distance of the ViT's pooled patch tokens",
                   "threshold": detector.threshold, "quantile": 0.99,
                   "held_out": ood.summary(detector.score(pooled_val), detector.threshold)}
    card["segmentation"] = {"coarse": "MONAI UNet (16, 32, 64, 128), DiceCE",
                            "input_size": SEGMENTER_SIZE, "best_epoch": seg_best,
                            "validation_dice": next(r.val_dice for r in seg_history
                                                    if r.epoch == seg_best),
                            "refiner": "random walker (scikit-image), or SAM2 from a folder"}
    card["validation"] = {"folds": [{"fold": k, "best_epoch": o["best_epoch"],
                                     "val_loss": o["val_loss"], "accuracy": o["val_accuracy"]}
                                    for k, o in enumerate(outcomes)],
                          "selected_fold": chosen}
    model.card = card
    out.mkdir(parents=True, exist_ok=True)
    model.save(out)
    detector.save(out)
    metrics: dict[str, Any] = {"settings": asdict(settings), "card": card,
                               "segmenter": [asdict(r) for r in seg_history],
                               "folds": [[asdict(r) for r in o["history"]] for o in outcomes]}
    if split.test:
        test_records = [records[i] for i in split.test]
        results = evaluate_records(model, test_records, on_case=lambda n: tell(
            "test", "test set", n, len(test_records)))
        figures = report(results, out / "test", temperature=temperature, seed=settings.seed)
        write_report(figures, out / "test", "Held-out test set (patients held out before "
                     "training)")
        card["test"] = metrics["test"] = figures
        if ablation:
            plain = train_fold(chosen, selected["train"], val, alignment_weight=0.0)
            plain_model = assemble(plain, card)
            plain_results = evaluate_records(plain_model, test_records)
            ablation_figures = report(plain_results, out / "test" / "ablation",
                                      temperature=temperature, seed=settings.seed)
            card["ablation"] = metrics["ablation"] = {
                "without_alignment": {
                    "classification": ablation_figures["classification"],
                    "alignment": ablation_figures["alignment"]}}
    split_file = write_split(out, [r.case_id for r in records], split.folds,
                             seed=settings.seed, selected=chosen, test=split.test)
    (out / CARD_FILE).write_text(json.dumps(card, indent=2) + "\n")
    sealed = seal(card, out, seed=settings.seed, command=command, split_file=split_file)
    (out / CARD_FILE).write_text(json.dumps(sealed, indent=2) + "\n")
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, default=str) + "\n")
    _curves(seg_history, [o["history"] for o in outcomes], out / "curves.png")
    log.info("dermoscopy model trained", extra=kv(out=str(out), fold=chosen,
                                                  temperature=round(temperature, 3)))
    return metrics


def dermoscopy_card(settings: DermoscopyTrainSettings, records: list[DermoscopyRecord],
                    data: Path, command: str, shape: ClassifierShape) -> dict[str, Any]:
    patients = len({r.patient_id for r in records})
    return {
        "name": "radlens-dermoscopy",
        "task": "dermoscopy",
        "version": f"{__version__}+{datetime.now(UTC).strftime('%Y%m%d')}",
        "architecture": (f"MONAI UNet coarse mask, random-walker refinement, MONAI ViT "
                         f"({shape.num_layers} blocks of {shape.hidden_size}, "
                         f"{shape.patch_size}-pixel patches) aligned with the ABC(D) features "
                         "by NT-Xent"),
        "input_size": settings.size,
        "classes": ["nevus", "melanoma"],
        "classifier": asdict(shape),
        "features": {"cut_points": {k: list(v) for k, v in DEFAULT_CUT_POINTS.items()},
                     "vector": ["A", "A major axis", "A minor axis", "B turns", "sigma H",
                                "sigma S", "sigma V", "D mm"]},
        "scope": DERMOSCOPY_SCOPE,
        "trained_on": {"folder": str(data), "images": len(records), "patients": patients,
                       "melanoma": sum(r.target for r in records)},
        "settings": asdict(replace(settings)),
        "command": command,
        "intended_use": DERMOSCOPY_SCOPE["intended_use"],
        "training_data": training_data_sentence(data, images=len(records), patients=patients),
    }
