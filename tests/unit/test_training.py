"""The shared training loops: which epoch's weights are kept, when training stops, that kept
weights are CPU copies, and which fold is selected."""

from __future__ import annotations

import pytest
import torch

from radlens.models.training import EarlyStopping, cpu_state, cross_validate, fit


def _scripted(model: torch.nn.Module, losses: list[float]):
    """An epoch that sets the weight to the epoch number and reports a scripted loss."""
    def run_epoch(epoch: int) -> tuple[int, float]:
        with torch.no_grad():
            model.weight.fill_(float(epoch))
        return epoch, losses[epoch - 1]
    return run_epoch


def test_fit_keeps_the_best_epoch_and_stops_after_patience_without_improvement() -> None:
    model = torch.nn.Linear(1, 1)
    seen, best = [], []
    losses = [1.0, 0.5, 0.49995, 0.6, 0.7, 0.2, 0.1]
    result = fit(model, epochs=7, stopping=EarlyStopping(patience=3, min_delta=1e-3),
                 run_epoch=_scripted(model, losses), val_loss=lambda record: record[1],
                 on_epoch=seen.append, on_best=best.append)
    # Epoch 3 improves by less than min_delta, 4 and 5 not at all: stop after epoch 5.
    assert [epoch for epoch, _ in result.history] == [1, 2, 3, 4, 5] == [e for e, _ in seen]
    assert result.stopped_early and result.best_epoch == 2 and result.best_val_loss == 0.5
    assert [epoch for epoch, _ in best] == [1, 2]
    assert float(model.weight) == 2.0  # the model holds the kept weights
    assert result.best_state["weight"].device.type == "cpu"


def test_fit_runs_every_epoch_while_the_loss_improves() -> None:
    model = torch.nn.Linear(1, 1)
    result = fit(model, epochs=4, stopping=EarlyStopping(patience=1),
                 run_epoch=_scripted(model, [4.0, 3.0, 2.0, 1.0]),
                 val_loss=lambda record: record[1])
    assert not result.stopped_early and result.best_epoch == 4 and float(model.weight) == 4.0


def test_kept_weights_are_copies_the_model_cannot_change() -> None:
    model = torch.nn.Linear(2, 1)
    state = cpu_state(model)
    with torch.no_grad():
        model.weight.add_(1.0)
    assert not torch.equal(state["weight"], model.weight)


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="patience"):
        EarlyStopping(patience=0)
    with pytest.raises(ValueError, match="min_delta"):
        EarlyStopping(patience=2, min_delta=-1.0)
    with pytest.raises(ValueError, match="epochs"):
        fit(torch.nn.Linear(1, 1), epochs=0, stopping=EarlyStopping(1),
            run_epoch=lambda epoch: epoch, val_loss=float)
    with pytest.raises(ValueError, match="no splits"):
        cross_validate([], lambda fold, train, val: fold, val_loss=float)


def test_cross_validate_trains_every_split_and_selects_the_lowest_loss_first_on_a_tie() -> None:
    splits = [([1, 2], [0]), ([0, 2], [1]), ([0, 1], [2])]
    calls = []

    def train_fold(fold: int, train, val) -> float:
        calls.append((fold, list(train), list(val)))
        return [0.3, 0.2, 0.2][fold]

    outcomes, selected = cross_validate(splits, train_fold, val_loss=lambda loss: loss)
    assert outcomes == [0.3, 0.2, 0.2] and selected == 1
    assert calls == [(0, [1, 2], [0]), (1, [0, 2], [1]), (2, [0, 1], [2])]
