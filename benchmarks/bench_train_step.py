"""Training step time by precision (issue 14): the prefix trainer and full fine-tuning, float32 against bf16
autocast, and the prefix's attention in bf16 against float32 under autocast, side by side on one task's batches.

One step = forward, loss, backward and the AdamW step, on the same fixed batches of a ``benchmarks.quality`` task
(cut to its ``max_length``), after warm-up steps (oneDNN's first bf16 kernels per shape are slow); the median of the
timed steps. Rows:

  prefix  float32                          ``ptserve train --autocast off``
  prefix  bf16, bf16 attention             autocast as it is (attention on autocast's bf16 list)
  prefix  bf16, float32 attention          attention computed in float32 inside autocast (``PrefixContext``)
  full    float32 / bf16                   every weight + a linear head, HF's own forward (bench_quality's)

and the line "auto" says what ``ptserve train --autocast auto`` measures and picks here (``attention_dtype``).

    .venv/bin/python -m benchmarks.bench_train_step [--task spam_bodies] [--steps 6] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks._report import machine_info, write_section
from benchmarks.bench_training import FullModel
from benchmarks.quality.data import TASKS, load_task
from ptserve.server.backbone import load_backbone
from ptserve.server.training.attention_dtype import attention_dtype_for
from ptserve.server.training.classify import PrefixClassifier, TrainConfig, tokenize
from ptserve.server.training.data import label_set

ROOT = Path(__file__).resolve().parents[1]
SECTION = "## Training step time by precision (issue 14)"
# (trainer, bf16 autocast, attention dtype inside autocast; None = autocast's own)
CONFIGS = [("prefix", False, None), ("prefix", True, None), ("prefix", True, torch.float32),
           ("full", False, None), ("full", True, None)]


def _median_ms(step, batches: list, warmup: int) -> float:
    for batch in batches[:warmup]:
        step(batch)
    times = []
    for batch in batches[warmup:]:
        start = time.perf_counter()
        step(batch)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def prefix_step_ms(bb, texts, y, args, bf16: bool, attention: torch.dtype | None) -> float:
    cfg = TrainConfig(max_length=args.max_length)
    torch.manual_seed(0)
    model = PrefixClassifier(bb, args.labels, cfg).train()
    model.attention_dtype = attention
    opt = torch.optim.AdamW(list(model.prefix.parameters()) + list(model.head.parameters()), lr=1e-2)
    ids = tokenize(bb, texts, cfg.virtual_tokens, args.max_length)

    def step(i: int) -> None:
        rows = slice(i * args.batch, (i + 1) * args.batch)
        with torch.autocast(bb.device.type, dtype=torch.bfloat16, enabled=bf16):
            logits = model(ids[rows])
        F.cross_entropy(logits.float(), y[rows]).backward()
        opt.step()
        opt.zero_grad()

    return _median_ms(step, list(range(args.warmup + args.steps)), args.warmup)


def full_step_ms(bb, texts, y, args, bf16: bool) -> float:
    torch.manual_seed(0)
    model = FullModel(bb.path, args.labels).train()
    opt = torch.optim.AdamW(model.parameters(), lr=5e-5, weight_decay=0.01)

    def step(i: int) -> None:
        rows = slice(i * args.batch, (i + 1) * args.batch)
        enc = bb.tokenizer(texts[rows], padding=True, truncation=True, max_length=args.max_length,
                           return_tensors="pt")
        with torch.autocast(bb.device.type, dtype=torch.bfloat16, enabled=bf16):
            logits = model(enc)
        F.cross_entropy(logits.float(), y[rows]).backward()
        opt.step()
        opt.zero_grad()

    return _median_ms(step, list(range(args.warmup + args.steps)), args.warmup)


def table(ms: dict[tuple[str, bool, torch.dtype | None], float]) -> str:
    lines = ["| trainer | precision | ms / step | ÷ its float32 step (speed-up) | prefix ÷ full FT, same autocast |",
             "|---|---|---:|---:|---:|"]
    for trainer, bf16, attention in CONFIGS:
        own = ms[(trainer, bf16, attention)]
        name = "float32" if not bf16 else f"bf16 autocast, {'float32' if attention else 'bf16'} attention"
        if trainer == "full" and bf16:
            name = "bf16 autocast"
        speed = f"{ms[(trainer, False, None)] / own:.2f}×" if bf16 else ""
        vs_full = f"{own / ms[('full', bf16, None)]:.2f}" if trainer == "prefix" else ""
        lines.append(f"| {trainer} | {name} | {own:.0f} | {speed} | {vs_full} |")
    return "\n".join(lines)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", default="spam_bodies", choices=list(TASKS))
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=6, help="timed steps per row (the median is reported)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (0 = torch's default)")
    ap.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "RESULTS.md")
    ap.add_argument("--no-write", action="store_true", help="print the table only")
    return ap.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    bb = load_backbone("minilm", device="cpu", dtype="float32")
    task = load_task(args.task)
    n = args.batch * (args.warmup + args.steps)
    train = task.train[:n]
    labels = label_set(train)
    texts, y = [e.text for e in train], torch.tensor([labels.index(e.label) for e in train])
    args.labels, args.max_length = len(labels), task.max_length
    ms = {}
    for trainer, bf16, attention in CONFIGS:
        ms[(trainer, bf16, attention)] = (prefix_step_ms(bb, texts, y, args, bf16, attention) if trainer == "prefix"
                                          else full_step_ms(bb, texts, y, args, bf16))
        print(f"{trainer} bf16={bf16} attention={attention}: {ms[(trainer, bf16, attention)]:.0f} ms/step",
              file=sys.stderr, flush=True)
    longest = max(map(len, tokenize(bb, texts, TrainConfig().virtual_tokens, task.max_length)))
    auto = attention_dtype_for(bb.fingerprint, bb.device, True, args.batch, longest, TrainConfig().virtual_tokens)
    info = machine_info()
    text = (f"- {info['date']}; {info['cpu']}; {info['versions']}; torch threads {torch.get_num_threads()}\n"
            f"- `python -m benchmarks.bench_train_step {' '.join(argv if argv is not None else sys.argv[1:])}`: "
            f"{args.task}, batch {args.batch}, ≤ {task.max_length} tokens, median of {args.steps} steps after "
            f"{args.warmup} warm-up steps\n- auto (what `ptserve train` picks here): {auto.reason}\n\n{table(ms)}")
    print(text)
    if not args.no_write:
        write_section(args.results, "bench_train_step", SECTION, text)


if __name__ == "__main__":
    main()
