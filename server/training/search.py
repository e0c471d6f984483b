"""``ptserve train --search``: a small, time-bounded search over the learning rate, the prefix length and the head
kind, each trial a short fit scored on the dev split, then a final fit with the best trial's settings.

Trials run in a fixed order (the defaults first, then one change at a time, then pairs), so a small budget still
tries the most likely improvements; a trial that would not finish inside the budget (estimated from the ones
before it) is not started, and a running trial stops at the budget's end after its current epoch. The test data
of a user never enters: only ``dev`` is scored.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field, replace

from ptserve.server.backbone import Backbone
from ptserve.server.training.classify import TrainConfig, TrainResult, default_head, train_classifier
from ptserve.server.training.data import Example
from ptserve.server.training.loop import Callbacks


@dataclass
class SearchConfig:
    budget_s: float = 300.0  # wall time of all trials together (the final fit comes on top)
    lrs: tuple[float, ...] = (1e-2, 3e-3, 3e-2)  # the first is the default
    virtual_tokens: tuple[int, ...] = (16, 8, 32)
    # None = the trainer's default head for the backbone, "family" = the family's (PEFT's) head; duplicates
    # after resolving (on MiniLM the default is mean_linear) are tried once.
    heads: tuple[str | None, ...] = (None, "family", "mean_linear")
    trial_epochs: int = 4  # epochs per trial (patience 2); the final fit uses the base config's epochs


@dataclass
class Trial:
    lr: float
    virtual_tokens: int
    head: str | None
    dev_accuracy: float
    dev_loss: float
    seconds: float
    epochs_run: int


@dataclass
class SearchResult:
    result: TrainResult  # the final fit
    trials: list[Trial]
    chosen: dict  # lr, virtual_tokens, head of the final fit
    search_seconds: float
    budget_s: float
    skipped: int = 0  # trials not started for lack of time
    record: dict = field(default_factory=dict)


def resolve_heads(bb: Backbone, heads: tuple[str | None, ...]) -> tuple[str, ...]:
    """The head kinds the search tries on ``bb``, named as trained and saved (first = the default), no repeats."""
    named = [default_head(bb) if h is None else bb.family.head_kind if h == "family" else h for h in heads]
    return tuple(dict.fromkeys(named))


def candidates(cfg: SearchConfig, heads: tuple[str, ...] | None = None) -> list[tuple[float, int, str | None]]:
    """Every (lr, P, head) of the grid: the defaults, then single changes, then the rest, in grid order."""
    grid = list(itertools.product(cfg.lrs, cfg.virtual_tokens, heads or cfg.heads))
    default = grid[0]
    return sorted(grid, key=lambda c: sum(a != b for a, b in zip(c, default)))


class SearchProgress:
    """What the search tells a user: one call per trial started and finished (the CLI prints them)."""

    def on_trial_start(self, n: int, total: int, lr: float, virtual_tokens: int, head: str) -> None: ...

    def on_trial(self, n: int, trial: Trial, best: bool) -> None: ...

    def on_final(self, chosen: dict) -> None: ...


def search_and_train(
    bb: Backbone,
    train: list[Example],
    dev: list[Example],
    base: TrainConfig,
    cfg: SearchConfig = SearchConfig(),
    progress: SearchProgress | None = None,
    final_callbacks: Callbacks | None = None,
) -> SearchResult:
    progress = progress or SearchProgress()
    start = time.perf_counter()
    deadline = start + cfg.budget_s
    grid = candidates(cfg, resolve_heads(bb, cfg.heads))
    trials: list[Trial] = []
    skipped = 0
    for n, (lr, p, head) in enumerate(grid, 1):
        now = time.perf_counter()
        typical = max((t.seconds for t in trials), default=0.0)
        if trials and now + typical > deadline:  # the first trial always runs: a search needs one result
            skipped = len(grid) - n + 1
            break
        trial_cfg = replace(base, lr=lr, virtual_tokens=p, head=head, epochs=cfg.trial_epochs, patience=2)
        progress.on_trial_start(n, len(grid), lr, p, head)
        t0 = time.perf_counter()
        r = train_classifier(bb, train, dev, trial_cfg, deadline=deadline)
        trial = Trial(lr, p, r.adapter.config.head, r.eval.accuracy, r.eval.loss, time.perf_counter() - t0,
                      len(r.fit.history))
        best = all((trial.dev_accuracy, -trial.dev_loss) > (t.dev_accuracy, -t.dev_loss) for t in trials)
        trials.append(trial)
        progress.on_trial(n, trial, best)
    search_seconds = time.perf_counter() - start
    top = max(trials, key=lambda t: (t.dev_accuracy, -t.dev_loss))
    chosen = {"lr": top.lr, "virtual_tokens": top.virtual_tokens, "head": top.head}
    progress.on_final(chosen)
    final = train_classifier(bb, train, dev, replace(base, **chosen), final_callbacks)
    record = {
        "budget_s": cfg.budget_s,
        "search_seconds": round(search_seconds, 3),
        "trial_epochs": cfg.trial_epochs,
        "chosen": chosen,
        "skipped_trials": skipped,
        "trials": [t.__dict__ for t in trials],
    }
    return SearchResult(final, trials, chosen, search_seconds, cfg.budget_s, skipped, record)
