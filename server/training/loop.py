"""The training loop shared by every task: AdamW, linear warm-up and decay, gradient clipping, per-epoch
evaluation, early stopping that restores the best epoch's weights, and callbacks for progress display."""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from torch import nn


@dataclass
class Evaluation:
    loss: float
    score: float  # higher is better: accuracy for classification, -loss for language modelling
    metrics: dict[str, float] = field(default_factory=dict)  # shown in progress and written to training.json


@dataclass
class EpochStats:
    epoch: int  # 1-based
    train_loss: float
    seconds: float  # wall time of the epoch, evaluation included
    eval: Evaluation | None = None
    best: bool = False


@dataclass
class FitConfig:
    epochs: int
    batch_size: int
    seed: int
    patience: int  # epochs without a better eval score before stopping (0 = never stop early)
    warmup_ratio: float
    weight_decay: float = 0.0  # AdamW's decoupled decay, on every parameter of the groups
    max_grad_norm: float = 1.0
    deadline: float | None = None  # time.perf_counter() after which no further epoch starts (a search's budget)
    evaluate_start: bool = False  # score the starting weights too: "epoch 0" may be the best (a probe start)


class Callbacks:
    """Progress hooks; the CLI shows them with rich, tests record them. All optional."""

    def on_start(self, epochs: int, steps_per_epoch: int) -> None: ...

    def on_step(self, epoch: int, step: int, loss: float) -> None: ...

    def on_epoch(self, stats: EpochStats) -> None: ...


@dataclass
class FitResult:
    history: list[EpochStats]
    best_epoch: int
    stopped_early: bool
    seconds: float
    step_losses: list[float]
    start: Evaluation | None = None  # of the starting weights (FitConfig.evaluate_start); best_epoch 0 = these


def lr_factor(step: int, warmup: int, total: int) -> float:
    """The learning-rate multiplier of step ``step`` (0-based): linear warm-up to 1 over ``warmup`` steps, then
    linear decay to 0 at ``total`` (BERT's and P-Tuning v2's schedule)."""
    if step < warmup:
        return (step + 1) / warmup
    return max(0.0, (total - step) / max(1, total - warmup))


def fit(
    module: nn.Module,  # holds every trainable parameter (and nothing frozen)
    param_groups: list[dict],  # AdamW groups: {"params": [...], "lr": ...}
    items: Sequence,  # training items; batches are index lists into this
    batch_loss: Callable[[list], torch.Tensor],  # items of one batch -> mean loss (module in train mode)
    evaluate: Callable[[], Evaluation] | None,  # module in eval mode, under no_grad
    cfg: FitConfig,
    callbacks: Callbacks | None = None,
) -> FitResult:
    callbacks = callbacks or Callbacks()
    g = torch.Generator().manual_seed(cfg.seed)
    steps_per_epoch = math.ceil(len(items) / cfg.batch_size)
    total = steps_per_epoch * cfg.epochs
    warmup = int(total * cfg.warmup_ratio)
    optimizer = torch.optim.AdamW(param_groups, weight_decay=cfg.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, warmup, total))
    trainable = [p for group in param_groups for p in group["params"]]
    history: list[EpochStats] = []
    step_losses: list[float] = []
    best_score, best_state, best_epoch, stale = (-math.inf, 0.0), None, 0, 0
    start, at_start = time.perf_counter(), None
    if evaluate is not None and cfg.evaluate_start:
        module.eval()
        with torch.no_grad():
            at_start = evaluate()
        best_score, best_state = (at_start.score, -at_start.loss), copy.deepcopy(module.state_dict())
    callbacks.on_start(cfg.epochs, steps_per_epoch)
    for epoch in range(1, cfg.epochs + 1):
        t0, losses = time.perf_counter(), []
        module.train()
        order = torch.randperm(len(items), generator=g).tolist()
        for step in range(steps_per_epoch):
            batch = [items[i] for i in order[step * cfg.batch_size : (step + 1) * cfg.batch_size]]
            loss = batch_loss(batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trainable, cfg.max_grad_norm)
            optimizer.step()
            schedule.step()
            losses.append(float(loss.detach()))
            callbacks.on_step(epoch, step + 1, losses[-1])
        step_losses += losses
        result = None
        if evaluate is not None:
            module.eval()
            with torch.no_grad():
                result = evaluate()
        stats = EpochStats(epoch, sum(losses) / len(losses), time.perf_counter() - t0, result)
        # Ties in score (accuracy moves in steps of 1/n) go to the lower eval loss. No eval: the last epoch.
        score = (result.score, -result.loss) if result is not None else (epoch, 0.0)
        if score > best_score:
            best_score, best_epoch, stale, stats.best = score, epoch, 0, True
            best_state = copy.deepcopy(module.state_dict())
        else:
            stale += 1
        history.append(stats)
        callbacks.on_epoch(stats)
        if evaluate is not None and cfg.patience and stale >= cfg.patience:
            break
        if cfg.deadline is not None and time.perf_counter() >= cfg.deadline:
            break
    module.load_state_dict(best_state)
    module.eval()
    return FitResult(history, best_epoch, len(history) < cfg.epochs, time.perf_counter() - start, step_losses,
                     at_start)
