"""The cost of one forward pass, ``fixed + per_token * rows * max_len``, fitted from timed passes (torch-free).

The planner (``batch_plan``) weighs a pass by ``overhead_tokens + rows * max_len``; its ``overhead_tokens`` is
``fixed / per_token``: what one more pass costs, in padded tokens. ``calibrate.py`` times a few pass shapes on the
loaded backbone at start-up and hands the timings here. Timings are noisy (a shared machine, a first call that
allocates), so the fit is defensive: the caller gives medians of repeats, the fit weighs relative errors (so
small passes, which decide ``fixed``, count as much as large ones), clamps the result to a sane range and falls
back to the default when the timings do not fit a line at all.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

DEFAULT_OVERHEAD_TOKENS = 64  # the planner's value before calibration (fitted on a 2-core EPYC in float32)
MAX_OVERHEAD_TOKENS = 16384  # no pass is worth more than a full default batch budget
MIN_R2 = 0.8  # below this the timings are noise around a line, not a line


@dataclass(frozen=True)
class PassTiming:
    rows: int
    max_len: int  # padded length of the pass (virtual + real tokens)
    seconds: float  # median of repeated passes of this shape

    @property
    def tokens(self) -> int:
        return self.rows * self.max_len


@dataclass(frozen=True)
class PassCost:
    overhead_tokens: int  # what the planner uses
    source: str  # "measured", "setting" or "fallback: <why>"
    fixed_s: float = math.nan  # fitted fixed cost of a pass (nan unless measured)
    per_token_s: float = math.nan  # fitted cost of one padded token
    r2: float = math.nan  # weighted R² of the fit
    calibration_s: float = math.nan  # how long measuring took

    def describe(self) -> str:
        if self.source != "measured":
            return f"overhead_tokens {self.overhead_tokens} ({self.source})"
        return (f"overhead_tokens {self.overhead_tokens} (measured in {self.calibration_s:.2f} s: "
                f"{self.fixed_s * 1e3:.2f} ms per pass + {self.per_token_s * 1e6:.2f} µs per padded token, "
                f"R² {self.r2:.3f})")


def from_setting(overhead_tokens: int) -> PassCost:
    return PassCost(overhead_tokens, "setting")


def fit_pass_cost(timings: list[PassTiming], default: int = DEFAULT_OVERHEAD_TOKENS) -> PassCost:
    """Weighted least squares of seconds on padded tokens (weights 1/seconds², i.e. relative residuals).

    A negative intercept (larger passes cost more per token, e.g. out of cache) means passes cost nothing
    extra: overhead 0. The default comes back, with the reason, when the timings are too few, not finite,
    not increasing with the tokens, or do not fit a line (weighted R² < ``MIN_R2``)."""
    pts = [(float(t.tokens), t.seconds) for t in timings]
    if len({x for x, _ in pts}) < 2:
        return PassCost(default, "fallback: fewer than two pass sizes timed")
    if not all(math.isfinite(y) and y > 0 for _, y in pts):
        return PassCost(default, "fallback: a timing is not a positive number")
    w = [1.0 / (y * y) for _, y in pts]
    sw = sum(w)
    mx = sum(wi * x for wi, (x, _) in zip(w, pts)) / sw
    my = sum(wi * y for wi, (_, y) in zip(w, pts)) / sw
    sxx = sum(wi * (x - mx) ** 2 for wi, (x, _) in zip(w, pts))
    sxy = sum(wi * (x - mx) * (y - my) for wi, (x, y) in zip(w, pts))
    syy = sum(wi * (y - my) ** 2 for wi, (_, y) in zip(w, pts))
    slope = sxy / sxx
    if not slope > 0:
        return PassCost(default, "fallback: larger passes did not take longer")
    intercept = my - slope * mx
    r2 = (sxy * sxy) / (sxx * syy) if syy > 0 else 1.0
    if r2 < MIN_R2:
        return PassCost(default, f"fallback: timings do not fit fixed + per-token cost (R² {r2:.2f})",
                        intercept, slope, r2)
    fixed = max(0.0, intercept)
    overhead = min(MAX_OVERHEAD_TOKENS, round(fixed / slope))
    return PassCost(overhead, "measured", fixed, slope, r2)
