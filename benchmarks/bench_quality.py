"""Quality benchmark (issue 14): P-Tuning v2 prefixes against full fine-tuning on real labelled text.

Per task of ``benchmarks.quality.data`` (real data shipped in registry packages) and per seed, every method trains
on the task's train split less a stratified 15 % dev split (seeded), chooses everything it chooses (best epoch,
--search's settings) on that dev split, and is scored once on the untouched test split:

  prefix         ``ptserve train`` defaults (``TrainConfig()``: on MiniLM the mean-pooled head)
  prefix-pooler  the same with the pooler head PEFT uses (the previous default), for the head's effect
  prefix-search  ``ptserve train --search`` (a time-bounded search on dev, then a final fit)
  full           full fine-tuning of the same backbone (every weight + a linear head; lr 5e-5, <= 5 epochs)
  probe          a linear probe on the frozen backbone's mean-pooled states
  peft           PEFT P-Tuning v2 (``PrefixTuningConfig(num_virtual_tokens=20)``, its defaults otherwise) trained
                 with transformers' recipe in the PEFT reference interpreter (``PTSERVE_REF_PYTHON``)

With ``--max-train N --holdout M``, ``prefix`` and ``full`` are also scored on up to M of the train examples past the
first N (never trained on, never used for a choice, disjoint from test): a second sample of their gap, of the
test split's size.

Training seconds are wall time of the training loop (per-epoch dev evaluation included; for prefix-search the
search and the final fit, and its seconds per epoch are the final fit's). Texts are cut to the
task's ``max_length`` tokens for every method (a CPU budget: see the task list).

    .venv/bin/python -m benchmarks.bench_quality [--tasks ...] [--seeds 0 1 2] [--methods ...] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks._report import machine_info, write_section
from benchmarks.bench_training import FullModel  # the backbone + dropout + a linear head on its pooler
from benchmarks.quality.data import TASKS, Task, dev_split, holdout_of, load_task
from ptserve.server.backbone import load_backbone
from ptserve.server.training.classify import TrainConfig, autocast_bf16, evaluate, tokenize, train_classifier
from ptserve.server.training.data import Example, label_set
from ptserve.server.training.loop import Evaluation, FitConfig, fit
from ptserve.server.training.search import SearchConfig, search_and_train

ROOT = Path(__file__).resolve().parents[1]
SECTION = "## Quality on real data: prefix vs full fine-tuning vs probe vs PEFT (issue 14)"
METHODS = ("prefix", "full", "probe", "prefix-pooler", "peft", "prefix-search")


@dataclass
class Run:
    task: str
    method: str
    seed: int
    accuracy: float  # on test
    dev_accuracy: float
    seconds: float  # training wall time
    epochs_run: int
    seconds_per_epoch: float
    note: str = ""
    holdout_accuracy: float | None = None  # on train examples past --max-train (--holdout), prefix and full only
    bf16: bool | None = None  # trained under bf16 autocast (None: not recorded, runs saved before it was)

    @property
    def label(self) -> str:
        """The method as the table names it: a bf16 run apart from a float32 one of the same method."""
        return f"{self.method} (bf16)" if self.bf16 else self.method


def accuracy_prefix(bb, adapter_model, examples: list[Example], labels, p: int, max_length: int) -> float:
    ids = tokenize(bb, [e.text for e in examples], p, max_length)
    return evaluate(adapter_model, ids, [labels.index(e.label) for e in examples], labels, 64).accuracy


def _test_accuracy_prefix(bb, adapter_model, task: Task, labels, p: int, max_length: int) -> float:
    return accuracy_prefix(bb, adapter_model, task.test, labels, p, max_length)


def run_prefix(bb, task: Task, seed: int, args) -> Run:
    train, dev = dev_split(task, seed)
    cfg = TrainConfig(seed=seed, max_length=task.max_length, autocast=args.autocast)
    t0 = time.perf_counter()
    result = train_classifier(bb, train, dev, cfg)
    wall = time.perf_counter() - t0
    acc = _test_accuracy_prefix(bb, result.model, task, result.labels, cfg.virtual_tokens, task.max_length)
    held = args.holdouts.get(task.name)
    held_acc = (accuracy_prefix(bb, result.model, held, result.labels, cfg.virtual_tokens, task.max_length)
                if held else None)
    n = len(result.fit.history)
    return Run(task.name, "prefix", seed, acc, result.eval.accuracy, wall, n, wall / n, holdout_accuracy=held_acc,
               bf16=result.bf16)


def run_prefix_pooler(bb, task: Task, seed: int, args) -> Run:
    train, dev = dev_split(task, seed)
    cfg = TrainConfig(seed=seed, max_length=task.max_length, head="pooler_linear", autocast=args.autocast)
    t0 = time.perf_counter()
    result = train_classifier(bb, train, dev, cfg)
    wall = time.perf_counter() - t0
    acc = _test_accuracy_prefix(bb, result.model, task, result.labels, cfg.virtual_tokens, task.max_length)
    n = len(result.fit.history)
    return Run(task.name, "prefix-pooler", seed, acc, result.eval.accuracy, wall, n, wall / n, bf16=result.bf16)


def run_prefix_search(bb, task: Task, seed: int, args) -> Run:
    train, dev = dev_split(task, seed)
    base = TrainConfig(seed=seed, max_length=task.max_length, autocast=args.autocast)
    t0 = time.perf_counter()
    found = search_and_train(bb, train, dev, base, SearchConfig(budget_s=args.search_budget_s,
                                                                trial_epochs=args.search_trial_epochs))
    wall = time.perf_counter() - t0
    result = found.result
    acc = _test_accuracy_prefix(bb, result.model, task, result.labels, result.config.virtual_tokens, task.max_length)
    n = len(result.fit.history)
    chosen = found.chosen
    note = f"lr {chosen['lr']:g}, P {chosen['virtual_tokens']}, {chosen['head']}; {len(found.trials)} trials"
    return Run(task.name, "prefix-search", seed, acc, result.eval.accuracy, wall, n, result.fit.seconds / n, note,
               bf16=result.bf16)


# --- full fine-tuning and the probe (the backbone's own HF forward) ------------------------------------------------

def _encoder(bb, max_length: int):
    return lambda texts: bb.tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")


def run_full(bb, task: Task, seed: int, args) -> Run:
    train, dev = dev_split(task, seed)
    labels = label_set(train, dev)
    torch.manual_seed(seed)
    model = FullModel(bb.path, len(labels))
    enc = _encoder(bb, task.max_length)
    texts, y = [e.text for e in train], [labels.index(e.label) for e in train]
    bf16 = autocast_bf16(args.full_autocast, bb.device)  # the prefix trainer's rule, so like runs with like

    def forward(batch_texts: list[str]) -> torch.Tensor:
        with torch.autocast(bb.device.type, dtype=torch.bfloat16, enabled=bf16):
            return model(enc(batch_texts)).float()

    def logits_of(examples: list[Example]) -> torch.Tensor:
        t = [e.text for e in examples]
        return torch.cat([forward(t[i : i + 64]) for i in range(0, len(t), 64)])

    def batch_loss(batch):
        return F.cross_entropy(forward([texts[i] for i in batch]), torch.tensor([y[i] for i in batch]))

    y_dev = torch.tensor([labels.index(e.label) for e in dev])

    def evaluate_dev():
        logits = logits_of(dev)
        return Evaluation(float(F.cross_entropy(logits, y_dev)), float((logits.argmax(-1) == y_dev).float().mean()))

    t0 = time.perf_counter()
    result = fit(model, [{"params": list(model.parameters()), "lr": args.full_lr}], list(range(len(train))),
                 batch_loss, evaluate_dev, FitConfig(args.full_epochs, 16, seed, 2, 0.1, weight_decay=0.01))
    wall = time.perf_counter() - t0

    def accuracy(examples: list[Example]) -> float:
        with torch.no_grad():
            pred = logits_of(examples).argmax(-1)
        return float((pred == torch.tensor([labels.index(e.label) for e in examples])).float().mean())

    held = args.holdouts.get(task.name)
    dev_acc = result.history[result.best_epoch - 1].eval.score
    n = len(result.history)
    return Run(task.name, "full", seed, accuracy(task.test), dev_acc, wall, n, wall / n,
               holdout_accuracy=accuracy(held) if held else None, bf16=bf16)


@torch.no_grad()
def mean_features(bb, texts: list[str], max_length: int) -> torch.Tensor:
    """[N, H] mean of the frozen backbone's real-token states (no prefix)."""
    enc, out = _encoder(bb, max_length), []
    for i in range(0, len(texts), 64):
        e = enc(texts[i : i + 64])
        h = bb.model(**e).last_hidden_state
        m = e["attention_mask"].unsqueeze(-1).float()
        out.append((h * m).sum(1) / m.sum(1))
    return torch.cat(out).float()


def run_probe(bb, task: Task, seed: int, args) -> Run:
    train, dev = dev_split(task, seed)
    labels = label_set(train, dev)
    torch.manual_seed(seed)
    head = nn.Linear(bb.fingerprint.hidden_size, len(labels))
    t0 = time.perf_counter()
    x, x_dev = mean_features(bb, [e.text for e in train], task.max_length), mean_features(
        bb, [e.text for e in dev], task.max_length)
    y = torch.tensor([labels.index(e.label) for e in train])
    y_dev = torch.tensor([labels.index(e.label) for e in dev])

    def batch_loss(batch):
        idx = torch.tensor(batch)
        return F.cross_entropy(head(x[idx]), y[idx])

    def evaluate_dev():
        logits = head(x_dev)
        return Evaluation(float(F.cross_entropy(logits, y_dev)), float((logits.argmax(-1) == y_dev).float().mean()))

    result = fit(head, [{"params": list(head.parameters()), "lr": 1e-2}], list(range(len(train))), batch_loss,
                 evaluate_dev, FitConfig(100, 16, seed, 10, 0.1))
    wall = time.perf_counter() - t0
    with torch.no_grad():
        pred = head(mean_features(bb, [e.text for e in task.test], task.max_length)).argmax(-1)
    acc = float((pred == torch.tensor([labels.index(e.label) for e in task.test])).float().mean())
    n = len(result.history)
    return Run(task.name, "probe", seed, acc, result.history[result.best_epoch - 1].eval.score, wall, n, wall / n,
               bf16=False)


def run_peft(bb, task: Task, seed: int, args) -> Run:
    """PEFT's P-Tuning v2 in the reference interpreter (scripts/peft_train.py); its defaults, lr 1e-2."""
    ref = os.environ.get("PTSERVE_REF_PYTHON")
    if not ref:
        return Run(task.name, "peft", seed, float("nan"), float("nan"), float("nan"), 0, float("nan"),
                   "PTSERVE_REF_PYTHON not set")
    train, dev = dev_split(task, seed)
    labels = label_set(train, dev)
    with tempfile.TemporaryDirectory() as tmp:
        spec = {"model": str(bb.path), "labels": labels, "seed": seed, "max_length": task.max_length,
                "virtual_tokens": 20, "lr": 1e-2, "epochs": args.peft_epochs, "batch_size": 16,
                "train": [[e.text, labels.index(e.label)] for e in train],
                "dev": [[e.text, labels.index(e.label)] for e in dev],
                "test": [[e.text, labels.index(e.label)] for e in task.test]}
        (Path(tmp) / "spec.json").write_text(json.dumps(spec))
        env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
        done = subprocess.run([ref, str(ROOT / "scripts" / "peft_train.py"), str(Path(tmp) / "spec.json"),
                               str(Path(tmp) / "out.json")], capture_output=True, text=True, env=env)
        if done.returncode != 0:
            raise RuntimeError(f"peft_train.py failed: {done.stderr[-2000:]}")
        out = json.loads((Path(tmp) / "out.json").read_text())
    n = out["epochs_run"]
    return Run(task.name, "peft", seed, out["test_accuracy"], out["dev_accuracy"], out["seconds"], n,
               out["seconds"] / n, "best epoch on dev", bf16=False)


RUNNERS = {"prefix": run_prefix, "prefix-pooler": run_prefix_pooler, "prefix-search": run_prefix_search, "full": run_full, "probe": run_probe,
           "peft": run_peft}


def _ms(values: list[float]) -> str:
    values = [v for v in values if v == v]
    if not values:
        return "n/a"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values) if len(values) > 1 else 0.0:.3f}"


def _held_out_cell(rs: list[Run], full: list[Run], method: str) -> str:
    """Held-out accuracy mean ± std, and its Δ against full FT on the seeds both have."""
    mine = {r.seed: r.holdout_accuracy for r in rs if r.holdout_accuracy is not None}
    if not mine:
        return ""
    base = {r.seed: r.holdout_accuracy for r in full if r.holdout_accuracy is not None}
    seeds = sorted(set(mine) & set(base))
    delta = (f" ({100 * statistics.mean(mine[k] - base[k] for k in seeds):+.1f})"
             if seeds and method != "full" else "")
    return f" {_ms(list(mine.values()))}{delta} |"


def _labels(runs: list[Run]) -> list[str]:
    """The table's method rows in METHODS order, each method's float32 row before its bf16 one."""
    present = {r.label for r in runs}
    return [label for m in METHODS for label in (m, f"{m} (bf16)") if label in present]


def table(runs: list[Run], tasks: list[Task]) -> str:
    """One row per task and method (a bf16 run of a method is a row of its own). Δ vs full is against full
    fine-tuning in float32 where the runs have it (the baseline), else against whatever full runs there are."""
    held = any(r.holdout_accuracy is not None for r in runs)
    lines = ["| task (train / test, classes, max tokens) | method | test accuracy (mean ± std) | dev accuracy | "
             "train s | s / epoch | epochs | Δ vs full (points) |" + (" held-out accuracy (Δ vs full) |" if held else ""),
             "|---|---|---:|---:|---:|---:|---:|---:|" + ("---:|" if held else "")]
    for task in tasks:
        all_full = [r for r in runs if r.task == task.name and r.method == "full"]
        full_runs = [r for r in all_full if not r.bf16] or all_full
        full = [r.accuracy for r in full_runs]
        for method in _labels([r for r in runs if r.task == task.name]):
            rs = [r for r in runs if r.task == task.name and r.label == method]
            if not rs:
                continue
            acc = [r.accuracy for r in rs]
            delta = (f"{100 * (statistics.mean(acc) - statistics.mean(full)):+.1f}" if full and method != "full"
                     else "")
            lines.append(
                f"| {task.name} ({len(task.train)} / {len(task.test)}, {len(task.labels)}, {task.max_length}) | "
                f"{method} | {_ms(acc)} | {_ms([r.dev_accuracy for r in rs])} | "
                f"{statistics.mean(r.seconds for r in rs):.0f} | {statistics.mean(r.seconds_per_epoch for r in rs):.1f}"
                f" | {statistics.mean(r.epochs_run for r in rs):.1f} | {delta} |"
                + ((_held_out_cell(rs, full_runs, method) or " |") if held else ""))
    notes = sorted({f"{r.task} {r.method} seed {r.seed}: {r.note}" for r in runs if r.note})
    return "\n".join(lines) + ("\n\n" + "\n".join(f"- {n}" for n in notes) if notes else "")


def sampled(task: Task, args) -> Task:
    """The task as this run uses it: the first --max-train train and --max-test test examples (the loaders
    shuffle, so a head of a split is a sample of it; test keeps only labels the train sample has, which alone can
    be scored), texts cut to --max-length tokens instead of the task's own cap when given."""
    train = task.train[: args.max_train or None]
    known = {e.label for e in train}
    test = [e for e in task.test if e.label in known][: args.max_test or None]
    return Task(task.name, train, test, args.max_length or task.max_length, task.description)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS, help="for the first seed")
    ap.add_argument("--later-methods", nargs="*", default=["prefix", "full", "probe"], choices=METHODS,
                    help="for the seeds after the first (the target's methods; a CPU budget)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    ap.add_argument("--autocast", default="auto", choices=("auto", "on", "off"),
                    help="bf16 autocast of the prefix methods (TrainConfig.autocast; auto = where bf16 is fast)")
    ap.add_argument("--full-autocast", default="off", choices=("auto", "on", "off"),
                    help="bf16 autocast of full fine-tuning (off = float32, the baseline of the runs in RESULTS.md)")
    ap.add_argument("--full-lr", type=float, default=5e-5)
    ap.add_argument("--full-epochs", type=int, default=5)
    ap.add_argument("--peft-epochs", type=int, default=10)
    ap.add_argument("--search-budget-s", type=float, default=90.0)
    ap.add_argument("--search-trial-epochs", type=int, default=2)
    ap.add_argument("--max-train", type=int, default=0,
                    help="use at most this many train examples per task (0 = all; a CPU budget)")
    ap.add_argument("--holdout", type=int, default=0,
                    help="score prefix and full on at most this many train examples past --max-train (0 = none)")
    ap.add_argument("--max-test", type=int, default=0, help="score at most this many test examples per task (0 = all)")
    ap.add_argument("--max-length", type=int, default=0,
                    help="tokens per text for every method, instead of each task's own max_length (0 = the task's)")
    ap.add_argument("--from-json", type=Path, nargs="+", default=None,
                    help="print (and write) the table of the runs saved by --json (one or more files, merged)")
    ap.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "RESULTS.md")
    ap.add_argument("--no-write", action="store_true", help="print the table only")
    ap.add_argument("--json", type=Path, default=None, help="also write every run as JSON here")
    return ap.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    bb = load_backbone("minilm", device="cpu", dtype="float32")
    whole = [load_task(name) for name in args.tasks]
    args.holdouts = {t.name: holdout_of(t, args.max_train, args.holdout) for t in whole}  # scored, never trained on
    tasks = [sampled(t, args) for t in whole]
    runs: list[Run] = [Run(**r) for f in args.from_json or [] for r in json.loads(f.read_text())]
    todo = [] if args.from_json else [(s, t, m) for i, s in enumerate(args.seeds) for t in tasks
                                      for m in (args.methods if i == 0 else args.later_methods)]
    for seed, task, method in todo:  # seed by seed: a run cut short still has every task and method once
        run = RUNNERS[method](bb, task, seed, args)
        runs.append(run)
        print(f"{task.name:14} {method:14} seed {seed}: test {run.accuracy:.3f} dev {run.dev_accuracy:.3f} "
              f"{run.seconds:.0f}s {run.note}", file=sys.stderr, flush=True)
        if args.json:
            args.json.write_text(json.dumps([r.__dict__ for r in runs], indent=1))
    text = table(runs, tasks)
    print(text)
    if not args.no_write:
        info = machine_info()
        load = os.getloadavg()
        body = (f"{info['date']}; {info['cpu']}; {info['versions']}; load average at the end "
                f"{load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} (1 / 5 / 15 min)\n\n"
                f"`python -m benchmarks.bench_quality {' '.join(argv if argv is not None else sys.argv[1:])}`\n\n{text}")
        write_section(args.results, "bench_quality", SECTION, body)


if __name__ == "__main__":
    main()
