"""Log-probabilities of the tokens a sequence sees: of each generated token (and its top-k alternatives) at the
step that chose it, and of each prompt token given the tokens before it (OpenAI ``echo`` + ``logprobs``).

The distribution is the one the engine samples from, *after temperature* (OpenAI's definition) and before any
top-k / top-p cut: ``log_softmax(logits / T)`` in float32, with ``T`` the temperature sampling uses (the request's,
raised to ``sampling.MIN_TEMPERATURE`` when below it), or ``T = 1`` for greedy requests (``temperature = 0``, where
there is nothing to divide by). A value too small for float32
(``-inf``) is reported as ``LOGPROB_FLOOR`` so that answers stay valid JSON.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ptserve.server.generation.sampling import MIN_TEMPERATURE

LOGPROB_FLOOR = -9999.0  # what -inf is reported as (vLLM reports the same)
PROMPT_CHUNK = 64  # prompt positions scored per LM-head call: bounds the [chunk, vocab] float32 buffer


@dataclass(frozen=True)
class TokenLogprob:
    token: int
    logprob: float
    top: tuple[tuple[int, float], ...]  # the k most likely tokens and their logprobs, most likely first


def temperature_of(temperature: float) -> float:
    """The temperature a request's logprobs are computed at: the one it samples at, or 1 for greedy."""
    return max(temperature, MIN_TEMPERATURE) if temperature > 0 else 1.0


def log_probs(logits: torch.Tensor, temperatures: torch.Tensor) -> torch.Tensor:
    """logits [N, vocab], temperatures [N] -> log_softmax(logits / T) [N, vocab] float32, finite.

    The row maximum is subtracted before dividing, so a tiny temperature gives -inf (then the floor) for the
    others instead of inf - inf = NaN; log_softmax is shift-invariant, so the values are unchanged."""
    x = logits.float()
    x = (x - x.max(dim=-1, keepdim=True).values) / temperatures.float()[:, None]
    return torch.nan_to_num(torch.log_softmax(x, dim=-1), nan=LOGPROB_FLOOR, neginf=LOGPROB_FLOOR)


def score(lp: torch.Tensor, tokens: list[int], ks: list[int]) -> list[TokenLogprob]:
    """lp [N, vocab] log-probabilities, tokens [N] the token scored per row, ks [N] top alternatives per row."""
    chosen = lp.gather(1, torch.tensor(tokens, dtype=torch.long)[:, None])[:, 0].tolist()
    k_max = min(max(ks, default=0), lp.shape[1])
    top_v, top_i = (lp.topk(k_max, dim=-1) if k_max else (lp[:, :0], lp[:, :0].long()))
    top_v, top_i = top_v.tolist(), top_i.tolist()
    return [
        TokenLogprob(tok, value, tuple(zip(top_i[r][:k], top_v[r][:k])))
        for r, (tok, value, k) in enumerate(zip(tokens, chosen, ks))
    ]


def prompt_logprobs(
    logits_of, prompt_ids: list[int], k: int, temperature: float
) -> list[TokenLogprob | None]:
    """One entry per prompt token; the first is None (nothing comes before it).

    ``logits_of(start, stop)`` -> logits [stop - start, vocab] at prompt positions [start, stop): position i
    predicts token i + 1. Scored in chunks so a long prompt never holds a [T, vocab] buffer."""
    out: list[TokenLogprob | None] = [None]
    t = torch.tensor([temperature_of(temperature)])
    for start in range(0, len(prompt_ids) - 1, PROMPT_CHUNK):
        stop = min(start + PROMPT_CHUNK, len(prompt_ids) - 1)
        lp = log_probs(logits_of(start, stop), t.expand(stop - start))
        out += score(lp, prompt_ids[start + 1: stop + 1], [k] * (stop - start))
    return out
