"""bench_classify's hardware section (issue 13): the same mixed workload in float32 and bfloat16, the planner's
calibrated pass cost beside a sweep of fixed ``overhead_tokens``, PEFT one request at a time in both dtypes, and
bf16-vs-fp32 label agreement on real texts under a prefix trained on the example reviews.

Per dtype: a backbone in that dtype on ``--device``, the start-up calibration the server runs
(``measure_pass_cost``), then one warm-up and interleaved rounds over: ptserve mixed with the calibrated overhead,
ptserve mixed with each fixed overhead of the sweep, PEFT one at a time. Policies that make the same passes are
timed once (their difference could only be noise). Requests/s from each system's best round.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from benchmarks.bench_classify import (
    VIRTUAL_TOKENS, Result, load_peft, make_adapter, run_peft_single, run_ptserve, time_systems,
)
from ptserve.server.backbone import load_backbone
from ptserve.server.batch_plan import BatchPolicy, plan_batches
from ptserve.server.calibrate import measure_pass_cost
from ptserve.server.cost_model import PassCost
from ptserve.server.engine import Engine, Row

OVERHEADS = (0, 16, 32, 64, 128, 256, 512, 1024)
TARGET_SPEEDUP, TARGET_PLANNER, TARGET_AGREEMENT = 2.4, 0.95, 0.995


@dataclass
class DtypeRun:
    dtype: str
    reason: str
    cost: PassCost
    calibrated: Result
    sweep: dict[int, Result]  # fixed overhead_tokens -> result
    peft_one: Result
    plans: dict[str, str]  # policy name -> the plan it shares with another policy ("" if its own)

    @property
    def best_fixed(self) -> tuple[int, Result]:
        return max(self.sweep.items(), key=lambda kv: kv[1].rps)


def pass_plan(engine: Engine, requests, policy: BatchPolicy) -> tuple[tuple[int, ...], ...]:
    """The passes ``run_ptserve`` makes under ``policy`` (request indices per pass): two policies with the same plan
    run the same computation, so they are timed once and their difference is never noise."""
    lengths = [len(t) + VIRTUAL_TOKENS for t in engine.tokenize([r.text for r in requests], VIRTUAL_TOKENS)]
    return tuple(tuple(b) for b in plan_batches(lengths, policy))


def measure_dtype(dtype: str, device: str, requests, n_adapters: int, repeats: int, peft_requests: int) -> DtypeRun:
    bb = load_backbone("minilm", device=device, dtype=dtype)
    engine, tok = Engine(bb), bb.tokenizer
    adapters = [make_adapter(engine.fp, seed=i) for i in range(n_adapters)]
    residents = [engine.make_resident(a, f"bench/a{i}", 1) for i, a in enumerate(adapters)]
    peft_model = load_peft(bb.path, adapters).to(device=bb.device, dtype=bb.dtype)
    one_at_a_time = requests[:peft_requests]
    with torch.inference_mode():
        cost = measure_pass_cost(engine, 64, 16384)
        policies = {"calibrated": BatchPolicy(overhead_tokens=cost.overhead_tokens)}
        policies |= {f"fixed {o}": BatchPolicy(overhead_tokens=o) for o in OVERHEADS}
        first_with: dict[tuple, str] = {}  # plan -> the first policy that makes it (the one timed)
        for name, policy in policies.items():
            first_with.setdefault(pass_plan(engine, requests, policy), name)
        timed_as = {name: first_with[pass_plan(engine, requests, p)] for name, p in policies.items()}
        systems = {name: (lambda p=policies[name]: run_ptserve(engine, residents, requests, p))
                   for name in first_with.values()}
        systems["peft_one"] = lambda: run_peft_single(peft_model, tok, adapters, one_at_a_time)
        times = time_systems(systems, repeats)
    n = len(requests)
    return DtypeRun(
        dtype, bb.dtype_reason, cost,
        Result(f"ptserve mixed, calibrated ({cost.overhead_tokens})", times[timed_as["calibrated"]], n),
        {o: Result(f"ptserve mixed, overhead {o}", times[timed_as[f"fixed {o}"]], n) for o in OVERHEADS},
        Result("PEFT one at a time", times["peft_one"], len(one_at_a_time)),
        {name: (timed_as[name] if timed_as[name] != name else "") for name in policies},
    )


def label_agreement(device: str) -> tuple[int, int, float]:
    """(agreeing, texts, max |Δ logit|): a prefix trained 2 epochs on the example reviews, applied to
    ``tests.factories.real_texts()`` by a float32 and a bfloat16 engine."""
    from ptserve.server.training.classify import TrainConfig, train_classifier
    from ptserve.server.training.data import load_examples
    from tests.factories import EXAMPLES, real_texts

    fp32 = Engine(load_backbone("minilm", device=device, dtype="float32"))
    cfg = TrainConfig(virtual_tokens=8, epochs=2, lr=2e-2, batch_size=16, seed=0)
    adapter = train_classifier(fp32.backbone, load_examples(EXAMPLES / "sentiment" / "train.jsonl"), None, cfg).adapter
    bf16 = Engine(load_backbone("minilm", device=device, dtype="bfloat16"))
    texts, out = real_texts(), []
    for engine in (fp32, bf16):
        resident = engine.make_resident(adapter, "bench/sentiment", 1)
        rows = [Row(resident, ids) for ids in engine.tokenize(texts, resident.num_virtual_tokens, truncate=True)]
        with torch.inference_mode():
            out.append(torch.stack([x for k in range(0, len(rows), 32) for x in engine.classify(rows[k: k + 32])[0]]))
    agree = int((out[0].argmax(1) == out[1].argmax(1)).sum())
    return agree, len(texts), float((out[0] - out[1]).abs().max())


def dtypes_md(runs: dict[str, DtypeRun], agreement: tuple[int, int, float]) -> str:
    lines = ["| dtype (why) | planner | requests/s | ÷ PEFT one at a time (same dtype) |", "|---|---|---:|---:|"]
    for run in runs.values():
        names = ["calibrated", *(f"fixed {o}" for o in run.sweep), None]
        for name, r in zip(names, [run.calibrated, *run.sweep.values(), run.peft_one]):
            same = run.plans.get(name, "") if name else ""
            label = f"{r.name} (same passes as {same}: timed once)" if same else r.name
            lines.append(f"| {run.dtype} ({run.reason}) | {label} | {r.rps:.1f} | "
                         f"{r.rps / run.peft_one.rps:.2f} |")
    lines += ["", "| dtype | calibrated pass cost (start-up) |", "|---|---|"]
    lines += [f"| {run.dtype} | {run.cost.describe()} |" for run in runs.values()]
    checks = []
    if "float32" in runs and "bfloat16" in runs:
        speedup = runs["bfloat16"].calibrated.rps / runs["float32"].calibrated.rps
        checks.append((f"offline classify bf16 ÷ fp32 (calibrated planner) ≥ {TARGET_SPEEDUP}", f"{speedup:.2f}×",
                       speedup >= TARGET_SPEEDUP))
        peft = runs["bfloat16"].peft_one.rps / runs["float32"].peft_one.rps
        checks.append(("PEFT one at a time, bf16 ÷ fp32 (report)", f"{peft:.2f}×", None))
    for run in runs.values():
        best_o, best = run.best_fixed
        ratio = run.calibrated.rps / best.rps
        checks.append((f"{run.dtype}: calibrated ({run.cost.overhead_tokens}) within 5 % of the best fixed "
                       f"(overhead {best_o})", f"{ratio:.3f}", ratio >= TARGET_PLANNER))
        checks.append((f"{run.dtype}: ptserve mixed (calibrated) ÷ PEFT one at a time, {run.dtype} (report)",
                       f"{run.calibrated.rps / run.peft_one.rps:.2f}×", None))
    agree, n, diff = agreement
    checks.append((f"labels bf16 = fp32 on real texts ≥ {TARGET_AGREEMENT:.1%}", f"{agree}/{n} = {agree / n:.2%} "
                   f"(max |Δ logit| {diff:.1e})", agree / n >= TARGET_AGREEMENT))
    lines += ["", "| target | measured | |", "|---|---:|---|"]
    lines += [f"| {name} | {value} | {'' if ok is None else 'PASS' if ok else 'MISS'} |" for name, value, ok in checks]
    return "\n".join(lines)
