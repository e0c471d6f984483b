"""A generation request's bookkeeping (``Sequence.append``: incremental text, stop strings, EOS, length)
with a real byte-level BPE tokenizer, and next-token choice (``sample_next``: greedy, top-k, top-p, seeds,
temperature)."""
from __future__ import annotations

import random

import pytest
import torch

from ptserve.server.backbone import load_backbone
from ptserve.server.generation.sampling import sample_next
from ptserve.server.generation.sequence import SamplingParams, Sequence
from ptserve.server.resident import make_resident
from tests.factories import make_adapter, save_tiny_decoder

P = 4  # virtual tokens of the adapter every sequence here runs under


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    """(tokenizer, resident adapter) of a tiny GPT-2; its tokenizer splits characters into bytes."""
    bb = load_backbone(str(save_tiny_decoder("gpt2", tmp_path_factory.mktemp("gpt2"))), device="cpu",
                       dtype="float32")
    resident = make_resident(make_adapter(bb.fingerprint, P, task="generate"), "t/a", 1, bb.fingerprint,
                             bb.device, bb.dtype)
    return bb.tokenizer, resident


def new_seq(gpt2, max_new_tokens=64, stop=(), max_positions=256, **params) -> Sequence:
    tok, resident = gpt2
    sp = SamplingParams(max_new_tokens=max_new_tokens, stop=tuple(stop), **params)
    eos = frozenset({tok.eos_token_id})
    return Sequence(resident, tok("hello")["input_ids"], sp, tok, eos, max_positions)


def feed(seq: Sequence, tokens: list[int]) -> list[str]:
    """Append tokens until the sequence finishes; returns the released deltas, checking after each token that
    what was released so far never has to be taken back (it is a prefix of the final text)."""
    deltas = []
    for t in tokens:
        deltas.append(seq.append(t))
        if seq.finish_reason is not None:
            break
    released = ""
    for d in deltas:
        released += d
        assert seq.text.startswith(released), f"released {released!r} but the text is {seq.text!r}"
    if seq.finish_reason is not None:  # a finished sequence has released everything
        assert released == seq.text
    return deltas


def ids(gpt2, text: str) -> list[int]:
    return gpt2[0](text)["input_ids"]


# --- Sequence.append ----------------------------------------------------------------------------------------
def test_plain_text_is_released_token_by_token(gpt2):
    seq = new_seq(gpt2)
    tokens = ids(gpt2, "hello world the fox")
    deltas = feed(seq, tokens)
    assert "".join(deltas) == "hello world the fox" == seq.text
    assert all(deltas)  # ASCII: nothing held back
    assert seq.finish_reason is None and seq.output_ids == tokens


def test_stop_string_cuts_text_and_finishes(gpt2):
    seq = new_seq(gpt2, stop=["<|stop|>"])
    deltas = feed(seq, ids(gpt2, "hello world <|stop|> and more"))
    assert seq.finish_reason == "stop"
    assert seq.text == "hello world "
    assert "".join(deltas) == "hello world "


def test_stop_string_split_across_tokens_is_never_partly_released(gpt2):
    stop = "<|stop|>"
    tokens = ids(gpt2, "hello world <|stop|> x")
    assert len(tokens) > 6  # the stop string spans several tokens
    seq = new_seq(gpt2, stop=[stop])
    released = ""
    for t in tokens:
        released += seq.append(t)
        if seq.finish_reason:
            break
        # nothing released may end with a non-empty prefix of the stop string that is later cut
        assert not any(released.endswith(stop[:k]) for k in range(1, len(stop)))
    assert seq.finish_reason == "stop" and released == seq.text == "hello world "


def test_prefix_of_stop_that_does_not_complete_is_released_later(gpt2):
    seq = new_seq(gpt2, stop=["<|stop|>"])
    deltas = feed(seq, ids(gpt2, "a <|sto and then"))
    assert seq.finish_reason is None
    assert seq.text == "a <|sto and then" == "".join(deltas)


def test_earliest_of_several_stop_strings_wins(gpt2):
    seq = new_seq(gpt2, stop=["fox", "world"])
    feed(seq, ids(gpt2, "hello world the fox"))
    assert seq.finish_reason == "stop" and seq.text == "hello "


def test_held_back_tail_is_released_at_length(gpt2):
    tokens = ids(gpt2, "hello world <|st")
    seq = new_seq(gpt2, max_new_tokens=len(tokens), stop=["<|stop|>"])
    deltas = feed(seq, tokens)
    assert seq.finish_reason == "length"
    assert deltas[-1].endswith("<|st") and "".join(deltas) == "hello world <|st"


def test_eos_finishes_with_stop_and_no_text(gpt2):
    tok = gpt2[0]
    seq = new_seq(gpt2, stop=["<|stop|>"])
    before = ids(gpt2, "hello wor")
    deltas = feed(seq, [*before, ids(gpt2, "<")[0], tok.eos_token_id, *ids(gpt2, "ld")])
    assert seq.finish_reason == "stop"
    assert seq.output_ids == [*before, ids(gpt2, "<")[0]]  # EOS is not part of the output
    assert seq.text == "hello wor<" == "".join(deltas)  # the held-back "<" comes out at the end
    assert tok.eos_token not in seq.text


def test_max_new_tokens_finishes_with_length(gpt2):
    tokens = ids(gpt2, "hello world the fox jumps")
    seq = new_seq(gpt2, max_new_tokens=3)
    feed(seq, tokens)
    assert seq.finish_reason == "length" and seq.output_ids == tokens[:3]


def test_max_positions_finishes_with_length(gpt2):
    prompt = len(ids(gpt2, "hello"))
    seq = new_seq(gpt2, max_new_tokens=100, max_positions=P + prompt + 2)
    feed(seq, ids(gpt2, "hello world the fox jumps"))
    assert seq.finish_reason == "length" and len(seq.output_ids) == 2


@pytest.mark.parametrize("text", ["é", "日本", "😀 and 日本 café", "naïve ünïcödé"])
def test_multibyte_characters_are_never_released_half_way(gpt2, text):
    tokens = ids(gpt2, text)
    assert len(tokens) > len(text)  # the byte-level tokenizer really splits characters
    seq = new_seq(gpt2)
    deltas = feed(seq, tokens)
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == text


def test_stop_string_starting_before_a_split_character(gpt2):
    """The held-back tail must be measured from the end of what may be released: with "<" then half an "é"
    decoded, neither may go out, since "<é" is a stop string."""
    tokens = ids(gpt2, "abc<é")
    assert gpt2[0].decode(tokens[:-1]).endswith("<\ufffd")
    seq = new_seq(gpt2, stop=["<é"])
    deltas = feed(seq, tokens)
    assert seq.finish_reason == "stop" and seq.text == "abc" == "".join(deltas)


def test_random_streams_release_exactly_the_final_text(gpt2):
    """Random token streams (ASCII and multi-byte text mixed) with stop strings taken from the text itself:
    released deltas always concatenate to the final text, which never contains a stop string."""
    tok = gpt2[0]
    pieces = ["the", " fox", " é", "日", "本", " <|", "end", "|>", " 😀", "!", " a", "b", "ü"]
    for seed in range(150):
        rng = random.Random(seed)
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(1, 12)))
        tokens = tok(text)["input_ids"]
        stops = []
        for _ in range(rng.randint(0, 2)):
            i = rng.randrange(len(text))
            stops.append(text[i: i + rng.randint(1, 4)])
        stops += rng.sample(["<|end|>", "日本", "xyz", " é"], rng.randint(0, 2))
        seq = new_seq(gpt2, max_new_tokens=rng.randint(1, len(tokens)), stop=stops)
        feed(seq, tokens)
        assert seq.finish_reason in ("stop", "length")
        assert not any(s in seq.text for s in stops), (seed, text, stops, seq.text)
        if seq.finish_reason == "stop":
            full = tok.decode(seq.output_ids)
            assert any(full.startswith(seq.text + s) for s in stops), (seed, full, seq.text, stops)


# --- sample_next --------------------------------------------------------------------------------------------
VOCAB = 8


def test_greedy_is_argmax(gpt2):
    logits = torch.randn(5, 50, generator=torch.Generator().manual_seed(0))
    seqs = [new_seq(gpt2, temperature=0) for _ in range(5)]
    assert sample_next(logits, seqs) == logits.argmax(-1).tolist()


def test_top_k_one_is_argmax(gpt2):
    logits = torch.randn(5, 50, generator=torch.Generator().manual_seed(1))
    seqs = [new_seq(gpt2, temperature=1.5, top_k=1, seed=i) for i in range(5)]
    for _ in range(20):
        assert sample_next(logits, seqs) == logits.argmax(-1).tolist()


def test_tiny_top_p_is_argmax(gpt2):
    logits = torch.randn(5, 50, generator=torch.Generator().manual_seed(2))
    seqs = [new_seq(gpt2, temperature=1.0, top_p=1e-6, seed=i) for i in range(5)]
    for _ in range(20):
        assert sample_next(logits, seqs) == logits.argmax(-1).tolist()


def test_top_k_draws_only_from_the_k_best(gpt2):
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.9, -1.0, 2.8, 0.5, 0.1]])
    seq = new_seq(gpt2, temperature=1.0, top_k=3, seed=0)
    drawn = {sample_next(logits, [seq])[0] for _ in range(300)}
    assert drawn == {1, 3, 5}


def test_top_p_keeps_the_smallest_set_reaching_p(gpt2):
    probs = torch.tensor([0.05, 0.5, 0.05, 0.3, 0.1])
    seq = new_seq(gpt2, temperature=1.0, top_p=0.6, seed=0)
    n = 4000
    counts = torch.bincount(torch.tensor([sample_next(probs.log()[None], [seq])[0] for _ in range(n)]),
                            minlength=5).double()
    assert set(counts.nonzero().flatten().tolist()) == {1, 3}  # 0.5 alone < 0.6; 0.5 + 0.3 reaches it
    assert chi_square(counts, torch.tensor([0, 0.5 / 0.8, 0, 0.3 / 0.8, 0])) < CHI2_CRIT


def test_same_seed_same_draws_other_seed_other_draws(gpt2):
    logits = torch.randn(1, 200, generator=torch.Generator().manual_seed(3))

    def draws(seed):
        seq = new_seq(gpt2, temperature=1.0, seed=seed)
        return [sample_next(logits, [seq])[0] for _ in range(40)]

    assert draws(7) == draws(7)
    assert draws(7) != draws(8)


def test_a_rows_draws_do_not_depend_on_its_batch_company(gpt2):
    logits = torch.randn(4, 100, generator=torch.Generator().manual_seed(4))
    alone_seq = new_seq(gpt2, temperature=0.8, top_p=0.9, seed=11)
    alone = [sample_next(logits[2:3], [alone_seq])[0] for _ in range(30)]
    crowd_seqs = [new_seq(gpt2, temperature=1.0, seed=1), new_seq(gpt2, temperature=0),
                  new_seq(gpt2, temperature=0.8, top_p=0.9, seed=11), new_seq(gpt2, temperature=2.0, top_k=5)]
    crowd = [sample_next(logits, crowd_seqs)[2] for _ in range(30)]
    assert crowd == alone


CHI2_CRIT = 30.0  # chi-square with <= 7 degrees of freedom: P(X > 30) < 1e-4 under the null


def chi_square(counts: torch.Tensor, expected_probs: torch.Tensor) -> float:
    keep = expected_probs > 0
    expected = expected_probs[keep].double() * counts.sum()
    return float(((counts[keep] - expected) ** 2 / expected).sum())


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_temperature_scales_the_distribution(gpt2, temperature):
    """Empirical frequencies follow softmax(logits / T) and not the distribution of another temperature."""
    logits = torch.tensor([[1.0, 0.5, 0.0, -0.5, 2.0, -1.0, 0.2, 1.5]])
    seq = new_seq(gpt2, temperature=temperature, seed=42)
    n = 6000
    counts = torch.bincount(torch.tensor([sample_next(logits, [seq])[0] for _ in range(n)]),
                            minlength=VOCAB).double()
    assert chi_square(counts, torch.softmax(logits[0] / temperature, -1)) < CHI2_CRIT
    for other in {0.5, 1.0, 2.0} - {temperature}:
        assert chi_square(counts, torch.softmax(logits[0] / other, -1)) > 10 * CHI2_CRIT
