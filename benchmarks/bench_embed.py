"""Embedding benchmark (issue 15): retrieval quality on held-out data of the bare backbone vs an embedding prefix
trained by ``ptserve train --task embed``, both measured on what the engine serves (``Engine.run`` with embedding
rows: mean pooling over real tokens, L2-normalised).

Two example data sets written for this project:
  - ``examples/helpdesk`` (query/positive/negative pairs): 160 training questions, 80 held out; each held-out
    question must find its article among the 16 help articles;
  - ``examples/sentiment`` (labelled texts, same label = positive): 270 training sentences, 90 held out; each
    held-out sentence must find one of its own label among the other 89.

The prefix trains for a fixed number of epochs with no early stopping (the held-out split picks nothing), so the
held-out numbers are not optimistic. recall@1: the first result is relevant; MRR: mean of 1 / rank of the first
relevant result.

    .venv/bin/python -m benchmarks.bench_embed [--epochs 3] [--seeds 0] [--threads 2] [--data helpdesk sentiment]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

from benchmarks._report import machine_info, write_section
from ptserve.server.backbone import load_backbone
from ptserve.server.engine import EMBEDDING, Engine, Row
from ptserve.server.training.data import load_examples, load_text_pairs
from ptserve.server.training.embed import EmbedConfig, train_embedder
from ptserve.server.training.retrieval import evaluate_retrieval, retrieval_set

ROOT = Path(__file__).resolve().parents[1]
SECTION = "## Embeddings: bare backbone vs a trained embedding prefix, held-out retrieval (issue 15)"
DATA = {
    "helpdesk": ("pairs", lambda split: load_text_pairs(ROOT / "examples" / "helpdesk" / f"{split}.jsonl")),
    "sentiment": ("labelled", lambda split: load_examples(ROOT / "examples" / "sentiment" / f"{split}.jsonl")),
}


def served_embeddings(engine: Engine, resident, texts: list[str], batch: int = 64) -> torch.Tensor:
    """[N, H] as the server answers them (bare backbone: ``engine.bare``)."""
    out = []
    for i in range(0, len(texts), batch):
        ids = engine.tokenize(texts[i:i + batch], resident.num_virtual_tokens)
        out += engine.run([Row(resident, t, EMBEDDING) for t in ids])[0]
    return torch.stack(out)


def run(engine: Engine, name: str, seed: int, cfg: EmbedConfig) -> list[dict]:
    kind, load = DATA[name]
    train, held_out = load("train"), load("eval")
    rs = retrieval_set(held_out)
    bare = evaluate_retrieval(lambda t: served_embeddings(engine, engine.bare, t), rs, cfg.temperature)
    start = time.perf_counter()
    result = train_embedder(engine.backbone, train, None, cfg)
    seconds = time.perf_counter() - start
    resident = engine.make_resident(result.adapter, f"bench/{name}", 1)
    trained = evaluate_retrieval(lambda t: served_embeddings(engine, resident, t), rs, cfg.temperature)
    common = {"data": name, "kind": kind, "train": len(train), "queries": trained.queries, "seed": seed}
    return [
        {**common, "model": "bare backbone", "ev": bare, "seconds": None, "loss": None},
        {**common, "model": f"prefix P={cfg.virtual_tokens}", "ev": trained, "seconds": seconds,
         "loss": (result.fit.history[0].train_loss, result.fit.history[-1].train_loss), "bare": bare},
    ]


def table(rows: list[dict]) -> str:
    lines = ["| data | model | held-out queries | recall@1 | MRR | recall@1 − bare | MRR ÷ bare | train loss "
             "(first → last epoch) | training s |",
             "|---|---|---:|---:|---:|---:|---:|---|---:|"]
    for r in rows:
        ev, bare = r["ev"], r.get("bare")
        gain = f"{ev.recall_at_1 - bare.recall_at_1:+.3f}" if bare else "–"
        ratio = f"{ev.mrr / bare.mrr:.2f}" if bare else "–"
        loss = f"{r['loss'][0]:.3f} → {r['loss'][1]:.3f}" if r["loss"] else "–"
        secs = f"{r['seconds']:.0f}" if r["seconds"] is not None else "–"
        lines.append(f"| {r['data']} ({r['kind']}, {r['train']} train, seed {r['seed']}) | {r['model']} | "
                     f"{r['queries']} | {ev.recall_at_1:.3f} | {ev.mrr:.3f} | {gain} | {ratio} | {loss} | {secs} |")
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", nargs="+", default=list(DATA), choices=list(DATA))
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--virtual-tokens", type=int, default=16)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks", help="where RESULTS.md goes")
    p.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    load_before, started = os.getloadavg(), time.perf_counter()
    engine = Engine(load_backbone("minilm", device="cpu", dtype="float32"))
    rows = []
    for seed in args.seeds:
        cfg = EmbedConfig(virtual_tokens=args.virtual_tokens, lr=args.lr, epochs=args.epochs,
                          batch_size=args.batch_size, seed=seed)
        for name in args.data:
            rows += run(engine, name, seed, cfg)
            print(f"{name} seed {seed}: bare MRR {rows[-2]['ev'].mrr:.3f}, trained {rows[-1]['ev'].mrr:.3f}",
                  flush=True)
    import transformers

    load_after, info = os.getloadavg(), machine_info(transformers=transformers.__version__)
    cfg = EmbedConfig(lr=args.lr)
    report = "\n".join([
        f"- date: {info['date']}",
        f"- machine: {info['cpu']}; {info['versions']}; torch threads {args.threads}",
        f"- load average (1 min) before / after: {load_before[0]:.2f} / {load_after[0]:.2f}; whole run "
        f"{time.perf_counter() - started:.0f} s",
        f"- command: `{' '.join(['python -m benchmarks.bench_embed', *(argv or sys.argv[1:])])}`",
        f"- training: {args.virtual_tokens} virtual tokens, lr {cfg.prefix_lr}, batch {args.batch_size}, "
        f"{args.epochs} epochs, no early stopping, in-batch negatives (+ the hard negatives given) at temperature "
        f"{cfg.temperature}; both rows embedded by the engine as served",
        "",
        table(rows),
    ])
    print(report)
    if not args.no_write:
        args.out.mkdir(parents=True, exist_ok=True)
        write_section(args.out / "RESULTS.md", "bench_embed", SECTION, report)
        print(f"wrote {args.out / 'RESULTS.md'}")


if __name__ == "__main__":
    main()
