"""Checked before anything is timed: (a)'s tokens row by row against each request generated alone (the run
aborts on a mismatch), and against PEFT's correct paths (c″, c′) and PEFT ``generate`` (c): a summary line."""
from __future__ import annotations

import sys

import transformers

from benchmarks.generate.peft_runs import peft_forward_loop, peft_generate, peft_prefix_cache_generate, run_peft
from benchmarks.generate.ptserve_runs import run_engine
from benchmarks.generate.workload import Job, Setup


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
