"""``server/api/openai_choices.py`` on real sequences (the tiny decoder's tokenizer, ``Sequence.append`` doing the
detokenising and stop matching): which tokens' logprobs go out with which text, per-choice seeds, prompt offsets."""
from __future__ import annotations

import pytest

from ptserve.server.api.openai_choices import (
    ChoiceTracker, choice_seed, collect, completion_logprobs, prompt_scored, token_text,
)
from ptserve.server.api.routes_generate import Generation
from ptserve.server.generation.engine import StepEvent
from ptserve.server.generation.logprobs import TokenLogprob
from ptserve.server.generation.sequence import SamplingParams, Sequence
from tests.factories import make_adapter, save_tiny_decoder

TEXT = "the quick brown fox jumps over the lazy dog"


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    from ptserve.server.backbone import load_backbone

    return load_backbone(str(save_tiny_decoder("gpt2", tmp_path_factory.mktemp("gpt2"))), device="cpu",
                         dtype="float32")


@pytest.fixture(scope="module")
def tokenizer(gpt2):
    return gpt2.tokenizer


@pytest.fixture(scope="module")
def resident(gpt2):
    from ptserve.server.resident import make_resident

    adapter = make_adapter(gpt2.fingerprint, 2, task="generate")
    return make_resident(adapter, "t/a", 1, gpt2.fingerprint, gpt2.device, gpt2.dtype)


def _play(seqs: list[Sequence], token_lists: list[list[int]]) -> list[StepEvent]:
    """The events the engine would emit for these tokens, round robin over the sequences, each token scored."""
    events, steps = [], max(len(t) for t in token_lists)
    for step in range(steps):
        for seq, tokens in zip(seqs, token_lists):
            if step >= len(tokens) or seq.finish_reason is not None:
                continue
            offset = len(seq.text)
            text = seq.append(tokens[step])
            events.append(StepEvent(seq, text, tokens[step], seq.finish_reason is not None,
                                    TokenLogprob(tokens[step], -float(step), ()), offset))
    return events


def _seq(resident, tokenizer, stop=(), max_new=64) -> Sequence:
    return Sequence(resident, [0], SamplingParams(max_new_tokens=max_new, stop=stop), tokenizer, frozenset(),
                    max_positions=1000)


@pytest.mark.parametrize("stop", [(), ("brown",), ("x jum",), ("lazy dog",), ("o",)])
def test_streamed_deltas_carry_the_tokens_behind_their_text_and_drop_those_of_a_stop_string(
        resident, tokenizer, stop):
    ids = tokenizer(TEXT)["input_ids"]
    seq = _seq(resident, tokenizer, stop)
    gen = Generation("t/a", 1, seqs=[seq])
    events = _play([seq], [ids])
    tracker = ChoiceTracker(gen)
    deltas = [d for d in map(tracker.feed, events) if d is not None]
    expected_text = TEXT[: TEXT.index(stop[0])] if stop else TEXT
    assert "".join(d.text for d in deltas) == seq.text == expected_text
    sent = [s for d in deltas for s in d.scored]
    assert [s.token for s in sent] == seq.output_ids[: len(sent)]
    # the tokens whose text starts inside the answer, and only those
    assert all(s.offset < len(expected_text) for s in sent)
    assert len(sent) == sum(1 for e in events if e.text_offset < len(expected_text))
    assert "".join(token_text(tokenizer, s.token) for s in sent).startswith(expected_text)
    sent_so_far = 0
    for d in deltas:  # a token goes out only once the start of its text has
        sent_so_far += len(d.text)
        assert all(s.offset < sent_so_far for s in d.scored)
    (whole,) = collect(gen, events)
    assert (whole.text, whole.scored, whole.finish_reason) == (expected_text, sent, seq.finish_reason)


def test_interleaved_choices_are_kept_apart(resident, tokenizer):
    a, b = (tokenizer(t)["input_ids"] for t in ("hello world", "the lazy dog jumps"))
    seqs = [_seq(resident, tokenizer, max_new=len(a)), _seq(resident, tokenizer, ("dog",))]
    gen = Generation("t/a", 1, n=2, seqs=seqs)
    results = collect(gen, _play(seqs, [a, b]))
    assert [(r.index, r.text, r.finish_reason) for r in results] == [
        (0, "hello world", "length"), (1, "the lazy ", "stop")]
    assert [s.token for s in results[0].scored] == a


def test_choice_seeds_are_reproducible_distinct_and_keep_the_first():
    assert choice_seed(None, 3) is None
    assert choice_seed(42, 0) == 42
    seeds = [choice_seed(42, j) for j in range(64)]
    assert seeds == [choice_seed(42, j) for j in range(64)]
    assert len(set(seeds)) == 64 and all(0 <= s < 2**63 for s in seeds)
    assert choice_seed(43, 1) != choice_seed(42, 1)


@pytest.mark.parametrize("text", [TEXT, "héllo wörld ünïcode", "a  b\n\tc"])
def test_prompt_offsets_point_into_the_decoded_prompt(tokenizer, text):
    ids = tokenizer(text)["input_ids"]
    scored = prompt_scored(tokenizer, ids, [None] * len(ids))
    offsets = [s.offset for s in scored]
    assert offsets[0] == 0 and offsets == sorted(offsets) and offsets[-1] < len(text)
    for s, nxt in zip(scored, offsets[1:] + [len(text)]):
        piece = token_text(tokenizer, s.token)
        if "\ufffd" not in piece:  # a whole-character token sits exactly where its text is
            assert text[s.offset: nxt] == piece


def test_completion_logprobs_format(tokenizer):
    ids = tokenizer("the fox")["input_ids"]
    scored = prompt_scored(tokenizer, ids, [None, TokenLogprob(ids[1], -1.5, ((ids[1], -1.5), (7, -2.0)))])
    out = completion_logprobs(tokenizer, scored)
    assert out["tokens"] == [tokenizer.decode([t]) for t in ids]
    assert out["token_logprobs"] == [None, -1.5] and out["top_logprobs"][0] is None
    assert out["top_logprobs"][1] == {tokenizer.decode([ids[1]]): -1.5, tokenizer.decode([7]): -2.0}
    assert out["text_offset"] == [s.offset for s in scored]
