"""The pass cost fit (torch-free): it recovers a known cost, shrugs off noise, clamps, and falls back when the
timings are nonsense; the planner it feeds then trades passes for padding as the cost says."""
from __future__ import annotations

import math
import random

import pytest

from ptserve.server.batch_plan import BatchPolicy, plan_batches
from ptserve.server.calibrate import shapes
from ptserve.server.cost_model import (
    DEFAULT_OVERHEAD_TOKENS, MAX_OVERHEAD_TOKENS, PassTiming, fit_pass_cost, from_setting,
)

SHAPES = [(1, 32), (4, 32), (16, 32), (1, 96), (4, 96), (16, 96)]


def timings(fixed: float, per_token: float, noise: float = 0.0, seed: int = 0, shapes=SHAPES) -> list[PassTiming]:
    rng = random.Random(seed)
    return [PassTiming(r, n, (fixed + per_token * r * n) * (1 + rng.uniform(-noise, noise))) for r, n in shapes]


@pytest.mark.parametrize("fixed,per_token", [(2e-3, 2e-5), (8e-3, 3e-5), (1e-4, 1e-5), (5e-2, 1e-6)])
def test_exact_timings_give_fixed_over_per_token(fixed, per_token):
    cost = fit_pass_cost(timings(fixed, per_token))
    assert cost.source == "measured"
    assert cost.fixed_s == pytest.approx(fixed, rel=1e-9) and cost.per_token_s == pytest.approx(per_token, rel=1e-9)
    assert cost.overhead_tokens == min(MAX_OVERHEAD_TOKENS, round(fixed / per_token))
    assert cost.r2 == pytest.approx(1.0)


def test_noisy_medians_land_near_the_truth():
    """±10 % on every timing (what a median of a few repeats leaves on a busy machine): within 40 % of the true
    100 tokens (the planner's cost is flat near its optimum: a plan for 60 or 140 costs about what one for 100 does)."""
    for seed in range(50):
        cost = fit_pass_cost(timings(2e-3, 2e-5, noise=0.10, seed=seed))
        assert cost.source == "measured", cost
        assert 60 <= cost.overhead_tokens <= 140, (seed, cost)


def test_larger_passes_costing_more_per_token_mean_no_overhead():
    """Out-of-cache passes: cost grows faster than the tokens, the line crosses below zero: overhead 0."""
    curved = [PassTiming(r, n, 1e-6 * (r * n) ** 1.3) for r, n in SHAPES]
    cost = fit_pass_cost(curved)
    assert cost.source == "measured" and cost.overhead_tokens == 0 and cost.fixed_s == 0.0


def test_overhead_is_clamped():
    cost = fit_pass_cost(timings(10.0, 1e-9))
    assert cost.source == "measured" and cost.overhead_tokens == MAX_OVERHEAD_TOKENS


@pytest.mark.parametrize("bad,why", [
    ([PassTiming(4, 32, 1e-3)] * 3, "fewer than two pass sizes"),
    ([], "fewer than two pass sizes"),
    (timings(1e-2, -1e-6), "did not take longer"),
    ([PassTiming(1, 32, 0.0), PassTiming(16, 96, 1e-2)], "not a positive number"),
    ([PassTiming(1, 32, math.nan), PassTiming(16, 96, 1e-2)], "not a positive number"),
    ([PassTiming(1, 32, math.inf), PassTiming(16, 96, 1e-2)], "not a positive number"),
])
def test_nonsense_falls_back_to_the_default(bad, why):
    cost = fit_pass_cost(bad)
    assert cost.overhead_tokens == DEFAULT_OVERHEAD_TOKENS and cost.source.startswith("fallback") and why in cost.source


def test_timings_that_do_not_fit_a_line_fall_back():
    """Pure noise (a machine far busier than the passes): the fit explains little, so it is not used."""
    rng = random.Random(3)
    noise = [PassTiming(r, n, rng.uniform(0.05, 0.5)) for r, n in SHAPES * 2]
    cost = fit_pass_cost(noise)
    assert cost.overhead_tokens == DEFAULT_OVERHEAD_TOKENS and "R²" in cost.source


def test_describe_and_setting():
    assert "measured" in fit_pass_cost(timings(2e-3, 2e-5)).describe()
    set_cost = from_setting(128)
    assert set_cost.overhead_tokens == 128 and set_cost.source == "setting" and math.isnan(set_cost.fixed_s)
    assert set_cost.describe() == "overhead_tokens 128 (setting)"


def test_calibration_shapes_respect_the_budgets():
    assert shapes(64, 16384, 512) == [(1, 32), (4, 32), (16, 32), (1, 96), (4, 96), (16, 96)]
    assert shapes(4, 16384, 512) == [(1, 32), (4, 32), (1, 96), (4, 96)]
    assert shapes(64, 128, 512) == [(1, 32), (4, 32), (1, 96)]
    assert shapes(64, 16384, 64) == [(1, 32), (4, 32), (16, 32)]
    assert shapes(64, 16384, 16) == [(1, 16)]  # a backbone shorter than every shape still gets one


def _cost_of(passes, lengths, fixed, per_token):
    return sum(fixed + per_token * len(p) * max(lengths[i] for i in p) for p in passes)


def test_planner_with_the_fitted_overhead_beats_fixed_guesses_under_that_cost():
    """Under a pass cost, the plan made with the overhead fitted from its timings costs no more than the plans
    made with the fixed values a sweep would try (the DP is optimal for its own overhead)."""
    rng = random.Random(7)
    for fixed, per_token in [(2e-3, 2e-5), (8e-3, 2e-5), (2e-4, 3e-5)]:
        fitted = fit_pass_cost(timings(fixed, per_token, noise=0.02, seed=1)).overhead_tokens
        for _ in range(20):
            lengths = [rng.randint(20, 60) for _ in range(64)]
            best = _cost_of(plan_batches(lengths, BatchPolicy(overhead_tokens=fitted)), lengths, fixed, per_token)
            for guess in (0, 16, 32, 64, 128, 256, 512, 1024):
                other = _cost_of(plan_batches(lengths, BatchPolicy(overhead_tokens=guess)), lengths, fixed, per_token)
                assert best <= other * 1.01, (fixed, per_token, fitted, guess)
