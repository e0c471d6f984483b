"""The shared training loop: schedule, early stopping that restores the best epoch, callbacks."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ptserve.server.training.loop import Callbacks, Evaluation, FitConfig, fit


class Recorder(Callbacks):
    def __init__(self):
        self.started, self.steps, self.epochs = None, [], []

    def on_start(self, epochs, steps_per_epoch):
        self.started = (epochs, steps_per_epoch)

    def on_step(self, epoch, step, loss):
        self.steps.append((epoch, step))

    def on_epoch(self, stats):
        self.epochs.append(stats)


def test_early_stopping_restores_the_best_epoch_and_reports_progress():
    torch.manual_seed(0)
    module = nn.Linear(2, 1)
    items = list(range(10))
    scores = iter([0.5, 0.7, 0.6, 0.7, 0.65, 0.9])  # best at epoch 2; epoch 4 ties it with a higher loss
    snapshots = []

    def batch_loss(batch):
        return module(torch.ones(len(batch), 2)).pow(2).mean()

    def evaluate():
        snapshots.append(module.weight.detach().clone())
        score = next(scores)
        return Evaluation(loss=1.0 if len(snapshots) != 4 else 2.0, score=score)

    rec = Recorder()
    result = fit(
        module,
        [{"params": list(module.parameters()), "lr": 0.1}],
        items,
        batch_loss,
        evaluate,
        FitConfig(epochs=6, batch_size=4, seed=0, patience=3, warmup_ratio=0.1),
        rec,
    )
    assert rec.started == (6, 3)
    assert len(result.history) == 5 and result.stopped_early  # epochs 3, 4, 5 were no better than 2
    assert result.best_epoch == 2 and [s.best for s in result.history] == [True, True, False, False, False]
    assert torch.equal(module.weight, snapshots[1])  # weights of epoch 2 restored
    assert rec.steps[:3] == [(1, 1), (1, 2), (1, 3)] and len(result.step_losses) == 15
    assert not module.training


def test_a_scored_start_is_kept_when_no_epoch_beats_it():
    module = nn.Linear(2, 1)
    start = module.weight.detach().clone()
    scores = iter([0.8, 0.7, 0.75, 0.8])  # the start, then 3 epochs: the last ties with a higher loss

    def evaluate():
        score = next(scores)
        return Evaluation(loss=0.5 if score == 0.8 and torch.equal(module.weight, start) else 0.9, score=score)

    result = fit(module, [{"params": list(module.parameters()), "lr": 0.1}], list(range(8)),
                 lambda b: module(torch.ones(len(b), 2)).pow(2).mean(), evaluate,
                 FitConfig(epochs=5, batch_size=4, seed=0, patience=3, warmup_ratio=0.0, evaluate_start=True))
    assert result.best_epoch == 0 and result.start == Evaluation(loss=0.5, score=0.8)
    assert len(result.history) == 3 and not any(s.best for s in result.history)  # patience counts from the start
    assert torch.equal(module.weight, start)


def test_without_eval_data_runs_every_epoch_and_keeps_the_last():
    module = nn.Linear(1, 1)
    result = fit(
        module,
        [{"params": list(module.parameters()), "lr": 0.01}],
        [1, 2, 3],
        lambda b: module(torch.ones(len(b), 1)).sum() ** 2,
        None,
        FitConfig(epochs=3, batch_size=2, seed=0, patience=1, warmup_ratio=0.0),
    )
    assert len(result.history) == 3 and result.best_epoch == 3 and not result.stopped_early


def test_the_schedule_warms_up_linearly_then_decays_linearly_to_zero():
    module = nn.Linear(2, 1)
    groups = [{"params": list(module.parameters()), "lr": 1.0}]  # AdamW keeps these dicts: their lr is the step's
    seen = []

    def batch_loss(batch):
        seen.append(groups[0]["lr"])
        return module(torch.ones(len(batch), 2)).pow(2).mean()

    # 5 epochs x 4 steps = 20 steps, warm-up 0.2 -> 4 steps: 1/4, 2/4, 3/4, 1, then (20 - s) / 16 down to 1/16
    fit(module, groups, list(range(8)), batch_loss, None,
        FitConfig(epochs=5, batch_size=2, seed=0, patience=0, warmup_ratio=0.2, weight_decay=0.1))
    want = [0.25, 0.5, 0.75, 1.0] + [(20 - s) / 16 for s in range(4, 20)]
    assert seen == pytest.approx(want)
    assert groups[0]["weight_decay"] == 0.1  # the decay reaches the optimizer


def test_a_deadline_stops_after_the_running_epoch():
    import time

    module = nn.Linear(2, 1)
    result = fit(module, [{"params": list(module.parameters()), "lr": 0.01}], list(range(4)),
                 lambda b: module(torch.ones(len(b), 2)).pow(2).mean(), lambda: Evaluation(1.0, 0.5),
                 FitConfig(epochs=50, batch_size=2, seed=0, patience=0, warmup_ratio=0.0,
                           deadline=time.perf_counter()))
    assert len(result.history) == 1 and result.stopped_early
