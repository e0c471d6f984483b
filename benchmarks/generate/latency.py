"""Latency under the (a) load through ``GenerationRunner``: a burst of S requests at once, then Poisson arrivals
at a rate near the measured capacity; TTFT and inter-token latency percentiles."""
from __future__ import annotations

import math
import random
from dataclasses import dataclass

from benchmarks.generate.ptserve_runs import Trace, new_engine, residents_of, run_arrivals
from benchmarks.generate.workload import Job, Setup


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
    engine = new_engine(s.bb, max(32, args.streams))
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


def latency_md(rows: list[Latency]) -> str:
    lines = ["| arrivals (through GenerationRunner) | requests | TTFT p50 (ms) | TTFT p99 (ms) | "
             "ITL p50 (ms) | ITL p99 (ms) | tokens/s |", "|---|---:|---:|---:|---:|---:|---:|"]
    for lat in rows:
        st = lat.stats_ms()
        lines.append(f"| {lat.name} | {len(lat.traces)} | {st['TTFT p50']:.0f} | {st['TTFT p99']:.0f} | "
                     f"{st['ITL p50']:.0f} | {st['ITL p99']:.0f} | {lat.tokens / lat.wall:.0f} |")
    return "\n".join(lines)
