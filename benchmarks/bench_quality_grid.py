"""The dev-split grid behind ``ptserve train``'s defaults (issue 14): each setting is the defaults with a few
``TrainConfig`` fields changed, trained per task and seed on the task's train split less its stratified dev
split (``benchmarks.quality.data.dev_split``), and scored on that dev split. With ``--max-train N`` the train
examples past the first N are never trained on: each run is also scored on (at most ``--holdout`` of) them, a
held-out set several times the dev split's size, so that a one-point change is not one dev example. Test splits
are never read here: this is where defaults are chosen, ``bench_quality`` is where they are then scored.

    .venv/bin/python -m benchmarks.bench_quality_grid [--tasks ...] [--seeds 0 1] [--settings NAME ...]
        [--set NAME:field=value,field=value ...] [--threads 1] [--json runs.json]

The table: mean held-out accuracy (dev accuracy where there is no held-out set) per task and setting, its
change against ``defaults`` (points, same seeds), the mean change over tasks, and training seconds. A setting
earns a default only if it helps on every task.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import torch

from benchmarks.bench_quality import accuracy_prefix
from benchmarks.quality.data import TASKS, Task, dev_split, holdout_of, load_task
from ptserve.server.backbone import load_backbone
from ptserve.server.training.classify import TrainConfig, train_classifier
from ptserve.server.training.data import Example

# What the P-Tuning v2 paper and practitioners vary, one change at a time from the defaults.
SETTINGS: dict[str, dict] = {
    "defaults": {},
    "init-tokens": {"prefix_init": "tokens"},
    "probe-start": {"probe_start": True},
    "tokens+probe": {"prefix_init": "tokens", "probe_start": True},
    "lr-3e-3": {"lr": 3e-3},
    "lr-3e-2": {"lr": 3e-2},
    "P-8": {"virtual_tokens": 8},
    "P-32": {"virtual_tokens": 32},
    "wd-0.01": {"weight_decay": 0.01},
    "prefix-dropout-0.1": {"prefix_dropout": 0.1},
    "projection": {"prefix_projection": True},
    "epochs-15": {"epochs": 15, "patience": 4},
    "head-pooler": {"head": "pooler_linear"},
}


@dataclass
class Trial:
    task: str
    setting: str
    seed: int
    dev_accuracy: float
    dev_loss: float
    seconds: float
    epochs_run: int
    best_epoch: int
    holdout_accuracy: float | None = None  # on train examples past --max-train (never trained on, never test)

    @property
    def score(self) -> float:
        return self.dev_accuracy if self.holdout_accuracy is None else self.holdout_accuracy


def _value(text: str) -> bool | int | float | str:
    """``true``/``false``, else an int, else a float, else the text itself."""
    if text in ("true", "false"):
        return text == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def parse_setting(text: str) -> tuple[str, dict]:
    """``NAME:field=value,field=value`` -> (NAME, {field: value}) of TrainConfig fields."""
    name, _, body = text.partition(":")
    known = {f.name for f in fields(TrainConfig)}
    out = {}
    for pair in filter(None, body.split(",")):
        key, _, value = pair.partition("=")
        if key not in known:
            raise SystemExit(f"--set {text!r}: TrainConfig has no field {key!r}")
        out[key] = _value(value)
    return name, out


def run(bb, task: Task, seed: int, name: str, changes: dict, holdout: list[Example]) -> Trial:
    train, dev = dev_split(task, seed)
    cfg = replace(TrainConfig(seed=seed, max_length=task.max_length), **changes)
    t0 = time.perf_counter()
    result = train_classifier(bb, train, dev, cfg)
    seconds = time.perf_counter() - t0
    held = (accuracy_prefix(bb, result.model, holdout, result.labels, cfg.virtual_tokens, task.max_length)
            if holdout else None)
    return Trial(task.name, name, seed, result.eval.accuracy, result.eval.loss, seconds,
                 len(result.fit.history), result.fit.best_epoch, held)


def table(trials: list[Trial], tasks: list[str], settings: list[str]) -> str:
    def acc(task, setting):
        return {t.seed: t.score for t in trials if t.task == task and t.setting == setting}

    held = any(t.holdout_accuracy is not None for t in trials)
    head = " | ".join(f"{t} {'held-out' if held else 'dev'} acc (Δ)" for t in tasks)
    lines = [f"| setting | {head} | mean Δ (points) | tasks better / worse | train s (mean) |",
             "|---|" + "---:|" * (len(tasks) + 3)]
    for s in settings:
        cells, deltas = [], []
        for task in tasks:
            mine, base = acc(task, s), acc(task, "defaults")
            seeds = sorted(set(mine) & set(base))
            if not mine:
                cells.append("")
                continue
            d = 100 * statistics.mean(mine[k] - base[k] for k in seeds) if seeds and s != "defaults" else None
            if d is not None:
                deltas.append(d)
            cells.append(f"{statistics.mean(mine.values()):.3f}" + (f" ({d:+.1f})" if d is not None else ""))
        secs = [t.seconds for t in trials if t.setting == s]
        mean_d = f"{statistics.mean(deltas):+.1f}" if deltas else ""
        tally = f"{sum(d > 0 for d in deltas)} / {sum(d < 0 for d in deltas)}" if deltas else ""
        lines.append(f"| {s} | " + " | ".join(cells) + f" | {mean_d} | {tally} | "
                     f"{statistics.mean(secs):.0f} |" if secs else "")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    ap.add_argument("--settings", nargs="+", default=list(SETTINGS),
                    help=f"the settings to run, of: {', '.join(SETTINGS)} (the table compares them with defaults, "
                    "run here or read from --json)")
    ap.add_argument("--set", nargs="*", default=[], metavar="NAME:field=value,...", help="more settings")
    ap.add_argument("--max-train", type=int, default=0, help="at most this many train examples (0 = all)")
    ap.add_argument("--holdout", type=int, default=400, help="score on at most this many train examples past "
                    "--max-train (0 = none)")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None, help="runs so far; read back to resume")
    ap.add_argument("--report", action="store_true", help="print the table of the runs in --json, run nothing")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    settings = {n: SETTINGS[n] for n in args.settings} | dict(map(parse_setting, args.set))  # what runs
    shown = list({"defaults": {}} | settings)  # the table compares with the defaults (from --json if not run)
    trials = [Trial(**t) for t in json.loads(args.json.read_text())] if args.json and args.json.exists() else []
    if args.report:
        return print(table(trials, args.tasks, shown))
    done = {(t.task, t.setting, t.seed) for t in trials}
    bb = load_backbone("minilm", device="cpu", dtype="float32")
    tasks, holdouts = [], {}
    for name in args.tasks:
        t = load_task(name)  # test is never read: dropped here
        tasks.append(Task(t.name, t.train[: args.max_train or None], [], t.max_length, t.description))
        holdouts[name] = holdout_of(t, args.max_train, args.holdout)
    for seed in args.seeds:  # seed-major: a run cut short still has every task and setting on its first seeds
        for task in tasks:
            name = task.name
            for s, changes in settings.items():
                if (name, s, seed) in done:
                    continue
                trial = run(bb, task, seed, s, changes, holdouts[name])
                trials.append(trial)
                held = "" if trial.holdout_accuracy is None else f" held-out {trial.holdout_accuracy:.3f}"
                print(f"{name:15} {s:20} seed {seed}: dev {trial.dev_accuracy:.3f} loss {trial.dev_loss:.3f}{held} "
                      f"{trial.seconds:.0f}s epochs {trial.epochs_run} (best {trial.best_epoch})",
                      file=sys.stderr, flush=True)
                if args.json:
                    args.json.write_text(json.dumps([asdict(t) for t in trials], indent=1))
    print(table(trials, args.tasks, shown))


if __name__ == "__main__":
    main()
