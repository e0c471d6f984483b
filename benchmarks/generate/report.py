"""What a run of bench_generate writes: the run's summary lines (machine, load, command, model, timing,
correctness) and the chart (throughput bars, latency bars)."""
from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path

import peft
import transformers

from benchmarks._report import machine_info
from benchmarks.generate.latency import Latency
from benchmarks.generate.throughput import SYSTEMS, Result
from benchmarks.generate.workload import LLAMA, VIRTUAL_TOKENS, Setup

COMMAND = "python -m benchmarks.bench_generate"


def write_chart(results: list[Result], latencies: list[Latency], path: Path, title: str, streams: int):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 3.8), gridspec_kw={"width_ratios": [3, 2]})
    names = [SYSTEMS[r.key][1].format(s=streams) for r in results][::-1]
    values = [r.tps for r in results][::-1]
    bars = ax.barh(names, values, color=["#1f77b4" if "ptserve" in n else "#999999" for n in names])
    ax.bar_label(bars, labels=[f"{v:.0f}" for v in values], padding=3)
    ax.set_xscale("log")
    ax.set_xlim(min(values) / 2, max(values) * 4)
    ax.set_xlabel("generated tokens / s (median; log scale; higher is better)")
    ax.tick_params(axis="y", labelsize=8)
    ax.set_title(title, fontsize=8)
    width, stats = 0.2, [lat.stats_ms() for lat in latencies]
    for i, key in enumerate(stats[0]):
        vals = [st[key] for st in stats]
        b2 = ax2.bar([x + (i - 1.5) * width for x in range(len(stats))], vals, width, label=key)
        ax2.bar_label(b2, labels=[f"{v:.0f}" for v in vals], fontsize=6, padding=1)
    ax2.set_xticks(range(len(stats)), [lat.name.split(":")[0] for lat in latencies], fontsize=8)
    ax2.set_ylabel("ms (lower is better)")
    ax2.set_title("latency under the (a) load, through GenerationRunner", fontsize=8)
    ax2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def summary(s: Setup, args, argv, correctness: str, load: tuple[float, float], elapsed: float) -> str:
    info = machine_info(transformers=transformers.__version__, peft=peft.__version__)
    command = f"{COMMAND} " + shlex.join(argv if argv is not None else sys.argv[1:])
    omp = os.environ.get("OMP_WAIT_POLICY")
    lengths = [len(p) for p in s.prompts]
    return "\n".join([
        f"- date: {info['date']}",
        f"- machine: {info['cpu']}; {info['versions']}; torch threads {args.threads}",
        f"- load average (1 min) before / after: {load[0]:.2f} / {load[1]:.2f}; whole run {elapsed:.0f} s",
        f"- command: `{f'OMP_WAIT_POLICY={omp} ' if omp else ''}{command.strip()}`",
        f"- model: random Llama from a config (hidden {LLAMA['hidden_size']}, "
        f"{LLAMA['num_hidden_layers']} layers, {LLAMA['num_attention_heads']} heads, "
        f"{LLAMA['num_key_value_heads']} kv heads, vocab {len(s.bb.tokenizer)} byte-level BPE trained in the "
        f"script), fp32; {args.streams} adapters of "
        f"{VIRTUAL_TOKENS} virtual tokens; prompts of {min(lengths)}–{max(lengths)} tokens; greedy, "
        f"EOS disabled, {args.tokens} new tokens per request",
        f"- timing: one warm-up, then {args.repeats} interleaved rounds (median shown); the one-at-a-time "
        f"PEFT systems generate {min(args.peft_requests, args.streams)} requests per round ((c′): 1 request, "
        f"1 round); CPU s = process CPU time of all threads",
        f"- correctness: {correctness}",
    ])
