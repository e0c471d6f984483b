"""Next-token choice per row: greedy, or temperature / top-k / top-p sampling with the row's own generator.

Each row draws from its own seeded ``torch.Generator``, so a seeded request gives the same text whatever else
is in the batch.
"""
from __future__ import annotations

import torch

from ptserve.server.generation.sequence import Sequence


def sample_next(logits: torch.Tensor, seqs: list[Sequence]) -> list[int]:
    """logits: [B, vocab] float32 on the engine's device, one row per sequence. The tokens are chosen on that
    device (``sample_tokens``) and read back in one transfer: the step's only host sync."""
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
    scores = logits / p.temperature
    if p.top_k > 0:
        kth = torch.topk(scores, min(p.top_k, scores.numel())).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    if p.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        before = sorted_probs.cumsum(0) - sorted_probs  # mass of the tokens ranked above each token
        sorted_probs.masked_fill_(before >= p.top_p, 0)  # keep the smallest set whose mass reaches top_p
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=seq.generator_for(logits.device))
