"""``plan_batches`` over many seeded random length lists: coverage, budgets, cost against references."""
from __future__ import annotations

import math
import random
import time

import pytest

from ptserve.server.batch_plan import BatchPolicy, plan_batches

SEEDS = range(300)


def cost(passes: list[list[int]], lengths: list[int], policy: BatchPolicy) -> int:
    return sum(policy.overhead_tokens + len(p) * max(lengths[i] for i in p) for p in passes)


def greedy_arrival(lengths: list[int], policy: BatchPolicy) -> list[list[int]]:
    """The naive packer: fill a pass in arrival order until the next row would break a budget."""
    passes: list[list[int]] = []
    current: list[int] = []
    for i, n in enumerate(lengths):
        longest = max([lengths[j] for j in current] + [n])
        if current and not policy.fits(len(current) + 1, longest):
            passes.append(current)
            current = []
        current.append(i)
    if current:
        passes.append(current)
    return passes


def set_partitions(items: list[int]):
    if not items:
        yield []
        return
    first, rest = items[0], items[1:]
    for part in set_partitions(rest):
        for k in range(len(part)):
            yield part[:k] + [[first] + part[k]] + part[k + 1:]
        yield [[first]] + part


def feasible(passes: list[list[int]], lengths: list[int], policy: BatchPolicy) -> bool:
    return all(len(p) == 1 or policy.fits(len(p), max(lengths[i] for i in p)) for p in passes)


def random_case(seed: int) -> tuple[list[int], BatchPolicy]:
    rng = random.Random(seed)
    n = rng.choice([1, 2, 3, rng.randint(4, 40), rng.randint(40, 300)])
    shape = rng.choice(["uniform", "bimodal", "equal", "outliers"])
    if shape == "uniform":
        lengths = [rng.randint(1, 512) for _ in range(n)]
    elif shape == "bimodal":
        lengths = [rng.choice([rng.randint(5, 30), rng.randint(200, 500)]) for _ in range(n)]
    elif shape == "equal":
        lengths = [rng.randint(1, 512)] * n
    else:
        lengths = [rng.randint(10, 40) if rng.random() > 0.05 else rng.randint(400, 4000) for _ in range(n)]
    policy = BatchPolicy(
        max_batch_size=rng.choice([1, 2, 4, 8, 16, 64]),
        max_batch_tokens=rng.choice([64, 512, 2048, 16384]),
        overhead_tokens=rng.choice([0, 1, 16, 256, 4096]),
    )
    return lengths, policy


@pytest.mark.parametrize("chunk", range(3))
def test_random_plans_keep_every_promise(chunk):
    for seed in SEEDS[chunk::3]:
        lengths, policy = random_case(seed)
        passes = plan_batches(lengths, policy)
        where = (seed, lengths[:10], policy)
        # every index exactly once
        flat = [i for p in passes for i in p]
        assert sorted(flat) == list(range(len(lengths))), where
        assert all(p for p in passes), where
        # budgets: a pass may break them only when it is a single row
        for p in passes:
            longest = max(lengths[i] for i in p)
            assert len(p) <= policy.max_batch_size, where
            assert len(p) == 1 or len(p) * longest <= policy.max_batch_tokens, where
        # never worse than packing in arrival order
        naive = greedy_arrival(lengths, policy)
        assert feasible(naive, lengths, policy)
        assert cost(passes, lengths, policy) <= cost(naive, lengths, policy), where


def test_plans_are_optimal_against_brute_force_on_small_inputs():
    checked = 0
    for seed in range(150):
        rng = random.Random(10_000 + seed)
        n = rng.randint(1, 7)
        lengths = [rng.choice([rng.randint(1, 20), rng.randint(50, 300)]) for _ in range(n)]
        policy = BatchPolicy(max_batch_size=rng.randint(1, 5), max_batch_tokens=rng.choice([100, 400, 1000]),
                             overhead_tokens=rng.choice([0, 5, 50, 500]))
        best = min(cost(p, lengths, policy) for p in set_partitions(list(range(n))) if feasible(p, lengths, policy))
        passes = plan_batches(lengths, policy)
        assert cost(passes, lengths, policy) == best, (lengths, policy, passes)
        checked += 1
    assert checked == 150


def test_greedy_reference_is_really_beaten_on_mixed_lengths():
    # a guard that the comparison above is not vacuous: interleaved short/long rows cost the naive packer padding
    lengths = [10, 500] * 16
    policy = BatchPolicy(max_batch_size=64, max_batch_tokens=100_000, overhead_tokens=16)
    passes = plan_batches(lengths, policy)
    assert cost(passes, lengths, policy) < cost(greedy_arrival(lengths, policy), lengths, policy)
    assert sorted(sorted(lengths[i] for i in p) for p in passes) == [[10] * 16, [500] * 16]


@pytest.mark.parametrize("n,size,tokens,length", [
    (200, 64, 1 << 20, 10),  # the row budget binds
    (95, 64, 1000, 100),  # the token budget binds: 10 rows of 100 per pass
    (64, 64, 1 << 20, 7),  # exactly one full pass
    (1, 64, 1 << 20, 7),
])
def test_identical_lengths_pack_into_full_batches(n, size, tokens, length):
    policy = BatchPolicy(max_batch_size=size, max_batch_tokens=tokens, overhead_tokens=16)
    passes = plan_batches([length] * n, policy)
    per_pass = min(size, tokens // length)
    assert len(passes) == math.ceil(n / per_pass)
    sizes = sorted((len(p) for p in passes), reverse=True)
    assert sizes[:-1] == [per_pass] * (len(passes) - 1)  # all full but (at most) one
    assert sum(sizes) == n


def test_long_outlier_gets_its_own_pass_when_overhead_is_small():
    lengths = [12] * 20
    lengths.insert(7, 500)
    policy = BatchPolicy(max_batch_size=64, max_batch_tokens=1 << 20, overhead_tokens=8)
    passes = plan_batches(lengths, policy)
    assert [7] in passes
    assert len(passes) == 2
    assert sorted(next(p for p in passes if p != [7])) == [i for i in range(21) if i != 7]


def test_outlier_rides_along_when_a_pass_costs_more_than_its_padding():
    lengths = [12] * 20 + [40]
    policy = BatchPolicy(max_batch_size=64, max_batch_tokens=1 << 20, overhead_tokens=10_000)
    assert plan_batches(lengths, policy) == [sorted(range(21), key=lambda i: lengths[i])]


def test_rows_too_long_for_the_token_budget_each_get_a_pass():
    lengths = [5000, 3, 7000, 4]
    passes = plan_batches(lengths, BatchPolicy(max_batch_size=8, max_batch_tokens=1000, overhead_tokens=16))
    assert [0] in passes and [2] in passes
    assert sorted(map(sorted, passes)) == [[0], [1, 3], [2]]


def test_empty_and_deterministic():
    policy = BatchPolicy()
    assert plan_batches([], policy) == []
    lengths, policy = random_case(7)
    assert plan_batches(lengths, policy) == plan_batches(list(lengths), policy)


def test_planning_a_full_window_is_cheap():
    rng = random.Random(1)
    lengths = [rng.randint(1, 512) for _ in range(4 * 64)]  # what the batcher plans over at most
    start = time.perf_counter()
    for _ in range(10):
        plan_batches(lengths, BatchPolicy())
    assert (time.perf_counter() - start) / 10 < 0.05
