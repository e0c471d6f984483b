"""Throughput: every system runs the same requests to the same token count; one warm-up each, then interleaved
rounds. The table of tokens/s and the target ratios ((a) over each other system)."""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable

from benchmarks.generate.peft_runs import peft_forward_loop, peft_generate, peft_prefix_cache_generate, run_peft
from benchmarks.generate.ptserve_runs import run_engine
from benchmarks.generate.workload import Job, Setup

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
