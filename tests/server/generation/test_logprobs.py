"""Logprobs computed by the engine (``server/generation/logprobs.py``) against an independent reference: PEFT's own
CAUSAL_LM prefix-tuning forward on the same tiny Llama, log-softmaxed at the request's temperature. Each request is
scored inside a mixed continuous batch, so batching must not move a logprob either."""
from __future__ import annotations

import math

import pytest
import torch

from ptserve.server.backbone import load_backbone
from ptserve.server.generation.engine import GenerationEngine, GenerationLimits
from ptserve.server.generation.logprobs import LOGPROB_FLOOR, log_probs
from ptserve.server.generation.sequence import SamplingParams
from tests.factories import make_adapter, peft_prefix_lm, save_tiny_decoder

PROMPTS = ["hello world the fox", "many tenants share one frozen backbone", "the lazy dog"]
TOL = 1e-4


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    bb = load_backbone(str(save_tiny_decoder("llama", tmp_path_factory.mktemp("llama"))), device="cpu",
                       dtype="float32")
    adapters = [make_adapter(bb.fingerprint, p, seed=p, task="generate", scale=2.0) for p in (3, 9)]
    return bb, adapters


def _run(bb, adapters, jobs):
    """jobs: (adapter index, prompt index, SamplingParams); all in one engine of 2 slots -> (seqs, events)."""
    engine = GenerationEngine(bb, GenerationLimits(max_running=2, max_seq_tokens=128))
    engine.eos_ids = frozenset()  # run every request to its max_new_tokens
    residents = [engine.make_resident(a, f"t/a{i}", 1) for i, a in enumerate(adapters)]
    seqs = [engine.new_sequence(residents[a], PROMPTS[p], params) for a, p, params in jobs]
    for seq in seqs:
        engine.add(seq)
    events = []
    while engine.has_work:
        events += engine.step()
    return seqs, events


def _reference(bb, adapter, ids: list[int], temperature: float) -> torch.Tensor:
    """[len(ids), vocab]: PEFT's log_softmax(logits / T) at every position of ``ids``."""
    peft = peft_prefix_lm(bb.path, adapter)
    with torch.no_grad():
        logits = peft(input_ids=torch.tensor([ids])).logits[0].float()
    return torch.log_softmax(logits / (temperature if temperature > 0 else 1.0), dim=-1)


@pytest.mark.parametrize("temperature", [0.0, 0.7, 1.3])
def test_generated_token_logprobs_and_top_k_equal_peft(llama, temperature):
    bb, adapters = llama
    k = 5
    jobs = [(0, 0, SamplingParams(max_new_tokens=6, temperature=temperature, seed=11, logprobs=k)),
            (1, 1, SamplingParams(max_new_tokens=9, temperature=1.0, seed=3)),  # a neighbour that asks for none
            (1, 2, SamplingParams(max_new_tokens=4, temperature=temperature, seed=5, logprobs=0))]
    seqs, events = _run(bb, adapters, jobs)
    assert all(e.logprob is None for e in events if e.seq is seqs[1])
    for (a, _, params), seq in zip(jobs, seqs):
        if params.logprobs is None:
            continue
        scored = [e.logprob for e in events if e.seq is seq]
        assert [s.token for s in scored] == seq.output_ids
        ref = _reference(bb, adapters[a], seq.prompt_ids + seq.output_ids, temperature)
        for i, s in enumerate(scored):
            row = ref[len(seq.prompt_ids) - 1 + i]  # the position that predicted output token i
            assert abs(s.logprob - float(row[s.token])) <= TOL
            assert len(s.top) == params.logprobs
            if s.top:
                values, order = row.topk(params.logprobs)
                assert [v for _, v in s.top] == pytest.approx(values.tolist(), abs=TOL)
                assert {t for t, _ in s.top} == set(order.tolist())
                assert s.top[0][1] >= s.top[-1][1]
            if temperature == 0:  # greedy picks the top token
                assert s.token == int(row.argmax())


def test_prompt_logprobs_equal_peft_and_the_first_is_none(llama):
    bb, adapters = llama
    params = SamplingParams(max_new_tokens=2, temperature=0.8, seed=1, prompt_logprobs=3)
    (seq,), _ = _run(bb, adapters, [(1, 1, params)])
    ref = _reference(bb, adapters[1], seq.prompt_ids, 0.8)
    assert len(seq.prompt_logprobs) == len(seq.prompt_ids) and seq.prompt_logprobs[0] is None
    for i, s in enumerate(seq.prompt_logprobs[1:], start=1):
        assert s.token == seq.prompt_ids[i]
        assert abs(s.logprob - float(ref[i - 1, s.token])) <= TOL
        assert [v for _, v in s.top] == pytest.approx(ref[i - 1].topk(3).values.tolist(), abs=TOL)


def test_prompt_logprobs_longer_than_one_chunk(llama, monkeypatch):
    """Scoring runs in chunks of positions; a prompt over several chunks scores the same as in one."""
    from ptserve.server.generation import logprobs as module

    bb, adapters = llama
    params = SamplingParams(max_new_tokens=1, temperature=0, prompt_logprobs=2)
    (whole,), _ = _run(bb, adapters, [(0, 1, params)])
    monkeypatch.setattr(module, "PROMPT_CHUNK", 3)
    (chunked,), _ = _run(bb, adapters, [(0, 1, params)])
    assert len(whole.prompt_ids) - 1 > 3  # two chunks at least
    for a, b in zip(whole.prompt_logprobs[1:], chunked.prompt_logprobs[1:]):
        assert a.token == b.token and abs(a.logprob - b.logprob) <= 1e-6


def test_an_eos_ends_the_text_and_carries_no_logprob(llama):
    bb, adapters = llama
    engine = GenerationEngine(bb, GenerationLimits(max_running=1, max_seq_tokens=128))
    resident = engine.make_resident(adapters[0], "t/a", 1)
    probe = engine.new_sequence(resident, PROMPTS[0], SamplingParams(max_new_tokens=1, temperature=0))
    engine.add(probe)
    engine.step()
    engine.eos_ids = frozenset({probe.output_ids[0]})  # the greedy first token now ends the sequence
    seq = engine.new_sequence(resident, PROMPTS[0], SamplingParams(max_new_tokens=5, temperature=0, logprobs=2))
    engine.add(seq)
    (event,) = engine.step()
    assert event.done and seq.finish_reason == "stop" and seq.output_ids == []
    assert event.logprob is None


def test_log_probs_stay_finite_at_extreme_temperatures():
    logits = torch.tensor([[3.0, 1.0, -2.0, 0.5], [1e30, -1e30, 0.0, 5.0]])
    for t in (1e-40, 1e-30, 1e-6, 1.0, 2.0):
        lp = log_probs(logits, torch.tensor([t, t]))
        assert torch.isfinite(lp).all()
        assert lp.exp().sum(dim=-1).tolist() == pytest.approx([1.0, 1.0], abs=1e-5)
    tiny = log_probs(logits, torch.tensor([1e-40, 1e-40]))  # (x - max) / T overflows to -inf: the floor
    assert tiny[0, 1] == LOGPROB_FLOOR and tiny[0, 0] == 0.0 and tiny[1, 0] == 0.0
    at_one = log_probs(logits[:1], torch.tensor([1.0]))
    assert at_one[0].exp().sum() == pytest.approx(1.0) and math.isclose(
        float(at_one[0, 0]), float(torch.log_softmax(logits[0], -1)[0]), abs_tol=1e-6)
