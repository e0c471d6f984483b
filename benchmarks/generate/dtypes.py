"""float32 vs bfloat16 (issue 13): (a) ptserve, S streams over S adapters, and (c″) PEFT's prefix as HF cache +
HF generate one request at a time, each in both dtypes on ``--device``. Before timing, each dtype's mixed tokens
are checked against each request generated alone in that dtype: in float32 they must be equal (the run aborts
otherwise); in bfloat16 batch independence is a rounding contract, not bit equality (docs/design.md, "Hardware"),
enforced with logit margins by tests/server/generation/test_bfloat16.py, so the run reports how many streams give
the same tokens mixed and alone, and how many give the float32 tokens (bf16 rounding may change a greedy choice
between near-equal logits; a random model has many)."""
from __future__ import annotations

import sys
from dataclasses import dataclass

from benchmarks.generate.peft_runs import load_peft, peft_prefix_cache_generate, run_peft
from benchmarks.generate.ptserve_runs import new_engine, residents_of, run_engine
from benchmarks.generate.throughput import Result, time_systems
from benchmarks.generate.workload import Job, Setup
from ptserve.server.backbone import load_backbone

TARGET_SPEEDUP = 1.5


@dataclass
class DtypeRun:
    dtype: str
    reason: str
    mixed: Result
    peft: Result
    tokens: list[list[int]]  # (a)'s tokens per stream
    same_alone: int  # streams whose mixed tokens equal the request's tokens alone


def measure_dtype(s: Setup, dtype: str, args) -> DtypeRun:
    bb = load_backbone(str(s.folder), device=args.device, dtype=dtype)
    engine = new_engine(bb, max(32, args.streams))
    residents = residents_of(engine, s.adapters)
    jobs = [Job(p, i) for i, p in enumerate(s.prompts)]
    mixed = run_engine(engine, residents, jobs, args.tokens)
    alone = [run_engine(engine, residents, [job], args.tokens)[0] for job in jobs]
    same_alone = sum(x == y for x, y in zip(mixed, alone))
    if mixed != alone and dtype == "float32":
        sys.exit(f"ABORT: in {dtype}, streams {[i for i, (x, y) in enumerate(zip(mixed, alone)) if x != y]} "
                 "generate other tokens in the mixed batch than alone")
    peft = load_peft(str(s.folder)).to(device=bb.device, dtype=bb.dtype)
    peft_jobs = jobs[: args.peft_requests]
    systems = {"mixed": lambda: run_engine(engine, residents, jobs, args.tokens),
               "peft_cache": lambda: run_peft(peft_prefix_cache_generate, peft, s.adapters, peft_jobs, args.tokens)}
    times = time_systems(systems, {k: args.repeats for k in systems})
    return DtypeRun(
        dtype, bb.dtype_reason,
        Result("mixed", f"(a) ptserve, {args.streams} streams over {args.streams} adapters", *times["mixed"],
               args.streams, args.tokens),
        Result("peft_cache", "(c″) PEFT prefix + HF cache + HF generate, one at a time", *times["peft_cache"],
               len(peft_jobs), args.tokens),
        mixed, same_alone,
    )


def measure_dtypes(s: Setup, args) -> dict[str, DtypeRun]:
    return {dt: measure_dtype(s, dt, args) for dt in args.dtypes}


def dtypes_md(runs: dict[str, DtypeRun]) -> str:
    lines = ["| dtype (why) | system | tokens/s (median) | (a) ÷ (c″), same dtype |", "|---|---|---:|---:|"]
    for run in runs.values():
        for r in (run.mixed, run.peft):
            lines.append(f"| {run.dtype} ({run.reason}) | {r.name} | {r.tps:.0f} | {run.mixed.tps / run.peft.tps:.2f} |")
    checks = []
    if "float32" in runs and "bfloat16" in runs:
        f32, b16 = runs["float32"], runs["bfloat16"]
        speedup = b16.mixed.tps / f32.mixed.tps
        checks.append((f"generation tokens/s, (a) bf16 ÷ fp32 ≥ {TARGET_SPEEDUP}", f"{speedup:.2f}×",
                       "PASS" if speedup >= TARGET_SPEEDUP else "MISS"))
        checks.append(("(c″) PEFT one at a time, bf16 ÷ fp32 (report)", f"{b16.peft.tps / f32.peft.tps:.2f}×", ""))
        checks.append(("bf16 streams with the same tokens mixed as alone (report; the contract is in the tests)",
                       f"{b16.same_alone}/{len(b16.tokens)}", ""))
        same = sum(x == y for x, y in zip(f32.tokens, b16.tokens))
        checks.append(("streams whose bf16 tokens equal the fp32 tokens (report)", f"{same}/{len(f32.tokens)}", ""))
    lines += ["", "| target | measured | |", "|---|---:|---|"]
    lines += [f"| {name} | {value} | {verdict} |" for name, value, verdict in checks]
    return "\n".join(lines)
