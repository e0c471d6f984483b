"""Generation throughput and latency on CPU (issue 4): ptserve's continuous batching vs PEFT prefix tuning.

One process; a small random Llama built here from a config (GQA: 8 heads, 4 kv heads; a byte-level BPE
tokenizer trained here; nothing is downloaded); S adapters of 16 virtual tokens; greedy decoding with EOS
disabled, so every request generates exactly N tokens. Timed with a warm-up and interleaved repeats:
  (a)  ptserve: S streams over S adapters (one request per adapter), all submitted at once to one
       ``GenerationEngine``, stepped until done;
  (b)  ptserve: the same S streams, all on one adapter;
  (c)  PEFT ``generate``, one request at a time, adapters switched by ``set_peft_model_state_dict``. On
       transformers 5.24 PEFT 0.21.2's ``generate`` ignores the prefix (its tokens are not those of PEFT's own
       forward): timed as PEFT's cost path, not as a correct result;
  (c′) PEFT's forward in a greedy loop, one request at a time: correct on 5.24, but PEFT's forward replaces
       any ``past_key_values`` with the prefix, so every step recomputes the whole sequence (quadratic);
  (c″) PEFT's prefix (``get_prompt``) handed to HF ``generate`` as a pre-filled cache, one request at a time:
       what PEFT's ``generate`` does on transformers 4.57, where it works. The fair baseline.
Before anything is timed, (a)'s tokens are checked against each request generated alone (abort on a mismatch)
and against (c″). Then latency under the (a) load through ``GenerationRunner`` (engine thread + asyncio): a
burst of S requests at once, and Poisson arrivals at a rate near the measured capacity. Last, tenant fairness:
one tenant's backlog of 3× the slots, and a second tenant's requests arriving behind it, under ptserve's
tenant-fair admission and under FIFO admission (the policy before commit 9de53a4, patched in for the comparison).

    python benchmarks/bench_generate.py [--tokens 128] [--streams 16] [--threads 2] [--repeats 3] [--out DIR]
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import os
import random
import shlex
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run as a script from anywhere: `python benchmarks/bench_generate.py`
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import peft  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from peft import PrefixTuningConfig, TaskType, get_peft_model, set_peft_model_state_dict  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from benchmarks._report import machine_info, write_section  # noqa: E402
from ptserve.adapters_store.format import Adapter, AdapterConfig  # noqa: E402
from ptserve.server.backbone import Backbone, load_backbone  # noqa: E402
from ptserve.server.generation.engine import GenerationEngine, GenerationLimits  # noqa: E402
from ptserve.server.generation.runner import GenerationRunner  # noqa: E402
from ptserve.server.generation.scheduler import Scheduler  # noqa: E402
from ptserve.server.generation.sequence import SamplingParams, Sequence  # noqa: E402
from ptserve.server.resident import ResidentAdapter  # noqa: E402

VIRTUAL_TOKENS = 16
SECTION = "## Generation throughput (issue 4)"
LLAMA = dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8,
             num_key_value_heads=4, max_position_embeddings=2048)
VOCAB = 2048
# key: (table label, chart label); {s} = streams
SYSTEMS = {
    "mixed": ("(a) ptserve, {s} streams over {s} adapters", "(a) ptserve, {s} adapters"),
    "single": ("(b) ptserve, {s} streams on one adapter", "(b) ptserve, 1 adapter"),
    "peft_generate": ("(c) PEFT generate, one at a time (on 5.24 the prefix is ignored)",
                      "(c) PEFT generate (no prefix on 5.24)"),
    "peft_cache": ("(c″) PEFT's prefix as HF cache + HF generate, one at a time (= PEFT generate on 4.57)",
                   "(c″) PEFT prefix + HF cache"),
    "peft_loop": ("(c′) PEFT forward, greedy loop without cache, one at a time",
                  "(c′) PEFT forward, no cache"),
}


# --- the model, adapters and prompts ---------------------------------------------------------------------
def words(seed: int = 0, n: int = 3000) -> list[str]:
    rng = random.Random(seed)
    letters = "etaoinshrdlucmfwypvbgkjqxz"
    return ["".join(rng.choice(letters[: rng.randint(8, 26)]) for _ in range(rng.randint(1, 9)))
            for _ in range(n)]


def save_llama(out: Path, seed: int = 0) -> Path:
    """A random Llama (GQA) with a byte-level BPE tokenizer trained on a generated corpus, as an HF folder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    rng, vocab_words = random.Random(seed), words(seed)
    corpus = [" ".join(rng.choice(vocab_words) for _ in range(30)) for _ in range(2000)]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=VOCAB, special_tokens=["<|endoftext|>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                  pad_token="<|endoftext|>")
    eos = tok.eos_token_id
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tok), eos_token_id=eos, bos_token_id=eos, pad_token_id=eos, **LLAMA)
    LlamaForCausalLM(config).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def make_adapter(fp, seed: int) -> Adapter:
    """A random CAUSAL_LM prefix (values ~ N(0, 1)) in PEFT's flat layout."""
    g = torch.Generator().manual_seed(seed)
    tensors = {"prompt_embeddings": torch.randn(VIRTUAL_TOKENS, fp.prefix_width, generator=g)}
    return Adapter(AdapterConfig("generate", VIRTUAL_TOKENS, fp, (), head=None), tensors)


def make_prompts(tokenizer, n: int, seed: int = 1) -> list[list[int]]:
    """n prompts of 4-12 random words (about 5-35 tokens), as token ids."""
    rng, vocab_words = random.Random(seed), words()
    return [tokenizer(" ".join(rng.choice(vocab_words) for _ in range(rng.randint(4, 12))))["input_ids"]
            for _ in range(n)]


@dataclass(frozen=True)
class Job:
    prompt: list[int]
    adapter: int  # index into the adapters


@dataclass
class Setup:
    folder: Path
    bb: Backbone
    adapters: list[Adapter]
    prompts: list[list[int]]
    peft_model: torch.nn.Module


# --- ptserve ---------------------------------------------------------------------------------------------
def greedy(tokens: int) -> SamplingParams:
    return SamplingParams(max_new_tokens=tokens, temperature=0)


def new_engine(bb: Backbone, streams: int) -> GenerationEngine:
    engine = GenerationEngine(bb, GenerationLimits(max_running=max(32, streams)))
    engine.eos_ids = frozenset()  # greedy runs to max_new_tokens, so every system generates the same count
    return engine


def residents_of(engine: GenerationEngine, adapters: list[Adapter]) -> list[ResidentAdapter]:
    return [engine.make_resident(a, f"bench/a{i}", 1) for i, a in enumerate(adapters)]


def run_engine(engine: GenerationEngine, residents: list[ResidentAdapter], jobs: list[Job], tokens: int):
    """All jobs submitted at once, the engine stepped until they are done; the tokens of each job."""
    seqs = [engine.new_sequence(residents[j.adapter], j.prompt, greedy(tokens)) for j in jobs]
    for seq in seqs:
        engine.add(seq)
    with torch.inference_mode():
        while engine.has_work:
            engine.step()
    return [s.output_ids for s in seqs]


# --- PEFT ------------------------------------------------------------------------------------------------
def load_peft(path: str) -> torch.nn.Module:
    base = AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa", local_files_only=True)
    config = PrefixTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=VIRTUAL_TOKENS)
    return get_peft_model(base, config).eval()


def peft_generate(model, adapter: Adapter, prompt: list[int], tokens: int) -> list[int]:
    """(c) PEFT ``generate`` (on transformers 5.24 its output ignores the prefix)."""
    set_peft_model_state_dict(model, {"prompt_embeddings": adapter.prompt_embeddings})
    ids = torch.tensor([prompt])
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=tokens,
                         min_new_tokens=tokens, do_sample=False, pad_token_id=0)
    return out[0, ids.shape[1]:].tolist()


def peft_forward_loop(model, adapter: Adapter, prompt: list[int], tokens: int) -> list[int]:
    """(c′) PEFT's forward, greedy, no cache (PEFT's forward replaces any past_key_values with the prefix)."""
    set_peft_model_state_dict(model, {"prompt_embeddings": adapter.prompt_embeddings})
    ids, out = torch.tensor([prompt]), []
    for _ in range(tokens):
        nxt = int(model(input_ids=ids).logits[0, -1].argmax())
        out.append(nxt)
        ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
    return out


def peft_prefix_cache_generate(model, adapter: Adapter, prompt: list[int], tokens: int) -> list[int]:
    """(c″) PEFT's prefix as HF's pre-filled cache, then HF ``generate`` on the base model: PEFT's
    ``generate`` as it runs on transformers 4.57 (the prefix is injected once; the request's cache grows)."""
    set_peft_model_state_dict(model, {"prompt_embeddings": adapter.prompt_embeddings})
    ids = torch.tensor([prompt])
    cache = model.get_prompt(batch_size=1)  # a DynamicCache holding the virtual tokens of every layer
    mask = torch.ones(1, VIRTUAL_TOKENS + ids.shape[1], dtype=torch.long)
    out = model.get_base_model().generate(
        input_ids=ids, attention_mask=mask, cache=cache, max_new_tokens=tokens, min_new_tokens=tokens,
        do_sample=False, pad_token_id=0)
    return out[0, ids.shape[1]:].tolist()


def run_peft(fn, model, adapters: list[Adapter], jobs: list[Job], tokens: int) -> list[list[int]]:
    with torch.inference_mode():
        return [fn(model, adapters[j.adapter], j.prompt, tokens) for j in jobs]


# --- correctness -----------------------------------------------------------------------------------------
def first_divergence(a: list[int], b: list[int]) -> int | None:
    at = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
    return at if at is not None or len(a) == len(b) else min(len(a), len(b))


def check_correctness(s: Setup, engine, residents, streams: int, peft_jobs: list[Job], n: int) -> str:
    """(a) row by row = alone (abort otherwise); (a) vs PEFT's correct paths and PEFT generate: a summary."""
    jobs = [Job(p, i) for i, p in enumerate(s.prompts)]
    mixed = run_engine(engine, residents, jobs, n)
    alone = [run_engine(engine, residents, [job], n)[0] for job in jobs]
    bad = [i for i, (x, y) in enumerate(zip(mixed, alone)) if x != y]
    if bad or any(len(t) != n for t in mixed):
        sys.exit(f"ABORT: requests {bad} generate other tokens in the mixed batch than alone "
                 f"(first divergence {[first_divergence(mixed[i], alone[i]) for i in bad]})")
    ref = run_peft(peft_prefix_cache_generate, s.peft_model, s.adapters, peft_jobs, n)
    ref_div = [first_divergence(x, y) for x, y in zip(mixed, ref) if x != y]
    loop_ok = run_peft(peft_forward_loop, s.peft_model, s.adapters, peft_jobs[:1], n)[0] == mixed[0]
    broken = run_peft(peft_generate, s.peft_model, s.adapters, peft_jobs, n)
    broken_ok = sum(x == y for x, y in zip(mixed, broken))
    k = len(peft_jobs)
    return (f"(a) = each request alone: {streams}/{streams} (checked; the run aborts otherwise); "
            f"(a) = (c″) PEFT's correct path: {k - len(ref_div)}/{k}"
            + (f" (first divergence at token {ref_div})" if ref_div else "")
            + f"; (a) = (c′) PEFT forward loop: {'1/1' if loop_ok else '0/1'}; (c) PEFT generate on "
              f"transformers {transformers.__version__} = (a): {broken_ok}/{k} (it drops the prefix)")


# --- throughput ------------------------------------------------------------------------------------------
@dataclass
class Result:
    key: str
    name: str
    wall: list[float]
    cpu: list[float]  # process CPU seconds (all threads): a view of the work done that load disturbs less
    requests: int  # per round
    new_tokens: int  # per request

    @property
    def tokens(self) -> int:
        return self.requests * self.new_tokens

    @property
    def median(self) -> float:
        return statistics.median(self.wall)

    @property
    def tps(self) -> float:
        return self.tokens / self.median


def time_systems(systems: dict[str, Callable[[], object]], repeats: dict[str, int]) -> dict[str, tuple]:
    """One warm-up each, then rounds whose order rotates, so drifting load hits every system alike."""
    names = list(systems)
    for name in names:
        systems[name]()
    wall: dict[str, list[float]] = {n: [] for n in names}
    cpu: dict[str, list[float]] = {n: [] for n in names}
    for k in range(max(repeats.values())):
        for name in names[k % len(names):] + names[: k % len(names)]:
            if len(wall[name]) >= repeats[name]:
                continue
            t0, c0 = time.perf_counter(), time.process_time()
            systems[name]()
            wall[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
    return {n: (wall[n], cpu[n]) for n in names}


def measure_throughput(s: Setup, engine, residents, peft_jobs: list[Job], args) -> dict[str, Result]:
    n, m = args.tokens, s.peft_model
    mixed_jobs = [Job(p, i) for i, p in enumerate(s.prompts)]
    one_adapter_jobs = [Job(p, 0) for p in s.prompts]
    systems = {
        "mixed": lambda: run_engine(engine, residents, mixed_jobs, n),
        "single": lambda: run_engine(engine, residents, one_adapter_jobs, n),
        "peft_generate": lambda: run_peft(peft_generate, m, s.adapters, peft_jobs, n),
        "peft_cache": lambda: run_peft(peft_prefix_cache_generate, m, s.adapters, peft_jobs, n),
        "peft_loop": lambda: run_peft(peft_forward_loop, m, s.adapters, peft_jobs[:1], n),
    }
    repeats = {k: args.repeats for k in systems} | {"peft_loop": 1}  # quadratic, slow: one round says enough
    requests = {"mixed": args.streams, "single": args.streams, "peft_loop": 1}
    return {k: Result(k, SYSTEMS[k][0].format(s=args.streams), wall, cpu, requests.get(k, len(peft_jobs)), n)
            for k, (wall, cpu) in time_systems(systems, repeats).items()}


# --- latency through the runner --------------------------------------------------------------------------
@dataclass
class Trace:
    submitted: float
    events: list[float]  # when each token event reached the event loop

    @property
    def ttft(self) -> float:
        return self.events[0] - self.submitted

    @property
    def itl(self) -> list[float]:
        return [b - a for a, b in zip(self.events, self.events[1:])]


async def _stream(runner: GenerationRunner, seq: Sequence, delay: float, t0: float) -> Trace:
    await asyncio.sleep(max(0.0, t0 + delay - time.perf_counter()))
    trace = Trace(time.perf_counter(), [])
    async for event in runner.generate(seq):
        if event.token is not None:
            trace.events.append(time.perf_counter())
    return trace


def run_arrivals(engine, residents, jobs: list[Job], tokens: int | list[int], delays: list[float]):
    """Job i (``tokens`` new tokens, or ``tokens[i]``) submitted through a ``GenerationRunner`` ``delays[i]`` s
    after the start: (traces, wall time)."""
    runner = GenerationRunner(engine)
    runner.start()
    counts = tokens if isinstance(tokens, list) else [tokens] * len(jobs)

    async def main():
        t0 = time.perf_counter()
        seqs = [engine.new_sequence(residents[j.adapter], j.prompt, greedy(n)) for j, n in zip(jobs, counts)]
        traces = await asyncio.gather(*(_stream(runner, s, d, t0) for s, d in zip(seqs, delays)))
        return traces, time.perf_counter() - t0

    try:
        return asyncio.run(main())
    finally:
        runner.stop()


def poisson_delays(n: int, rate: float, seed: int = 2) -> list[float]:
    rng, t, out = random.Random(seed), 0.0, []
    for _ in range(n):
        out.append(t)
        t += rng.expovariate(rate)
    return out


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile, q in (0, 100]."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


@dataclass
class Latency:
    name: str
    traces: list[Trace]
    wall: float
    tokens: int

    def stats_ms(self) -> dict[str, float]:
        ttft = [t.ttft for t in self.traces]
        itl = [x for t in self.traces for x in t.itl]
        return {"TTFT p50": percentile(ttft, 50) * 1e3, "TTFT p99": percentile(ttft, 99) * 1e3,
                "ITL p50": percentile(itl, 50) * 1e3, "ITL p99": percentile(itl, 99) * 1e3}


def measure_latency(s: Setup, capacity_tps: float, args) -> list[Latency]:
    n = args.tokens
    engine = new_engine(s.bb, args.streams)
    residents = residents_of(engine, s.adapters)
    burst = [Job(p, i) for i, p in enumerate(s.prompts)]
    traces, wall = run_arrivals(engine, residents, burst, n, [0.0] * len(burst))
    rate = args.load * capacity_tps / n
    jobs = [Job(s.prompts[i % len(s.prompts)], i % args.streams) for i in range(args.arrivals)]
    p_traces, p_wall = run_arrivals(engine, residents, jobs, n, poisson_delays(args.arrivals, rate))
    return [
        Latency(f"burst: {len(burst)} at once", traces, wall, len(burst) * n),
        Latency(f"Poisson: {args.arrivals} at {rate:.2f} req/s ({args.load:.0%} of (a)'s capacity)",
                p_traces, p_wall, args.arrivals * n),
    ]


# --- tenant fairness -------------------------------------------------------------------------------------
FAIR_SLOTS, QUIET_REQUESTS, QUIET_GAP_S = 16, 4, 0.05


@dataclass
class Fairness:
    policy: str
    noisy: list[Trace]
    quiet: list[Trace]
    wall: float
    tokens: int


@contextlib.contextmanager
def fifo_admission():
    """Admission as it was before tenant fairness: always the oldest waiting request."""
    fair_next = Scheduler._next
    Scheduler._next = lambda self, per_tenant: self.waiting[0]
    try:
        yield
    finally:
        Scheduler._next = fair_next


def measure_fairness(s: Setup, args) -> list[Fairness]:
    """Tenant "noisy" submits 3 × FAIR_SLOTS requests at once (16..N new tokens each, so slots free at different
    steps); tenant "quiet" submits QUIET_REQUESTS of N/4 tokens, QUIET_GAP_S apart, from 50 ms on."""
    rng = random.Random(3)
    backlog = 3 * FAIR_SLOTS
    jobs = [Job(s.prompts[i % len(s.prompts)], 0) for i in range(backlog)]
    jobs += [Job(s.prompts[i % len(s.prompts)], 1) for i in range(QUIET_REQUESTS)]
    tokens = [rng.randint(16, args.tokens) for _ in range(backlog)] + [args.tokens // 4] * QUIET_REQUESTS
    delays = [0.0] * backlog + [QUIET_GAP_S * (k + 1) for k in range(QUIET_REQUESTS)]
    out = []
    for policy, admission in (("tenant-fair (ptserve)", contextlib.nullcontext), ("FIFO", fifo_admission)):
        engine = GenerationEngine(s.bb, GenerationLimits(max_running=FAIR_SLOTS))
        engine.eos_ids = frozenset()
        residents = [engine.make_resident(s.adapters[0], "noisy/a", 1),
                     engine.make_resident(s.adapters[1], "quiet/a", 1)]
        with admission():
            traces, wall = run_arrivals(engine, residents, jobs, tokens, delays)
        out.append(Fairness(policy, traces[:backlog], traces[backlog:], wall, sum(tokens)))
    return out


def fairness_md(rows: list[Fairness]) -> str:
    lines = [f"| admission ({FAIR_SLOTS} slots; noisy: {len(rows[0].noisy)} requests at t=0; quiet: "
             f"{len(rows[0].quiet)} requests from 50 ms) | quiet TTFT p50 (ms) | quiet TTFT max (ms) | "
             "noisy TTFT p50 (ms) | noisy TTFT max (ms) | tokens/s |", "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        quiet, noisy = [t.ttft * 1e3 for t in r.quiet], [t.ttft * 1e3 for t in r.noisy]
        lines.append(f"| {r.policy} | {percentile(quiet, 50):.0f} | {max(quiet):.0f} | "
                     f"{percentile(noisy, 50):.0f} | {max(noisy):.0f} | {r.tokens / r.wall:.0f} |")
    return "\n".join(lines)


# --- report ----------------------------------------------------------------------------------------------
def table(results: list[Result], mixed: Result) -> str:
    lines = ["| system | requests × tokens | tokens/s | time (s), median | time (s), best | CPU s, median | "
             "(a) tokens/s ÷ this |", "|---|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        lines.append(f"| {r.name} | {r.requests} × {r.new_tokens} | {r.tps:.0f} | {r.median:.2f} | "
                     f"{min(r.wall):.2f} | {statistics.median(r.cpu):.2f} | {mixed.tps / r.tps:.2f} |")
    return "\n".join(lines)


def ratios(x: Result, y: Result) -> list[float]:
    """x's tokens/s ÷ y's, by median wall time, best wall time and median CPU time."""
    return [(t(y) / y.tokens) / (t(x) / x.tokens)
            for t in (lambda r: r.median, lambda r: min(r.wall), lambda r: statistics.median(r.cpu))]


def targets(res: dict[str, Result]) -> list[tuple[str, float, list[float]]]:
    a = res["mixed"]
    return [
        ("(a) ÷ (b): many adapters vs one adapter", 0.9, ratios(a, res["single"])),
        ("(a) ÷ (c″): vs PEFT generate one at a time, correct path (the fair one)", 4.0,
         ratios(a, res["peft_cache"])),
        ("(a) ÷ (c): vs PEFT generate on transformers 5.24 (prefix ignored)", 4.0,
         ratios(a, res["peft_generate"])),
        ("(a) ÷ (c′): vs PEFT forward loop without cache", 4.0, ratios(a, res["peft_loop"])),
    ]


def targets_md(checks) -> str:
    rows = ["| target (tokens/s ratio) | goal | by median wall time | by best wall time | "
            "by median CPU time | verdict (median wall) |", "|---|---:|---:|---:|---:|---|"]
    for name, goal, r in checks:
        verdict = "PASS" if r[0] >= goal else "MISS"
        rows.append(f"| {name} | ≥ {goal:g} | {r[0]:.2f} | {r[1]:.2f} | {r[2]:.2f} | {verdict} |")
    return "\n".join(rows)


def latency_md(rows: list[Latency]) -> str:
    lines = ["| arrivals (through GenerationRunner) | requests | TTFT p50 (ms) | TTFT p99 (ms) | "
             "ITL p50 (ms) | ITL p99 (ms) | tokens/s |", "|---|---:|---:|---:|---:|---:|---:|"]
    for lat in rows:
        st = lat.stats_ms()
        lines.append(f"| {lat.name} | {len(lat.traces)} | {st['TTFT p50']:.0f} | {st['TTFT p99']:.0f} | "
                     f"{st['ITL p50']:.0f} | {st['ITL p99']:.0f} | {lat.tokens / lat.wall:.0f} |")
    return "\n".join(lines)


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
    command = "python benchmarks/bench_generate.py " + shlex.join(argv if argv is not None else sys.argv[1:])
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


# --- main ------------------------------------------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=128, help="new tokens per request (greedy, EOS disabled)")
    p.add_argument("--streams", type=int, default=16, help="concurrent requests = adapters")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    p.add_argument("--repeats", type=int, default=3, help="timed rounds per system after one warm-up")
    p.add_argument("--peft-requests", type=int, default=4,
                   help="requests the one-at-a-time PEFT systems generate per round (one at a time, their "
                        "tokens/s does not depend on how many; fewer keeps the run short)")
    p.add_argument("--arrivals", type=int, default=64, help="requests in the Poisson latency run")
    p.add_argument("--load", type=float, default=0.8, help="Poisson rate as a fraction of (a)'s capacity")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent,
                   help="where RESULTS.md and generate.png go")
    p.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md and the PNG alone")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    started, load_before = time.perf_counter(), os.getloadavg()
    folder = save_llama(Path(tempfile.mkdtemp(prefix="bench-generate-")))
    bb = load_backbone(str(folder), device="cpu", dtype="float32")
    adapters = [make_adapter(bb.fingerprint, seed=i) for i in range(args.streams)]
    s = Setup(folder, bb, adapters, make_prompts(bb.tokenizer, args.streams), load_peft(str(folder)))
    engine = new_engine(bb, args.streams)
    residents = residents_of(engine, adapters)
    peft_jobs = [Job(p, i) for i, p in enumerate(s.prompts)][: args.peft_requests]

    correctness = check_correctness(s, engine, residents, args.streams, peft_jobs, args.tokens)
    res = measure_throughput(s, engine, residents, peft_jobs, args)
    latencies = measure_latency(s, res["mixed"].tps, args)
    fairness = measure_fairness(s, args)

    load = (load_before[0], os.getloadavg()[0])
    results = [res[k] for k in SYSTEMS]
    report = (f"{summary(s, args, argv, correctness, load, time.perf_counter() - started)}\n\n"
              f"{table(results, res['mixed'])}\n\n{targets_md(targets(res))}\n\n{latency_md(latencies)}\n\n"
              f"{fairness_md(fairness)}\n")
    print(report)
    if not args.no_write:
        args.out.mkdir(parents=True, exist_ok=True)
        title = (f"random Llama 4L/256h GQA, {args.streams} streams × {args.tokens} tokens, "
                 f"P={VIRTUAL_TOKENS}, CPU {args.threads} threads")
        write_chart(results, latencies, args.out / "generate.png", title, args.streams)
        write_section(args.out / "RESULTS.md", "bench_generate", SECTION,
                      f"{report}\n![generation throughput](generate.png)\n")
        print(f"wrote {args.out / 'RESULTS.md'} and {args.out / 'generate.png'}")


if __name__ == "__main__":
    main()
