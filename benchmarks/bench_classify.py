"""Classification throughput on CPU (issue 2): PEFT prefix tuning vs ptserve's mixed-adapter batches.

One process, the same requests for every system (MiniLM, N texts of 8-40 words spread over A adapters of 16
virtual tokens), timed with a warm-up and the best of interleaved repeats:
  1. PEFT, one request at a time (switching adapters with ``set_adapter``);
  2. PEFT, one padded batch per adapter (PEFT cannot batch different prompt-learning adapters together);
  3. ptserve, mixed batches: all requests, all adapters, batches from ``plan_batches`` + ``Engine.classify``;
  4. ptserve, the same batches with every request on one adapter;
  5. the plain HF backbone (sdpa) on the same batches, no prefix.
ptserve's mixed logits are checked against PEFT's for every request before anything is timed. Prints a table and
the issue's targets, and writes its section of ``RESULTS.md`` and ``classify.png`` into ``--out``.

    python -m benchmarks.bench_classify [--repeats 5] [--threads 2] [--requests 64] [--adapters 32]
                                        [--dtypes float32 bfloat16] [--device cpu] [--only-dtypes]

Then the hardware section (issue 13, ``benchmarks/classify_dtypes.py``): the same workload per dtype, the
planner's start-up calibration beside a sweep of fixed ``overhead_tokens``, PEFT one at a time in each dtype, and
bf16-vs-fp32 label agreement on real texts; its own section of ``RESULTS.md`` per device.
"""
from __future__ import annotations

import argparse
import os
import random
import shlex
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import peft
import torch
import torch.nn.functional as F
import transformers
from peft import PrefixTuningConfig, TaskType, get_peft_model, set_peft_model_state_dict
from transformers import AutoModel

from benchmarks._report import machine_info, write_section
from ptserve.adapters_store.format import Adapter, AdapterConfig
from ptserve.adapters_store.heads import head_shapes
from ptserve.server.backbone import load_backbone
from ptserve.server.batch_plan import BatchPolicy, plan_batches
from ptserve.server.engine import BatchStats, Engine, Row

VIRTUAL_TOKENS = 16
LABELS = ("negative", "neutral", "positive")
MAX_ABS_DIFF = 1e-4  # abort above this (fp32 equivalence is ~1e-6)
SECTION = "## Classification throughput (issue 2)"
WORDS = """the a service order delivery was is very not quite really good bad slow fast late early price quality
support team staff product package arrived broken fine great terrible okay refund replace again never always
would could recommend return buy friend store online app update crashed works perfectly screen battery phone
laptop camera sound clear noisy room hotel clean dirty food cold warm tasty bland waiter rude kind helpful
answer question email call hours days weeks months waited finally thanks but and or because so although still
expected more less than price value money cheap expensive worth every cent disappointed happy satisfied love
hate feature missing manual instructions easy hard setup install size fits small large colour looks nice""".split()


# --- workload -------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Request:
    text: str
    adapter: int  # index into the adapters list


def make_requests(n: int, n_adapters: int, seed: int = 0) -> list[Request]:
    """n texts of 8-40 words, each adapter used round-robin, order shuffled (deterministic)."""
    rng = random.Random(seed)
    texts = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 40))) for _ in range(n)]
    owners = [i % n_adapters for i in range(n)]
    rng.shuffle(owners)
    return [Request(t, a) for t, a in zip(texts, owners)]


def make_adapter(fp, seed: int) -> Adapter:
    """A random pooler_linear classify adapter (the same recipe as tests.factories.make_adapter)."""
    g = torch.Generator().manual_seed(seed)
    tensors = {"prompt_embeddings": torch.randn(VIRTUAL_TOKENS, fp.prefix_width, generator=g)}
    for name, shape in head_shapes("pooler_linear", len(LABELS), fp.hidden_size).items():
        tensors[name] = torch.randn(*shape, generator=g) * 0.2
    cfg = AdapterConfig("classify", VIRTUAL_TOKENS, fp, LABELS, head="pooler_linear")
    return Adapter(cfg, tensors)


# --- the systems: each takes the requests and returns logits in request order ----------------------------------
def load_peft(path: str, adapters: list[Adapter]) -> torch.nn.Module:
    """PEFT's multi-adapter path: one named prompt encoder per adapter (add_adapter), switched by set_adapter."""
    def config():
        return PrefixTuningConfig(task_type=TaskType.FEATURE_EXTRACTION, num_virtual_tokens=VIRTUAL_TOKENS)

    base = AutoModel.from_pretrained(path, attn_implementation="sdpa", local_files_only=True)
    model = get_peft_model(base, config(), adapter_name="a0")
    for i, adapter in enumerate(adapters):
        if i:
            model.add_adapter(f"a{i}", config())
        set_peft_model_state_dict(model, {"prompt_embeddings": adapter.prompt_embeddings}, adapter_name=f"a{i}")
    return model.eval()


def peft_classify(model, tokenizer, adapter: Adapter, index: int, texts: list[str]) -> torch.Tensor:
    """[len(texts), labels] logits (float32, cpu): PEFT forward under adapter ``index`` (on the model's device, in
    its dtype), then its linear head on the pooler in float32."""
    model.set_adapter(f"a{index}", inference_mode=True)
    dev = next(model.parameters()).device
    enc = tokenizer(texts, padding=True, return_tensors="pt").to(dev)
    out = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
    weight, bias = (adapter.tensors[k].to(dev) for k in ("classifier.weight", "classifier.bias"))
    return F.linear(out.pooler_output.float(), weight, bias).cpu()


def run_peft_single(model, tokenizer, adapters, requests) -> list[torch.Tensor]:
    return [peft_classify(model, tokenizer, adapters[r.adapter], r.adapter, [r.text])[0] for r in requests]


def run_peft_grouped(model, tokenizer, adapters, requests) -> list[torch.Tensor]:
    out: list[torch.Tensor | None] = [None] * len(requests)
    for a in sorted({r.adapter for r in requests}):
        members = [i for i, r in enumerate(requests) if r.adapter == a]
        logits = peft_classify(model, tokenizer, adapters[a], a, [requests[i].text for i in members])
        for i, row in zip(members, logits):
            out[i] = row
    return out


@dataclass
class PtserveRun:
    logits: list[torch.Tensor]  # per request, [labels]
    batches: list[list[int]]  # request indices per forward pass
    stats: list[BatchStats] = field(default_factory=list)

    @property
    def padding_ratio(self) -> float:
        return sum(s.computed_tokens for s in self.stats) / sum(s.real_tokens for s in self.stats)


def run_ptserve(engine: Engine, residents, requests, policy: BatchPolicy) -> PtserveRun:
    """Tokenise, plan batches over all requests (any adapters), one Engine.classify per batch."""
    ids = engine.tokenize([r.text for r in requests], VIRTUAL_TOKENS)
    rows = [Row(residents[r.adapter], t) for r, t in zip(requests, ids)]
    run = PtserveRun([None] * len(rows), plan_batches([row.length for row in rows], policy))
    for batch in run.batches:
        logits, stats = engine.classify([rows[i] for i in batch])
        run.stats.append(stats)
        for i, row in zip(batch, logits):
            run.logits[i] = row
    return run


def run_backbone(model, tokenizer, requests, batches: list[list[int]]) -> None:
    """The plain HF model (sdpa), no prefix, on the given batches: the floor a prefix server can approach."""
    for batch in batches:
        enc = tokenizer([requests[i].text for i in batch], padding=True, return_tensors="pt")
        model(**enc)


# --- measurement ----------------------------------------------------------------------------------------------
def check_equivalence(ptserve_logits, peft_logits) -> float:
    diff = max((a - b).abs().max().item() for a, b in zip(ptserve_logits, peft_logits))
    if diff > MAX_ABS_DIFF:
        sys.exit(f"ABORT: ptserve mixed logits differ from PEFT's by {diff:.2e} (> {MAX_ABS_DIFF:g})")
    return diff


def time_systems(systems: dict[str, Callable[[], object]], repeats: int) -> dict[str, list[float]]:
    """One warm-up each, then ``repeats`` rounds; the order rotates per round so drifting load hits all alike."""
    names = list(systems)
    for name in names:
        systems[name]()
    times: dict[str, list[float]] = {n: [] for n in names}
    for k in range(repeats):
        for name in names[k % len(names):] + names[: k % len(names)]:
            t0 = time.perf_counter()
            systems[name]()
            times[name].append(time.perf_counter() - t0)
    return times


@dataclass
class Result:
    name: str
    times: list[float]
    requests: int

    @property
    def best(self) -> float:  # other load only ever adds time, so the best round is the least disturbed
        return min(self.times)

    @property
    def median(self) -> float:
        return statistics.median(self.times)

    @property
    def rps(self) -> float:
        return self.requests / self.best


# --- report ---------------------------------------------------------------------------------------------------
def table(results: list[Result], mixed: Result) -> str:
    lines = ["| system | requests/s | time (s), best | time (s), median | time ÷ mixed time |",
             "|---|---:|---:|---:|---:|"]
    for r in results:
        lines.append(f"| {r.name} | {r.rps:.1f} | {r.best:.3f} | {r.median:.3f} | {r.best / mixed.best:.2f} |")
    return "\n".join(lines)


def targets(res: dict[str, Result], padding: float) -> list[tuple[str, str, bool]]:
    mixed = res["mixed"]
    one, grouped, single = res["peft_one"], res["peft_grouped"], res["single"]
    return [
        ("mixed ≥ 3× PEFT one at a time", f"{mixed.rps / one.rps:.2f}×", mixed.rps >= 3 * one.rps),
        ("mixed ≥ 2.5× PEFT batched per adapter", f"{mixed.rps / grouped.rps:.2f}×", mixed.rps >= 2.5 * grouped.rps),
        ("mixed time ≤ 1.03× single-adapter time", f"{mixed.best / single.best:.3f}×",
         mixed.best <= 1.03 * single.best),
        ("padding ratio ≤ 1.15", f"{padding:.3f}", padding <= 1.15),
    ]


def targets_md(checks) -> str:
    rows = ["| target | measured | |", "|---|---:|---|"]
    rows += [f"| {name} | {value} | {'PASS' if ok else 'MISS'} |" for name, value, ok in checks]
    return "\n".join(rows)


def write_chart(results: list[Result], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 3.6))
    names = [r.name for r in results][::-1]
    values = [r.rps for r in results][::-1]
    colors = ["#1f77b4" if n.startswith("ptserve") else "#999999" for n in names]
    bars = ax.barh(names, values, color=colors)
    ax.bar_label(bars, labels=[f"{v:.0f}" for v in values], padding=3)
    ax.set_xlabel("requests / s (best of repeats; higher is better)")
    ax.set_title(title, fontsize=9)
    ax.set_xlim(0, max(values) * 1.15)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --- main -----------------------------------------------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=5, help="timed rounds per system after one warm-up")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    p.add_argument("--requests", type=int, default=64, help="number of texts")
    p.add_argument("--adapters", type=int, default=32, help="number of adapters the requests are spread over")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent, help="where RESULTS.md and the PNG go")
    p.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md and the PNG alone")
    # issue 13: dtypes, the calibrated planner vs a sweep of fixed overhead_tokens, PEFT one at a time per dtype
    p.add_argument("--dtypes", nargs="*", default=["float32", "bfloat16"],
                   help="dtypes of the hardware section (none: skip it)")
    p.add_argument("--device", default="cpu", help="device of the hardware section (cpu, cuda)")
    p.add_argument("--peft-requests", type=int, default=64, help="requests PEFT runs one at a time per round there")
    p.add_argument("--only-dtypes", action="store_true", help="run the hardware section only")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if not args.only_dtypes:
        classify_vs_peft(args, argv)
    if args.dtypes:
        hardware_section(args, argv)


def hardware_section(args, argv) -> None:
    from benchmarks.classify_dtypes import dtypes_md, label_agreement, measure_dtype

    load_before = os.getloadavg()
    requests = make_requests(args.requests, args.adapters)
    runs = {dt: measure_dtype(dt, args.device, requests, args.adapters, args.repeats, args.peft_requests)
            for dt in args.dtypes}
    agreement = label_agreement(args.device)
    info = machine_info(transformers=transformers.__version__, peft=peft.__version__)
    command = "python -m benchmarks.bench_classify " + shlex.join(argv if argv is not None else sys.argv[1:])
    device = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else info["cpu"]
    report = "\n".join([
        f"- date: {info['date']}; device: {device}; {info['versions']}; torch threads {args.threads}",
        f"- load average (1 min) before / after: {load_before[0]:.2f} / {os.getloadavg()[0]:.2f}",
        f"- command: `{command.strip()}`",
        f"- workload: as above ({args.requests} texts over {args.adapters} adapters of {VIRTUAL_TOKENS} virtual "
        f"tokens), per dtype: the start-up calibration, then ptserve mixed with the calibrated overhead and with "
        f"each fixed overhead, and PEFT one request at a time ({min(args.peft_requests, args.requests)} requests "
        f"per round) in the same dtype; one warm-up, {args.repeats} rotating rounds, best round",
        f"- labels: a prefix trained 2 epochs on examples/sentiment/train.jsonl, applied in float32 and bfloat16 to "
        f"the 360 example reviews and sentences of Python's own documentation (tests.factories.real_texts)",
        "", dtypes_md(runs, agreement),
    ]) + "\n"
    print(report)
    if not args.no_write:
        args.out.mkdir(parents=True, exist_ok=True)
        write_section(args.out / "RESULTS.md", f"bench_classify_dtypes_{args.device.split(':')[0]}",
                      f"## Classification in float32 and bfloat16, calibrated planner ({args.device}; issue 13)", report)


def classify_vs_peft(args, argv) -> None:
    load_before = os.getloadavg()
    backbone = load_backbone("minilm", device="cpu", dtype="float32")
    engine, tok = Engine(backbone), backbone.tokenizer
    adapters = [make_adapter(engine.fp, seed=i) for i in range(args.adapters)]
    residents = [engine.make_resident(a, f"bench/a{i}", 1) for i, a in enumerate(adapters)]
    requests = make_requests(args.requests, args.adapters)
    on_one = [Request(r.text, 0) for r in requests]
    peft_model = load_peft(backbone.path, adapters)
    plain = AutoModel.from_pretrained(backbone.path, attn_implementation="sdpa", local_files_only=True).eval()
    policy = BatchPolicy()

    with torch.inference_mode():
        mixed = run_ptserve(engine, residents, requests, policy)
        diff = check_equivalence(mixed.logits, run_peft_single(peft_model, tok, adapters, requests))
        diff_grouped = check_equivalence(mixed.logits, run_peft_grouped(peft_model, tok, adapters, requests))
        systems = {
            "peft_one": lambda: run_peft_single(peft_model, tok, adapters, requests),
            "peft_grouped": lambda: run_peft_grouped(peft_model, tok, adapters, requests),
            "mixed": lambda: run_ptserve(engine, residents, requests, policy),
            "single": lambda: run_ptserve(engine, residents, on_one, policy),
            "backbone": lambda: run_backbone(plain, tok, requests, mixed.batches),
        }
        times = time_systems(systems, args.repeats)
    load_after = os.getloadavg()

    labels = {
        "peft_one": "PEFT, one request at a time",
        "peft_grouped": "PEFT, batched per adapter",
        "mixed": f"ptserve, mixed batches ({args.adapters} adapters)",
        "single": "ptserve, all requests on one adapter",
        "backbone": "backbone, no prefix (HF sdpa)",
    }
    res = {k: Result(labels[k], v, args.requests) for k, v in times.items()}
    results = list(res.values())
    checks = targets(res, mixed.padding_ratio)
    info = machine_info(transformers=transformers.__version__, peft=peft.__version__)
    command = "python -m benchmarks.bench_classify " + shlex.join(argv if argv is not None else sys.argv[1:])
    sizes = [len(b) for b in mixed.batches]
    summary = "\n".join([
        f"- date: {info['date']}",
        f"- machine: {info['cpu']}; {info['versions']}; torch threads {args.threads}",
        f"- load average (1 min) before / after: {load_before[0]:.2f} / {load_after[0]:.2f}",
        f"- command: `{command.strip()}`",
        f"- workload: {args.requests} texts of 8–40 words over {args.adapters} adapters of {VIRTUAL_TOKENS} virtual "
        f"tokens, MiniLM (all-MiniLM-L6-v2) fp32; one warm-up, then {args.repeats} rounds over all systems in rotating "
        f"order; requests/s from each system's best round",
        f"- ptserve batches (default BatchPolicy): {len(sizes)} passes of {sizes} rows; padding ratio "
        f"(computed / real tokens, virtual tokens included) {mixed.padding_ratio:.3f}",
        f"- correctness: max |ptserve mixed − PEFT| over all logits = {diff:.1e} (one at a time), "
        f"{diff_grouped:.1e} (batched per adapter)",
    ])
    floor = res["backbone"]
    ceiling = (f"Ceiling for the first two targets: the backbone with no prefix, on the same batches, is "
               f"{floor.rps / res['peft_one'].rps:.2f}× PEFT one at a time and "
               f"{floor.rps / res['peft_grouped'].rps:.2f}× PEFT batched per adapter.")
    report = f"{summary}\n\n{table(results, res['mixed'])}\n\n{targets_md(checks)}\n\n{ceiling}\n"
    print(report)
    if not args.no_write:
        args.out.mkdir(parents=True, exist_ok=True)
        title = (f"MiniLM classify, {args.requests} requests over {args.adapters} adapters "
                 f"(P={VIRTUAL_TOKENS}), CPU {args.threads} threads")
        write_chart(results, args.out / "classify.png", title)
        write_section(args.out / "RESULTS.md", "bench_classify", SECTION,
                      f"{report}\n![classification throughput](classify.png)\n")
        print(f"wrote {args.out / 'RESULTS.md'} and {args.out / 'classify.png'}")


if __name__ == "__main__":
    main()
