"""Start-up calibration of the batch planner: time a handful of pass shapes on the loaded backbone (its device,
its dtype, this process's threads) and fit the pass cost (``cost_model.fit_pass_cost``).

Passes run through ``Engine.classify`` (the batcher's own call) with a zero prefix of ``PREFIX_TOKENS`` virtual
tokens and a zero head; rows of a shape all have the same length, so each pass costs ``rows * max_len`` padded
tokens. Shapes are timed in interleaved rounds after one warm-up round; each shape's median goes to the fit.
"""
from __future__ import annotations

import dataclasses
import statistics
import time

import torch

from ptserve.adapters_store.format import Adapter, AdapterConfig
from ptserve.adapters_store.heads import head_shapes
from ptserve.server.cost_model import DEFAULT_OVERHEAD_TOKENS, PassCost, PassTiming, fit_pass_cost
from ptserve.server.engine import Engine, Row

PREFIX_TOKENS = 16
# 32..1536 padded tokens: the pass sizes between which the planner chooses for short texts; a round takes
# ~0.25 s in float32 and ~0.1 s in bfloat16 with MiniLM on 2 Xeon cores.
ROWS = (1, 4, 16)
LENGTHS = (32, 96)  # padded lengths (virtual + real tokens) of the timed passes
MIN_ROUNDS, MAX_ROUNDS = 3, 7


def calibration_rows(engine: Engine, rows: int, length: int) -> list[Row]:
    """``rows`` rows of exactly ``length`` positions under a zero prefix (values do not change the cost)."""
    fp, head = engine.fp, engine.backbone.family.head_kind
    p = min(PREFIX_TOKENS, length - 2)
    tensors = {"prompt_embeddings": torch.zeros(p, fp.prefix_width)}
    tensors |= {name: torch.zeros(*shape) for name, shape in head_shapes(head, 2, fp.hidden_size).items()}
    adapter = Adapter(AdapterConfig("classify", p, fp, ("a", "b"), head=head), tensors)
    resident = engine.make_resident(adapter, "calibration/zero", 0)
    ids = engine.tokenize([" ".join(["word"] * length)], p, truncate=True)[0][: length - p]
    return [Row(resident, ids)] * rows


def shapes(max_batch_size: int, max_batch_tokens: int, max_positions: int) -> list[tuple[int, int]]:
    """(rows, padded length) pairs within the batch budgets and the backbone's positions."""
    out = [(r, n) for n in LENGTHS if n <= max_positions for r in ROWS
           if r <= max_batch_size and r * n <= max_batch_tokens]
    return out or [(1, min(LENGTHS[0], max_positions))]


def warm_up(engine: Engine, max_batch_size: int, max_batch_tokens: int) -> dict[tuple[int, int], list[Row]]:
    """One pass of every calibration shape (first calls allocate, pick kernels, or compile); the batches."""
    plan = shapes(max_batch_size, max_batch_tokens, engine.backbone.max_positions)
    batches = {shape: calibration_rows(engine, *shape) for shape in plan}
    for batch in batches.values():
        engine.classify(batch)
    return batches


def measure_pass_cost(
    engine: Engine, max_batch_size: int, max_batch_tokens: int, budget_s: float = 1.0, cap_s: float = 5.0
) -> PassCost:
    """Time the shapes (``MIN_ROUNDS`` rounds, more while within ``budget_s``) and fit the cost. A machine so
    busy (or a backbone so slow) that the minimum takes over ``cap_s`` gets the default, with the reason."""
    start = time.perf_counter()
    batches = warm_up(engine, max_batch_size, max_batch_tokens)
    plan = list(batches)
    times: dict[tuple[int, int], list[float]] = {shape: [] for shape in plan}
    for k in range(MAX_ROUNDS):
        elapsed = time.perf_counter() - start
        if elapsed > (budget_s if k >= MIN_ROUNDS else cap_s):
            break
        for shape in plan[k % len(plan):] + plan[: k % len(plan)]:  # rotate, so drifting load hits all alike
            t0 = time.perf_counter()
            engine.classify(batches[shape])  # returns logits on the cpu: the device has finished
            times[shape].append(time.perf_counter() - t0)
    took = time.perf_counter() - start
    if len(times[plan[0]]) < MIN_ROUNDS:
        return PassCost(DEFAULT_OVERHEAD_TOKENS, f"fallback: {MIN_ROUNDS} rounds of timing took over {cap_s:g} s",
                        calibration_s=took)
    cost = fit_pass_cost([PassTiming(r, n, statistics.median(ts)) for (r, n), ts in times.items()])
    return dataclasses.replace(cost, calibration_s=took)
