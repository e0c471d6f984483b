"""Sampling at the edges of what the API admits (issue 10, finding 1): any temperature, top_p, top_k and seed
the schemas accept, over any finite logits (huge ones and -inf entries included), give a token — never an
exception, never a NaN draw — and ``SamplingParams`` refuses what sampling cannot compute."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ptserve.adapters_store.errors import InvalidInput
from ptserve.server.generation.sampling import MIN_TEMPERATURE, finite_rows, sample_next
from ptserve.server.generation.sequence import SamplingParams, Sequence
from ptserve.server.resident import ResidentAdapter

F32_MAX = float(torch.finfo(torch.float32).max)


def _seq(**params) -> Sequence:
    """A sequence as far as sampling looks at it (its params and generator); no model needed."""
    adapter = ResidentAdapter("t/a", 1, None, torch.zeros(1, 2, 1, 1, 1), {})
    return Sequence(adapter, [0], SamplingParams(**params), tokenizer=None, eos_ids=frozenset(), max_positions=8)


finite_logits = st.lists(st.floats(-F32_MAX, F32_MAX, width=32), min_size=2, max_size=40)
masked = st.lists(st.booleans(), min_size=40, max_size=40)  # which logits become -inf (never all of them)
sampling = st.fixed_dictionaries({
    "temperature": st.one_of(st.sampled_from([0.0, 5e-324, 1e-300, 1e-45, 1e-40, 1e-8, 10.0]),
                             st.floats(0, 10)),
    "top_p": st.one_of(st.sampled_from([5e-324, 1e-300, 1e-40, 1e-8, 1.0]), st.floats(5e-324, 1)),
    "top_k": st.one_of(st.sampled_from([0, 1, 2, 10**30, 2**63]), st.integers(0, 50)),
    "seed": st.one_of(st.none(), st.integers(0, 2**63 - 1)),
})


@settings(max_examples=400, deadline=None)
@given(values=finite_logits, mask=masked, params=sampling)
def test_any_admitted_parameters_over_any_finite_logits_give_an_allowed_token(values, mask, params):
    logits = torch.tensor(values, dtype=torch.float32)
    drop = torch.tensor(mask[: len(values)])
    drop[int(logits.argmax())] = False  # at least one finite logit stays
    logits[drop] = float("-inf")
    assert finite_rows(logits[None]) == [True]
    seq = _seq(**params)
    token = sample_next(logits[None], [seq])[0]
    assert 0 <= token < len(values) and math.isfinite(logits[token])
    if params["top_k"] > 0:  # within the k best (ties at the k-th score included)
        kth = torch.topk(logits, min(params["top_k"], len(values))).values[-1]
        assert logits[token] >= kth


@pytest.mark.parametrize("top_p", [5e-324, 1e-300, 1e-45, 1e-40, 1e-8])
@pytest.mark.parametrize("temperature", [1e-300, 0.5, 10.0])
def test_a_top_p_below_the_best_tokens_probability_keeps_exactly_the_best_token(top_p, temperature):
    """In float32 such a top_p rounds to 0: every token used to be cut and ``torch.multinomial`` raised."""
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0)) * 3
    seqs = [_seq(temperature=temperature, top_p=top_p, seed=i) for i in range(3)]
    for _ in range(5):
        assert sample_next(logits, seqs) == logits.argmax(-1).tolist()


@pytest.mark.parametrize("temperature", [5e-324, 1e-300, 1e-40, 1e-8, 1e-3])
def test_a_temperature_below_the_floor_samples_as_the_floor(temperature):
    """``logits / 1e-40`` used to overflow to inf and softmax to NaN; below the floor the floor is used."""
    logits = torch.tensor([[2.0, 1.99, 1.98, -5.0]]) * 0.01  # differences of 1e-4: the floor still samples
    draws = [sample_next(logits, [s])[0] for s in [_seq(temperature=temperature, seed=3)] for _ in range(64)]
    floor = [sample_next(logits, [s])[0] for s in [_seq(temperature=MIN_TEMPERATURE, seed=3)] for _ in range(64)]
    assert draws == floor and len(set(draws)) > 1  # the same seeded draws as at the floor, and not greedy


def test_huge_finite_logits_sample_without_overflow():
    logits = torch.tensor([[F32_MAX, F32_MAX * 0.999, -F32_MAX, 0.0]])
    for temperature in (MIN_TEMPERATURE, 1.0, 10.0):
        draws = {sample_next(logits, [_seq(temperature=temperature, seed=s)])[0] for s in range(20)}
        assert draws == {0}  # 3.4e38 * 0.001 apart: only the best has any mass left


def test_finite_rows_flags_what_cannot_be_sampled():
    inf, nan = float("inf"), float("nan")
    logits = torch.tensor([[1.0, 2.0], [nan, 1.0], [inf, 1.0], [-inf, -inf], [-inf, 3.0], [F32_MAX, -F32_MAX]])
    assert finite_rows(logits) == [True, False, False, False, True, True]


@pytest.mark.parametrize("field,value", [
    ("temperature", float("nan")), ("temperature", float("inf")), ("temperature", -1e-9),
    ("top_p", float("nan")), ("top_p", 0.0), ("top_p", 1.0000001), ("top_k", -1),
    ("max_new_tokens", 0), ("seed", -1), ("seed", 2**64), ("stop", ("",)),
])
def test_sampling_params_refuse_what_sampling_cannot_compute(field, value):
    with pytest.raises(InvalidInput, match=field):
        SamplingParams(**{field: value})
