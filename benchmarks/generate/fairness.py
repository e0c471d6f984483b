"""Tenant fairness: one tenant's backlog of 3× the slots and a second tenant's requests arriving behind it, under
each admission policy the engine can be given (``TenantFair``, ptserve's default, and ``Fifo``, the policy before
commit 9de53a4); the second tenant's time to first token is what fairness buys."""
from __future__ import annotations

import random
from dataclasses import dataclass

from benchmarks.generate.latency import percentile
from benchmarks.generate.ptserve_runs import Trace, new_engine, run_arrivals
from benchmarks.generate.workload import Job, Setup
from ptserve.server.generation.scheduler import Fifo, TenantFair

FAIR_SLOTS, QUIET_REQUESTS, QUIET_GAP_S = 16, 4, 0.05
POLICIES = {"tenant-fair (ptserve)": TenantFair, "FIFO": Fifo}


@dataclass
class Fairness:
    policy: str
    noisy: list[Trace]
    quiet: list[Trace]
    wall: float
    tokens: int


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
    for name, policy in POLICIES.items():
        engine = new_engine(s.bb, FAIR_SLOTS, admission=policy())
        residents = [engine.make_resident(s.adapters[0], "noisy/a", 1),
                     engine.make_resident(s.adapters[1], "quiet/a", 1)]
        traces, wall = run_arrivals(engine, residents, jobs, tokens, delays)
        out.append(Fairness(name, traces[:backlog], traces[backlog:], wall, sum(tokens)))
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
