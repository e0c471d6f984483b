"""Batch formation policy, free of torch so it is tested fast and exhaustively.

Given the lengths (virtual + real tokens) of the rows waiting, split them into forward passes that respect the
row and padded-token budgets while wasting as little compute on padding as possible: rows are sorted by length
and cut into contiguous runs by a small dynamic program whose cost per pass is ``overhead + rows * max_len``.
The batcher plans over a window of ``PLAN_WINDOW_PASSES`` passes' worth of rows and runs one pass of the plan.
A window of 4 passes' worth lets rows of similar lengths fill whole passes under a full queue, but it scatters a
many-text request's rows over passes of every length, so such a request waits for the whole window: 32 requests
of 8 texts over MiniLM finished 2 requests in 4 s instead of 26 (issue 12). One pass's worth it is.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

PLAN_WINDOW_PASSES = 1  # how many passes' worth of waiting rows one plan may look at (see above)


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

    @property
    def window_rows(self) -> int:
        """The most rows one plan looks at."""
        return PLAN_WINDOW_PASSES * self.max_batch_size


def plan_cost(passes: list[list[int]], lengths: list[int], policy: BatchPolicy) -> int:
    """What the planner minimises: ``overhead + rows * max_len`` summed over passes."""
    return sum(policy.overhead_tokens + len(p) * max(lengths[i] for i in p) for p in passes)


def plan_batches(lengths: list[int], policy: BatchPolicy) -> list[list[int]]:
    """Indices into ``lengths`` grouped into passes (shortest rows first); every index appears exactly once.
    Of plans that cost the same, the one with fewer, larger passes.

    A row longer than ``max_batch_tokens`` still gets a pass of its own (the engine's position limit, not the
    batch budget, decides whether it may run).
    """
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    n = len(order)
    sorted_len = [lengths[i] for i in order]
    best = np.full(n + 1, np.inf)  # best[j] = cheapest cost of the first j sorted rows
    best[0] = 0.0
    starts = np.arange(n + 1, dtype=np.float64)
    cut = [0] * (n + 1)
    for j in range(1, n + 1):
        longest = sorted_len[j - 1]
        rows = max(1, min(policy.max_batch_size, policy.max_batch_tokens // max(longest, 1), j))
        lo = j - rows  # the pass is sorted rows i..j-1 for i in lo..j-1 (the longest decides its padding)
        cost = best[lo:j] + (j - starts[lo:j]) * longest  # argmin: the first, i.e. the largest pass, on ties
        k = int(cost.argmin())
        best[j], cut[j] = cost[k] + policy.overhead_tokens, lo + k
    passes, j = [], n
    while j > 0:
        passes.append(order[cut[j]:j])
        j = cut[j]
    return passes[::-1]
