"""Next-token choice per row: greedy, or temperature / top-k / top-p sampling with the row's own generator.

Each row draws from its own seeded ``torch.Generator``, so a seeded request gives the same text whatever else
is in the batch. Sampling is total over the parameters the API admits: scores are float32 with their maximum
subtracted before the temperature divides them (no overflow, no NaN: the best token's score is exactly 0),
temperatures below ``MIN_TEMPERATURE`` count as ``MIN_TEMPERATURE``, top-k is capped at the vocabulary and top-p
always keeps the most likely token (a top_p that rounds to 0 in float32 still leaves one token to draw).
Rows whose logits are not finite cannot be sampled at all; ``finite_rows`` finds them so the engine can fail
those sequences alone.
"""
from __future__ import annotations

import torch

from ptserve.server.generation.sequence import Sequence

MIN_TEMPERATURE = 1e-2  # smaller temperatures (but not 0 = greedy) are clamped to this (vLLM does the same)


def finite_mask(logits: torch.Tensor) -> torch.Tensor:
    """logits: [B, vocab] -> [B] bool on their device, without a host sync. A row can be sampled when it has no
    NaN, no +inf, and some finite score (-inf entries are masked tokens)."""
    return ~(logits.isnan().any(dim=-1) | logits.isposinf().any(dim=-1) | logits.isneginf().all(dim=-1))


def finite_rows(logits: torch.Tensor) -> list[bool]:
    """``finite_mask`` read back."""
    return finite_mask(logits).tolist()


def sample_next(logits: torch.Tensor, seqs: list[Sequence]) -> list[int]:
    """logits: [B, vocab] float32 on the engine's device, one row per sequence, each row finite (see
    ``finite_rows``). The tokens are chosen on that device (``sample_tokens``) and read back in one transfer."""
    return sample_tokens(logits, seqs).tolist()


def sample_tokens(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    """The next token of every row, [B] on the logits' device, without a host sync."""
    tokens = logits.argmax(dim=-1)  # [B]
    for i, seq in enumerate(seqs):
        if not seq.params.greedy:
            tokens[i: i + 1] = _sample(logits[i], seq)
    return tokens


def _sample(logits: torch.Tensor, seq: Sequence) -> torch.Tensor:
    """One token id, [1] on the logits' device, drawn with the sequence's own generator for that device."""
    p = seq.params
    scores = logits.float()
    scores = (scores - scores.max()) / max(p.temperature, MIN_TEMPERATURE)  # [vocab], <= 0, the best is 0
    if p.top_k > 0:
        kth = torch.topk(scores, min(p.top_k, scores.numel())).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    if p.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        before = sorted_probs.cumsum(0) - sorted_probs  # mass of the tokens ranked above each token
        drop = before >= p.top_p  # keep the smallest set whose mass reaches top_p ...
        drop[0] = False  # ... and never less than the most likely token
        sorted_probs.masked_fill_(drop, 0)  # (a boolean index would sync with the device)
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=seq.generator_for(logits.device))
