"""Batch formation policy, free of torch so it is tested fast and exhaustively.

Given the lengths (virtual + real tokens) of the rows waiting, split them into forward passes that respect the
row and padded-token budgets while wasting as little compute on padding as possible: rows are sorted by length
and cut into contiguous runs by a small dynamic program whose cost per pass is ``overhead + rows * max_len``.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class BatchPolicy:
    max_batch_size: int = 64
    max_batch_tokens: int = 16384  # rows * padded length
    # Fixed cost of one forward pass, in token-equivalents: the server measures it at start-up for its backbone,
    # device and dtype (calibrate.py, cost_model.py); 64 is the fallback, fitted on a 2-core EPYC with MiniLM in
    # float32 (benchmarks/RESULTS.md: 32-64 beat 256 by 20-35% there). PTSERVE_BATCH_OVERHEAD_TOKENS overrides.
    overhead_tokens: int = 64

    def fits(self, rows: int, max_len: int) -> bool:
        return rows <= self.max_batch_size and rows * max_len <= self.max_batch_tokens


def plan_batches(lengths: list[int], policy: BatchPolicy) -> list[list[int]]:
    """Indices into ``lengths`` grouped into passes; every index appears exactly once.

    A row longer than ``max_batch_tokens`` still gets a pass of its own (the engine's position limit, not the
    batch budget, decides whether it may run).
    """
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    n = len(order)
    best = [0.0] + [float("inf")] * n  # best[j] = cheapest cost of the first j sorted rows
    cut = [0] * (n + 1)
    for j in range(1, n + 1):
        longest = lengths[order[j - 1]]
        for i in range(j - 1, -1, -1):  # pass = sorted rows i..j-1
            rows = j - i
            if rows > 1 and not policy.fits(rows, longest):
                break
            cost = best[i] + policy.overhead_tokens + rows * longest
            if cost < best[j]:
                best[j], cut[j] = cost, i
    passes, j = [], n
    while j > 0:
        passes.append(order[cut[j]:j])
        j = cut[j]
    return passes[::-1]
