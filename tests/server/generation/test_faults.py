"""Fault isolation inside the generation engine (issue 10, finding 1 at depth).

One sequence's failure ends that sequence only: non-finite logits (an adapter whose finite but huge prefix values
overflow GPT-2's layer norm), a forward pass that raises because of one row, sampling parameters at the edges of
what the API admits. Every other sequence in the batch, of every tenant, produces exactly the tokens it produces
alone, in one step per token, and a departed row leaves nothing in its cache slot for the next occupant.
"""
from __future__ import annotations

import pytest

from ptserve.adapters_store.errors import GenerationFailed, InvalidInput, NonFiniteLogits
from ptserve.server.backbone import load_backbone
from ptserve.server.generation.engine import GenerationEngine, GenerationLimits, StepEvent
from ptserve.server.generation.sequence import SamplingParams, Sequence
from tests.factories import make_adapter, save_tiny_decoder

LONG = "the quick brown fox jumps over the lazy dog and many tenants share one frozen backbone"
GREEDY = SamplingParams(max_new_tokens=8, temperature=0)
SEEDED = SamplingParams(max_new_tokens=8, temperature=0.9, top_k=40, top_p=0.9, seed=7)


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def decoder(request, tmp_path_factory):
    bb = load_backbone(str(save_tiny_decoder(request.param, tmp_path_factory.mktemp(request.param))),
                       device="cpu", dtype="float32")
    good = {p: make_adapter(bb.fingerprint, p, seed=p, task="generate") for p in (2, 5, 8)}
    # finite values (an upload validates finiteness only) whose size overflows the backbone's arithmetic
    huge = make_adapter(bb.fingerprint, 8, seed=1, task="generate", scale=1e30)
    return request.param, bb, good, huge


def _engine(bb, slots: int = 3) -> GenerationEngine:
    engine = GenerationEngine(bb, GenerationLimits(max_running=slots, max_seq_tokens=128, prefix_cap=16))
    engine.eos_ids = frozenset()  # every healthy sequence runs to max_new_tokens, so outputs compare in full
    return engine


def _new(engine, adapter, tenant: str, prompt: str, params: SamplingParams) -> Sequence:
    return engine.new_sequence(engine.make_resident(adapter, f"{tenant}/x", 1), prompt, params)


def _drain(engine, late: list[Sequence] = (), after_steps: int = 1) -> dict[int, list[StepEvent]]:
    """Step until idle (adding ``late`` after ``after_steps`` steps); events by sequence id."""
    events: dict[int, list[StepEvent]] = {}
    steps = 0
    while engine.has_work or (late and steps < after_steps):
        for ev in engine.step():
            events.setdefault(ev.seq.id, []).append(ev)
        steps += 1
        if steps == after_steps:
            for seq in late:
                engine.add(seq)
        assert steps < 300
    return events


def _alone(bb, adapter, prompt: str, params: SamplingParams) -> list[int]:
    engine = _engine(bb, slots=1)
    seq = _new(engine, adapter, "solo", prompt, params)
    engine.add(seq)
    _drain(engine)
    return seq.output_ids


def _assert_healthy(seq: Sequence, events: list[StepEvent], expected: list[int]) -> None:
    assert [e.error for e in events] == [None] * len(events)
    assert seq.output_ids == expected and seq.finish_reason == "length"
    assert seq.steps == len(expected)  # one token per step: never held back by the failure beside it


def test_an_overflowing_adapter_fails_its_own_sequence_only(decoder):
    kind, bb, good, huge = decoder
    engine = _engine(bb)
    b1 = _new(engine, good[5], "bravo", "hello world the fox", GREEDY)
    a = _new(engine, huge, "alpha", LONG, GREEDY)
    b2 = _new(engine, good[2], "bravo", "the lazy dog", SEEDED)
    c = _new(engine, good[8], "charlie", "many tenants", GREEDY)  # joins later, into the failed row's slot
    for seq in (b1, a, b2):
        engine.add(seq)
    events = _drain(engine, late=[c])
    if kind == "gpt2":  # its layer norm overflows to NaN; Llama's RMSNorm stays finite (then the row just runs)
        assert [type(e.error) for e in events[a.id]] == [NonFiniteLogits]
        assert "not finite" in events[a.id][0].error.message and a.output_ids == []
        assert events[a.id][0].done and events[a.id][0].token is None
    for seq, adapter, prompt, params in ((b1, good[5], "hello world the fox", GREEDY),
                                         (b2, good[2], "the lazy dog", SEEDED), (c, good[8], "many tenants", GREEDY)):
        _assert_healthy(seq, events[seq.id], _alone(bb, adapter, prompt, params))
    assert engine.scheduler.running == [] and engine.scheduler.reserved == 0


def test_what_a_departed_row_leaves_in_its_slot_never_reaches_the_next_occupant(decoder):
    """The overflowing row's K/V (NaN on GPT-2, values near 1e30 on Llama) stay in its slot's columns; the next
    occupant, with a shorter prefix and prompt, reads those columns masked (attention reads a window as wide as
    the widest running row, here the long-running neighbour's). Masked or not, a stale NaN or infinite score
    poisons the softmax unless the departing row's columns are zeroed."""
    _, bb, good, huge = decoder
    engine = _engine(bb, slots=2)
    neighbour = _new(engine, good[8], "charlie", LONG, SamplingParams(max_new_tokens=14, temperature=0))
    a = _new(engine, huge, "alpha", LONG, SamplingParams(max_new_tokens=1, temperature=0))
    nxt = _new(engine, good[2], "bravo", "hi", SamplingParams(max_new_tokens=6, temperature=0))
    engine.add(neighbour)
    engine.add(a)
    events = _drain(engine, late=[nxt])
    _assert_healthy(nxt, events[nxt.id], _alone(bb, good[2], "hi", SamplingParams(max_new_tokens=6, temperature=0)))
    _assert_healthy(neighbour, events[neighbour.id],
                    _alone(bb, good[8], LONG, SamplingParams(max_new_tokens=14, temperature=0)))
    assert all(not t.any() for t in (*engine.cache.k, *engine.cache.v))  # an idle engine's cache is all zeros


def test_a_decode_forward_that_fails_for_one_row_fails_that_row_only(decoder):
    """A row whose newest token is outside the embedding (impossible through the API; it stands for any
    row-specific failure of the forward) makes the batched decode raise; its halves are retried until the
    row is found, and the rows beside it get their token in the same step."""
    _, bb, good, _ = decoder
    engine = _engine(bb, slots=4)
    seqs = [_new(engine, good[p], t, prompt, params) for p, t, prompt, params in (
        (5, "alpha", "hello world", GREEDY), (2, "bravo", "the lazy dog", SEEDED),
        (8, "charlie", "many tenants", GREEDY), (2, "delta", "prefix", SEEDED))]
    for seq in seqs:
        engine.add(seq)
    events = {}
    for ev in engine.step():  # everyone's prefill and first token
        events.setdefault(ev.seq.id, []).append(ev)
    broken = seqs[2]
    broken.output_ids[-1] = engine.vocab_size + 7
    for seq_id, evs in _drain(engine).items():
        events[seq_id].extend(evs)
    assert [type(e.error) for e in events[broken.id]][-1] is GenerationFailed
    assert "IndexError" in events[broken.id][-1].error.message
    for seq, (p, prompt, params) in zip(seqs, ((5, "hello world", GREEDY), (2, "the lazy dog", SEEDED),
                                               (8, "many tenants", GREEDY), (2, "prefix", SEEDED))):
        if seq is not broken:
            _assert_healthy(seq, events[seq.id], _alone(bb, good[p], prompt, params))


def test_a_prefill_that_fails_for_one_joining_row_fails_that_row_only(decoder):
    _, bb, good, _ = decoder
    engine = _engine(bb)
    ok1 = _new(engine, good[5], "alpha", "hello world", GREEDY)
    ok2 = _new(engine, good[2], "charlie", "the lazy dog", SEEDED)
    resident = engine.make_resident(good[8], "bravo/x", 1)
    # built past new_sequence's check (which refuses such ids): a prompt the embedding cannot look up
    bad = Sequence(resident, [1, engine.vocab_size + 3, 2], GREEDY, bb.tokenizer, engine.eos_ids, max_positions=128)
    for seq in (ok1, bad, ok2):
        engine.add(seq)
    events = _drain(engine)
    assert [type(e.error) for e in events[bad.id]] == [GenerationFailed] and bad.output_ids == []
    _assert_healthy(ok1, events[ok1.id], _alone(bb, good[5], "hello world", GREEDY))
    _assert_healthy(ok2, events[ok2.id], _alone(bb, good[2], "the lazy dog", SEEDED))


# every sampling field at the edges the API's schemas admit (temperature 0..10, 0 < top_p <= 1, top_k >= 0)
EXTREMES = [
    dict(temperature=t, top_p=p, top_k=k, seed=s)
    for t, p, k, s in (
        (1e-300, 1.0, 0, 0), (5e-324, 1e-300, 0, 2**63 - 1), (1e-40, 1e-40, 2, 1), (1e-45, 0.5, 0, None),
        (10.0, 1e-300, 0, 3), (10.0, 1.0, 10**30, 4), (1e-8, 1e-8, 1, 5), (0.0, 1e-300, 10**30, 6),
        (2.0, 5e-324, 400, 2**63 - 1), (1e-300, 0.999999, 399, 8),
    )
]


def test_extreme_sampling_parameters_sample_without_failing_anyone(decoder):
    _, bb, good, _ = decoder
    engine = _engine(bb, slots=len(EXTREMES) + 1)
    ref = _new(engine, good[5], "bravo", "hello world the fox", SEEDED)
    engine.add(ref)
    extremes = [_new(engine, good[2], "alpha", "the lazy dog", SamplingParams(max_new_tokens=6, **x))
                for x in EXTREMES]
    for seq in extremes:
        engine.add(seq)
    events = _drain(engine)
    _assert_healthy(ref, events[ref.id], _alone(bb, good[5], "hello world the fox", SEEDED))
    for seq in extremes:  # each extreme is computed too, and within the vocabulary
        assert [e.error for e in events[seq.id]] == [None] * 6, seq.params
        assert len(seq.output_ids) == 6 and all(0 <= t < engine.vocab_size for t in seq.output_ids)
    greedy = _alone(bb, good[2], "the lazy dog", SamplingParams(max_new_tokens=6, temperature=0))
    for seq in extremes:  # a top_p below the best token's probability leaves just that token: greedy
        if seq.params.top_p < 1e-7:
            assert seq.output_ids == greedy, seq.params


def test_new_sequence_refuses_token_ids_outside_the_vocabulary(decoder):
    _, bb, good, _ = decoder
    engine = _engine(bb)
    resident = engine.make_resident(good[2], "alpha/x", 1)
    for ids in ([1, engine.vocab_size], [-1], [1, 2.5]):
        with pytest.raises(InvalidInput, match="token ids"):
            engine.new_sequence(resident, ids, GREEDY)
