"""The loops every task's training shares: the epoch loop with early stopping on the validation
loss, and the fold loop that trains each cross-validation split and selects one.

A task supplies what differs (how one epoch trains and validates, what it records, what a fold
leaves behind); these loops own what must not differ between tasks: which epoch's weights are
kept (the lowest validation loss, improved by more than ``min_delta``), when training stops
(``patience`` epochs without such an improvement), that kept weights are copies on the CPU (a
``model.pt`` saved from them loads on a machine without a GPU), and which fold is selected.

Checked first: MONAI's ``SupervisedTrainer`` with its ``EarlyStopHandler`` and
``CheckpointSaver`` runs on pytorch-ignite, which radlens does not otherwise need, and it wants
the batches of one loader; the density task's epochs are resampled (class-balanced
undersampling) every epoch. The loop itself is a dozen lines.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import torch

from radlens.logs import kv

log = logging.getLogger(__name__)

Record = TypeVar("Record")
FoldOutcome = TypeVar("FoldOutcome")


@dataclass(frozen=True)
class EarlyStopping:
    """Stop after ``patience`` epochs whose validation loss is not below the best by more
    than ``min_delta``."""

    patience: int
    min_delta: float = 0.0

    def __post_init__(self) -> None:
        if self.patience < 1:
            raise ValueError(f"patience must be at least 1 epoch, not {self.patience}")
        if self.min_delta < 0:
            raise ValueError(f"min_delta must not be negative, not {self.min_delta}")


@dataclass
class Fit(Generic[Record]):
    """What the epoch loop leaves: every epoch's record, the kept epoch and its weights."""

    history: list[Record] = field(default_factory=list)
    best_epoch: int = 0
    best_val_loss: float = float("inf")
    best_state: dict[str, torch.Tensor] = field(default_factory=dict)
    stopped_early: bool = False


def cpu_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A copy of the model's weights on the CPU, detached from the model's own tensors."""
    return {name: value.detach().to("cpu", copy=True) for name, value in
            model.state_dict().items()}


def fit(model: torch.nn.Module, *, epochs: int, stopping: EarlyStopping,
        run_epoch: Callable[[int], Record], val_loss: Callable[[Record], float],
        on_epoch: Callable[[Record], None] | None = None,
        on_best: Callable[[Record], None] | None = None) -> Fit[Record]:
    """Run ``run_epoch(epoch)`` (train one epoch, validate, return the task's record) for
    epochs 1 to ``epochs``, keeping the weights of the epoch with the lowest
    ``val_loss(record)``; ``on_best`` is called when an epoch becomes the kept one, while the
    model still holds its weights. Stops early by ``stopping``. The model is left holding the
    kept weights."""
    if epochs < 1:
        raise ValueError(f"epochs must be at least 1, not {epochs}")
    result: Fit[Record] = Fit()
    waited = 0
    for epoch in range(1, epochs + 1):
        record = run_epoch(epoch)
        result.history.append(record)
        if on_epoch is not None:
            on_epoch(record)
        loss = float(val_loss(record))
        if not result.best_state or loss < result.best_val_loss - stopping.min_delta:
            result.best_epoch, result.best_val_loss, waited = epoch, loss, 0
            result.best_state = cpu_state(model)
            if on_best is not None:
                on_best(record)
        else:
            waited += 1
            if waited >= stopping.patience:
                result.stopped_early = True
                log.info("early stop", extra=kv(epoch=epoch, best_epoch=result.best_epoch,
                                                 patience=stopping.patience))
                break
    model.load_state_dict(result.best_state)
    return result


def cross_validate(splits: Sequence[tuple[Sequence[int], Sequence[int]]],
                   train_fold: Callable[[int, Sequence[int], Sequence[int]], FoldOutcome],
                   val_loss: Callable[[FoldOutcome], float]
                   ) -> tuple[list[FoldOutcome], int]:
    """Train every split (``train_fold(fold, train indices, validation indices)``) and select
    the fold whose kept model has the lowest validation loss (the first on a tie); returns
    every fold's outcome and the selected fold's index."""
    if not splits:
        raise ValueError("no splits to train")
    outcomes = [train_fold(fold, train, val) for fold, (train, val) in enumerate(splits)]
    selected = min(range(len(outcomes)), key=lambda fold: val_loss(outcomes[fold]))
    log.info("folds trained", extra=kv(folds=len(outcomes), selected=selected))
    return outcomes, selected
