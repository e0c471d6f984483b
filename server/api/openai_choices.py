"""The choices of one OpenAI request: their seeds, and their step events turned into per-choice deltas (the text
each event releases and the logprobs of the tokens behind it), in the two logprobs formats OpenAI defines.

Streaming and plain answers are built from the same deltas, so they agree by construction.
"""
from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass, field

from ptserve.server.api.routes_generate import Generation
from ptserve.server.generation.engine import StepEvent
from ptserve.server.generation.logprobs import TokenLogprob


def choice_seed(seed: int | None, j: int) -> int | None:
    """The seed of choice ``j`` of a prompt: the request's own for j = 0 (so n = 1 samples exactly what
    ``/v1/generate`` does with that seed), else the first 63 bits of sha256("ptserve-choice:{seed}:{j}")."""
    if seed is None or j == 0:
        return seed
    digest = hashlib.sha256(f"ptserve-choice:{seed}:{j}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


@dataclass(frozen=True)
class Scored:
    token: int
    logprob: TokenLogprob | None  # None: a prompt's first token (nothing predicts it)
    offset: int  # characters of the choice's text before this token's


@dataclass(frozen=True)
class ChoiceDelta:
    index: int
    text: str
    scored: list[Scored]
    finish_reason: str | None = None  # set on a choice's last delta


@dataclass
class _Choice:
    index: int
    released: int = 0  # characters sent so far
    pending: list[Scored] = field(default_factory=list)  # tokens whose text has not started being sent


class ChoiceTracker:
    """Feeds on a request's events; a token's logprob goes out with the delta that releases the start of its
    text (text held back as a possible stop string, or half a character, holds its tokens back too). When a stop
    string ends a choice, the tokens that made only the stop string are dropped with it."""

    def __init__(self, gen: Generation):
        self._choices = {seq.id: _Choice(k) for k, seq in enumerate(gen.seqs)}

    def feed(self, event: StepEvent) -> ChoiceDelta | None:
        choice, seq = self._choices[event.seq.id], event.seq
        if event.logprob is not None:
            choice.pending.append(Scored(event.token, event.logprob, event.text_offset))
        if not (event.text or event.done):
            return None
        choice.released += len(event.text)
        if event.done and seq.matched_stop is None:
            out, choice.pending = choice.pending, []
        else:
            cut = sum(1 for s in choice.pending if s.offset < choice.released)
            out, choice.pending = choice.pending[:cut], ([] if event.done else choice.pending[cut:])
        return ChoiceDelta(choice.index, event.text, out, seq.finish_reason if event.done else None)


@dataclass
class ChoiceResult:
    index: int
    text: str = ""
    scored: list[Scored] = field(default_factory=list)
    finish_reason: str | None = None


def collect(gen: Generation, events: list[StepEvent]) -> list[ChoiceResult]:
    """Every choice's whole text and logprobs (a plain, non-streamed answer)."""
    tracker, results = ChoiceTracker(gen), [ChoiceResult(k) for k in range(len(gen.seqs))]
    for event in events:
        delta = tracker.feed(event)
        if delta is not None:
            r = results[delta.index]
            r.text += delta.text
            r.scored += delta.scored
            r.finish_reason = delta.finish_reason or r.finish_reason
    return results


# --- prompt tokens (echo) ----------------------------------------------------------------------------------------
def prompt_scored(tokenizer, ids: list[int], logprobs: list[TokenLogprob | None]) -> list[Scored]:
    """A prompt's tokens with their logprobs and character offsets in the prompt's decoded text (each token's
    share found by decoding it after a few tokens of context, so a character split over tokens counts once)."""
    out, at = [], 0
    for i, (token, lp) in enumerate(zip(ids, logprobs)):
        out.append(Scored(token, lp, at))
        lo = max(0, i - 4)
        before = tokenizer.decode(ids[lo:i], skip_special_tokens=True)
        at += max(0, len(tokenizer.decode(ids[lo:i + 1], skip_special_tokens=True)) - len(before))
    return out


# --- the two OpenAI logprobs formats ------------------------------------------------------------------------------
@functools.lru_cache(maxsize=1 << 16)
def token_text(tokenizer, token: int) -> str:
    """A token's text on its own (a byte-level piece of a character decodes to U+FFFD, as in vLLM)."""
    return tokenizer.decode([token])


def chat_logprobs(tokenizer, scored: list[Scored]) -> dict:
    """OpenAI chat: ``{"content": [{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}]}``."""
    def entry(token: int, logprob: float) -> dict:
        text = token_text(tokenizer, token)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    content = [{**entry(s.token, s.logprob.logprob), "top_logprobs": [entry(t, v) for t, v in s.logprob.top]}
               for s in scored]
    return {"content": content, "refusal": None}


def completion_logprobs(tokenizer, scored: list[Scored]) -> dict:
    """OpenAI completions: parallel lists; ``top_logprobs[i]`` maps the top tokens' texts (and the chosen
    one's, as OpenAI does) to their logprobs."""
    tokens, values, tops, offsets = [], [], [], []
    for s in scored:
        tokens.append(token_text(tokenizer, s.token))
        offsets.append(s.offset)
        if s.logprob is None:
            values.append(None)
            tops.append(None)
            continue
        values.append(s.logprob.logprob)
        top = {token_text(tokenizer, t): v for t, v in s.logprob.top}
        top.setdefault(tokens[-1], s.logprob.logprob)
        tops.append(top)
    return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}
