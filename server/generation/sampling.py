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


def finite_rows(logits: torch.Tensor) -> list[bool]:
    """logits: [B, vocab]. A row can be sampled when it has no NaN, no +inf, and some finite score."""
    ok = logits.isfinite().all(dim=-1)  # [B]; one pass over the logits in the common case
    if not ok.all():  # -inf entries are allowed (masked tokens) as long as something is finite
        ok = ~(logits.isnan().any(dim=-1) | logits.isposinf().any(dim=-1) | logits.isneginf().all(dim=-1))
    return ok.tolist()


def sample_next(logits: torch.Tensor, seqs: list[Sequence]) -> list[int]:
    """logits: [B, vocab] float32 on cpu, one row per sequence, each row finite (see ``finite_rows``)."""
    out = logits.argmax(dim=-1).tolist()
    for i, seq in enumerate(seqs):
        if not seq.params.greedy:
            out[i] = _sample(logits[i], seq)
    return out


def _sample(logits: torch.Tensor, seq: Sequence) -> int:
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
        sorted_probs[drop] = 0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=seq.generator))
