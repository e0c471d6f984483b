"""Training benchmark (issue 6): on examples/sentiment, accuracy and training time of
  (a)  the P-Tuning v2 prefix (+ linear head on the frozen pooler) that `ptserve train` trains, its defaults;
  (a′) the same with the MLP reparameterisation (`--prefix-projection`), materialised when saved;
  (b)  a linear probe on frozen features: the same pooler_linear head on the frozen backbone's pooler output;
  (b′) a linear probe on mean-pooled token states (how all-MiniLM-L6-v2 is meant to embed sentences);
  (c)  full fine-tuning of the same backbone (every weight + the linear head);
with trainable parameter counts, what each stores per task, and a loss-curve PNG.

All methods use the same split (270 train / 90 eval), batch size, AdamW with linear warm-up/decay, and early
stopping on the eval split (patience in epochs); the accuracy is that of the restored best epoch, so it is the
same (slightly optimistic) protocol for every method. Training time is wall time of the training loop
(per-epoch evaluation included; the probes' feature extraction included); CPU s is process CPU time.

    .venv/bin/python -m benchmarks.bench_training [--seeds 0 1 2] [--threads 2] [--methods prefix probe full]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks._report import machine_info, write_section
from ptserve.server.backbone import load_backbone
from ptserve.server.training.classify import TrainConfig, tokenize, train_classifier
from ptserve.server.training.data import label_set, load_examples
from ptserve.server.training.loop import Evaluation, FitConfig, fit

ROOT = Path(__file__).resolve().parents[1]
SECTION = "## Training: P-Tuning v2 prefix vs linear probe vs full fine-tuning (issue 6)"
DATA = ROOT / "examples" / "sentiment"


@dataclass
class Run:
    method: str
    seed: int
    accuracy: float
    best_epoch: int
    epochs_run: int
    seconds: float
    cpu_seconds: float
    trainable: int  # parameters with gradients while training
    stored: int  # parameters stored per task (what a tenant's adapter / model costs)
    step_losses: list[float] = field(default_factory=list)
    eval_accuracy: list[float] = field(default_factory=list)  # per epoch
    steps_per_epoch: int = 1


def _timed(fn):
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - wall, time.process_time() - cpu


# --- (a) prefix
# ---------------------------------------------------------------------------------------------------
def run_prefix(bb, train, held_out, seed: int, projection: bool, args) -> Run:
    cfg = TrainConfig(seed=seed, prefix_projection=projection, batch_size=args.batch_size)
    result, wall, cpu = _timed(lambda: train_classifier(bb, train, held_out, cfg))
    counts = result.trainable_parameters
    return Run(
        "(a′) prefix + MLP projection" if projection else "(a) P-Tuning v2 prefix",
        seed,
        result.eval.accuracy,
        result.fit.best_epoch,
        len(result.fit.history),
        wall,
        cpu,
        counts["total"],
        counts["served_prefix"] + counts["head"],
        result.fit.step_losses,
        [s.eval.metrics["eval_accuracy"] for s in result.fit.history],
        -(-len(train) // cfg.batch_size),
    )


# --- (b) linear probes
# ----------------------------------------------------------------------------------------
@torch.no_grad()
def frozen_features(bb, texts: list[str], pooling: str, batch_size: int = 64) -> torch.Tensor:
    """[N, H] frozen features without a prefix: the pooler output, or the mean of real token states."""
    out = []
    for i in range(0, len(texts), batch_size):
        enc = bb.tokenizer(texts[i : i + batch_size], padding=True, truncation=True, return_tensors="pt")
        o = bb.model(**enc)
        if pooling == "pooler":
            out.append(o.pooler_output)
        else:
            m = enc["attention_mask"].unsqueeze(-1).float()
            out.append((o.last_hidden_state * m).sum(1) / m.sum(1))
    return torch.cat(out).float()


def run_probe(bb, train, held_out, seed: int, pooling: str, args) -> Run:
    labels = label_set(train, held_out)
    y_train = torch.tensor([labels.index(e.label) for e in train])
    y_eval = torch.tensor([labels.index(e.label) for e in held_out])
    torch.manual_seed(seed)
    head = nn.Linear(bb.fingerprint.hidden_size, len(labels))
    nn.init.normal_(head.weight, std=0.02)
    nn.init.zeros_(head.bias)
    dropout = nn.Dropout(0.1)
    curve: list[float] = []

    def train_it():
        x_train = frozen_features(bb, [e.text for e in train], pooling)
        x_eval = frozen_features(bb, [e.text for e in held_out], pooling)

        def batch_loss(batch):
            idx = torch.tensor(batch)
            return F.cross_entropy(head(dropout(x_train[idx])), y_train[idx])

        def evaluate():
            logits = head(x_eval)
            acc = float((logits.argmax(-1) == y_eval).float().mean())
            curve.append(acc)
            return Evaluation(float(F.cross_entropy(logits, y_eval)), acc)

        return fit(
            head,
            [{"params": list(head.parameters()), "lr": args.probe_lr}],
            list(range(len(train))),
            batch_loss,
            evaluate,
            FitConfig(args.probe_epochs, args.batch_size, seed, args.probe_patience, 0.1),
        )

    result, wall, cpu = _timed(train_it)
    with torch.no_grad():
        x_eval = frozen_features(bb, [e.text for e in held_out], pooling)
        acc = float((head(x_eval).argmax(-1) == y_eval).float().mean())
    n = sum(p.numel() for p in head.parameters())
    name = (
        "(b) linear probe, frozen pooler output"
        if pooling == "pooler"
        else "(b′) linear probe, mean-pooled states"
    )
    return Run(
        name,
        seed,
        acc,
        result.best_epoch,
        len(result.history),
        wall,
        cpu,
        n,
        n,
        result.step_losses,
        curve,
        -(-len(train) // args.batch_size),
    )


# --- (c) full fine-tuning
# -------------------------------------------------------------------------------------
class FullModel(nn.Module):
    """The backbone (every weight trainable, HF's own attention) + dropout + the linear head on its pooler."""

    def __init__(self, path: str, num_labels: int):
        super().__init__()
        from transformers import AutoModel

        self.bert = AutoModel.from_pretrained(path, local_files_only=True)
        self.dropout = nn.Dropout(0.1)
        self.classifier = nn.Linear(self.bert.config.hidden_size, num_labels)
        nn.init.normal_(self.classifier.weight, std=0.02)
        nn.init.zeros_(self.classifier.bias)

    def forward(self, enc) -> torch.Tensor:
        return self.classifier(self.dropout(self.bert(**enc).pooler_output))


def run_full(bb, train, held_out, seed: int, args) -> Run:
    labels = label_set(train, held_out)
    torch.manual_seed(seed)
    model = FullModel(bb.path, len(labels))
    texts, y = [e.text for e in train], [labels.index(e.label) for e in train]
    eval_texts, y_eval = [e.text for e in held_out], torch.tensor([labels.index(e.label) for e in held_out])
    curve: list[float] = []

    def enc(batch_texts):
        return bb.tokenizer(batch_texts, padding=True, truncation=True, return_tensors="pt")

    def batch_loss(batch):
        return F.cross_entropy(model(enc([texts[i] for i in batch])), torch.tensor([y[i] for i in batch]))

    def evaluate():
        logits = torch.cat([model(enc(eval_texts[i : i + 64])) for i in range(0, len(eval_texts), 64)])
        acc = float((logits.argmax(-1) == y_eval).float().mean())
        curve.append(acc)
        return Evaluation(float(F.cross_entropy(logits, y_eval)), acc)

    result, wall, cpu = _timed(
        lambda: fit(
            model,
            [{"params": list(model.parameters()), "lr": args.full_lr}],
            list(range(len(train))),
            batch_loss,
            evaluate,
            FitConfig(args.full_epochs, args.batch_size, seed, args.full_patience, 0.1),
        )
    )
    with torch.no_grad():
        acc = float(
            (
                torch.cat([model(enc(eval_texts[i : i + 64])) for i in range(0, len(eval_texts), 64)]).argmax(
                    -1
                )
                == y_eval
            )
            .float()
            .mean()
        )
    n = sum(p.numel() for p in model.parameters())
    return Run(
        "(c) full fine-tuning",
        seed,
        acc,
        result.best_epoch,
        len(result.history),
        wall,
        cpu,
        n,
        n,
        result.step_losses,
        curve,
        -(-len(train) // args.batch_size),
    )


# --- report
# -----------------------------------------------------------------------------------------------------
def _fmt_params(n: int) -> str:
    return f"{n:,}"


def _fmt_bytes(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


def table(runs: list[Run]) -> str:
    lines = [
        "| method | trainable params | stored per task (fp32) | eval accuracy | best epoch / run | "
        "train time (s) | s per epoch | CPU s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for method in dict.fromkeys(r.method for r in runs):
        rs = [r for r in runs if r.method == method]
        accs = [r.accuracy for r in rs]
        acc = f"{statistics.mean(accs):.3f}" + (f" ± {statistics.stdev(accs):.3f}" if len(accs) > 1 else "")
        epochs = ", ".join(f"{r.best_epoch}/{r.epochs_run}" for r in rs)
        secs = statistics.median(r.seconds for r in rs)
        per_epoch = statistics.median(r.seconds / r.epochs_run for r in rs)
        cpu = statistics.median(r.cpu_seconds for r in rs)
        stored = rs[0].stored
        lines.append(
            f"| {method} | {_fmt_params(rs[0].trainable)} | {_fmt_params(stored)} "
            f"({_fmt_bytes(stored * 4)}) | {acc} | {epochs} | {secs:.1f} | {per_epoch:.1f} | {cpu:.1f} |"
        )
    return "\n".join(lines)


def plot(runs: list[Run], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(12, 4.5))
    colours = {}
    for r in runs:
        if r.seed != runs[0].seed:
            continue
        colour = colours.setdefault(r.method, f"C{len(colours)}")
        x = [(i + 1) / r.steps_per_epoch for i in range(len(r.step_losses))]
        ax_loss.plot(x, r.step_losses, color=colour, alpha=0.25, linewidth=0.8)
        k = max(1, r.steps_per_epoch // 2)  # running mean over half an epoch
        smooth = [
            statistics.mean(r.step_losses[max(0, i - k + 1) : i + 1]) for i in range(len(r.step_losses))
        ]
        ax_loss.plot(x, smooth, color=colour, label=r.method, linewidth=1.6)
        ax_acc.plot(
            range(1, len(r.eval_accuracy) + 1), r.eval_accuracy, marker="o", color=colour, label=r.method
        )
    ax_loss.set(
        xlabel="epoch", ylabel="training loss (cross-entropy)", title="training loss per step", yscale="log"
    )
    ax_acc.set(
        xlabel="epoch", ylabel="eval accuracy", title="eval accuracy per epoch (90 sentences)", ylim=(0, 1.02)
    )
    ax_acc.axhline(1 / 3, color="grey", linestyle=":", label="chance (3 classes)")
    ax_loss.legend(fontsize=8)
    ax_acc.legend(fontsize=8, loc="lower right")
    fig.suptitle(f"examples/sentiment, MiniLM-L6 on CPU, seed {runs[0].seed}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--methods",
        nargs="+",
        default=["prefix", "projection", "probe", "probe-mean", "full"],
        choices=["prefix", "projection", "probe", "probe-mean", "full"],
    )
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--probe-lr", type=float, default=1e-2)
    p.add_argument("--probe-epochs", type=int, default=60)
    p.add_argument("--probe-patience", type=int, default=10)
    p.add_argument("--full-lr", type=float, default=5e-5)
    p.add_argument("--full-epochs", type=int, default=10)
    p.add_argument("--full-patience", type=int, default=3)
    p.add_argument(
        "--out", type=Path, default=ROOT / "benchmarks", help="where RESULTS.md and training_loss.png go"
    )
    p.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md and the PNG alone")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    load_before, started = os.getloadavg(), time.perf_counter()
    bb = load_backbone("minilm", device="cpu", dtype="float32")
    train, held_out = load_examples(DATA / "train.jsonl"), load_examples(DATA / "eval.jsonl")
    runners = {
        "prefix": lambda s: run_prefix(bb, train, held_out, s, False, args),
        "projection": lambda s: run_prefix(bb, train, held_out, s, True, args),
        "probe": lambda s: run_probe(bb, train, held_out, s, "pooler", args),
        "probe-mean": lambda s: run_probe(bb, train, held_out, s, "mean", args),
        "full": lambda s: run_full(bb, train, held_out, s, args),
    }
    runs = []
    for seed in args.seeds:
        for method in args.methods:
            run = runners[method](seed)
            print(
                f"seed {seed} {run.method}: accuracy {run.accuracy:.3f}, best epoch {run.best_epoch}/"
                f"{run.epochs_run}, {run.seconds:.1f}s",
                flush=True,
            )
            runs.append(run)
    import transformers  # lazily, as the training code does

    load_after, info = os.getloadavg(), machine_info(transformers=transformers.__version__)
    tokens = tokenize(bb, [e.text for e in train], 0, None)
    report = "\n".join(
        [
            f"- date: {info['date']}",
            f"- machine: {info['cpu']}; {info['versions']}; torch threads {args.threads}",
            f"- load average (1 min) before / after: {load_before[0]:.2f} / {load_after[0]:.2f}; whole run "
            f"{time.perf_counter() - started:.0f} s",
            f"- command: `{' '.join(['python', '-m', 'benchmarks.bench_training', *(argv or sys.argv[1:])])}`",
            f"- data: examples/sentiment, {len(train)} train / {len(held_out)} eval sentences, 3 balanced "
            f"labels, {statistics.mean(len(t) for t in tokens):.1f} tokens per sentence on average; "
            f"seeds {args.seeds}",
            "- (a) `ptserve train` defaults: 16 virtual tokens, lr 1e-2 (prefix and head), ≤ 15 epochs, "
            "patience 4; (a′) the same with `--prefix-projection` (MLP 384→512→4608, lr 1e-3), materialised "
            "to plain K/V when saved; "
            f"(b)/(b′) lr {args.probe_lr}, ≤ {args.probe_epochs} epochs, patience {args.probe_patience}; "
            f"(c) lr {args.full_lr}, ≤ {args.full_epochs} epochs, patience {args.full_patience}; "
            f"batch {args.batch_size}",
            "",
            table(runs),
        ]
    )
    print(report)
    if not args.no_write:
        args.out.mkdir(parents=True, exist_ok=True)
        plot(runs, args.out / "training_loss.png")
        write_section(
            args.out / "RESULTS.md",
            "bench_training",
            SECTION,
            f"{report}\n\n![training loss and eval accuracy](training_loss.png)\n",
        )
        print(f"wrote {args.out / 'RESULTS.md'} and {args.out / 'training_loss.png'}")


if __name__ == "__main__":
    main()
