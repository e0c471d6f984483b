"""The API's stage for generation: tokenise against the adapter's metadata, ask the engine for tokens, and make
the text here, where the request is: incremental detokenisation, stop strings and finish reasons, as vLLM v1's
front-end does (its OutputProcessor). Each choice has a ``Sequence`` on this side that mirrors the engine's: the
same prompt, the same tokens fed through the same ``Sequence.append`` (so the same text, finish reason and token
counts as when the engine made the text itself), with the stop strings, which the engine never sees. A stop
string that matches ends its choice here and cancels it in the engine; tokens the engine made for it meanwhile
are dropped. The engine ends a choice by itself only at EOS or its length, which the mirror sees at the same
token.
"""
from __future__ import annotations

import logging
from dataclasses import replace
from typing import TYPE_CHECKING, AsyncIterator

from ptserve.adapters_store.errors import GenerationFailed, WrongTask
from ptserve.adapters_store.ids import AdapterId
from ptserve.client.wire.errors import AdapterChanged
from ptserve.server.engine_core import messages as m
from ptserve.server.engine_core.client import AdapterMeta, EngineClient, TokenStream, VersionChanged
from ptserve.server.generation.engine import StepEvent, check_fits, tokenize_prompt
from ptserve.server.generation.sequence import SamplingParams, Sequence

if TYPE_CHECKING:
    from ptserve.server.api.routes_generate import Generation

log = logging.getLogger(__name__)


async def generate_events(
    client: EngineClient, tokenizer, adapter_id: AdapterId, prompts: list[str | list[int]],
    params: list[SamplingParams], gen: Generation, fill: bool,
) -> AsyncIterator[StepEvent]:
    """Events of every choice (``params[k]`` continues ``prompts[k // gen.n]``); ``gen.seqs`` are the mirrors.
    Leaving the iteration early cancels what the engine still generates for the request."""
    stream = await _open(client, tokenizer, adapter_id, prompts, params, gen, fill)
    live = set(range(len(gen.seqs)))
    try:
        async for msg in stream:
            if isinstance(msg, m.Finished):
                if live:  # the engine ended a choice without the token that ends it here: a bug, said plainly
                    raise GenerationFailed(f"the engine ended {len(live)} choices early ({msg.finish_reasons})")
                return
            for t in msg.tokens:
                if t.choice not in live:  # made after its stop string matched, before the engine heard
                    continue
                seq = gen.seqs[t.choice]
                event = _feed(seq, t, msg.step)
                if event.done:
                    live.discard(t.choice)
                    if seq.matched_stop is not None and live:  # the engine would go on: tell it
                        stream.cancel([t.choice])
                yield event
            if not live:
                return
    finally:
        await stream.aclose()


async def _open(
    client: EngineClient, tokenizer, adapter_id: AdapterId, prompts: list[str | list[int]],
    params: list[SamplingParams], gen: Generation, fill: bool,
) -> TokenStream:
    """Metadata, tokenise, queue; once more with fresh metadata when the adapter's version changed in between."""
    for attempt in range(2):
        meta = await client.adapter_meta(adapter_id)
        if meta.task != "generate" or meta.generation is None:
            raise WrongTask(f"adapter {adapter_id} is a {meta.task!r} adapter; use /v1/classify")
        seqs = mirrors(meta, tokenizer, prompts, params, gen.n, fill)
        try:
            stream = await client.generate(adapter_id, meta.version, [s.prompt_ids for s in seqs],
                                           [s.params for s in seqs], adapter_id.tenant)
        except VersionChanged as exc:
            if attempt:
                raise AdapterChanged(f"{exc}; it changed again while the request was served, retry") from None
            continue
        gen.adapter_id, gen.version, gen.seqs = meta.id, meta.version, seqs
        return stream
    raise AssertionError("unreachable")


def mirrors(meta: AdapterMeta, tokenizer, prompts: list[str | list[int]], params: list[SamplingParams], n: int,
            fill: bool) -> list[Sequence]:
    """One mirror sequence per choice; ``InputTooLong`` (as the engine would answer) when one does not fit. With
    ``fill``, ``max_new_tokens`` is only a bound: each choice gets as many as fit beside its prompt and prefix."""
    room, p = meta.generation, meta.num_virtual_tokens
    seqs = []
    for i, prompt in enumerate(prompts):
        ids = tokenize_prompt(tokenizer, prompt, room.vocab_size, room.eos_ids)
        for sp in params[i * n: (i + 1) * n]:
            if fill:  # one at least: a prompt with no room left is refused as too long
                sp = replace(sp, max_new_tokens=max(1, min(sp.max_new_tokens, room.room - len(ids))))
            check_fits(p, len(ids), sp.max_new_tokens, room.room, room.prefix_cap)
            seqs.append(Sequence(meta, ids, sp, tokenizer, room.eos_ids, max_positions=p + room.room))
    return seqs


def _feed(seq: Sequence, t: m.Token, step: int) -> StepEvent:
    """One engine token into its choice's mirror: the text it releases, and whether it ended the choice."""
    if not seq.first_step:
        seq.first_step = step
    if t.prompt_logprobs is not None:
        seq.prompt_logprobs = t.prompt_logprobs
    offset = len(seq.text)
    try:
        text = seq.append(t.token)
    except Exception as exc:  # detokenising failed: this request's, nothing else's
        log.error("detokenising sequence %d (%s) failed", seq.id, seq.adapter.id, exc_info=exc)
        raise GenerationFailed(f"generating this sequence failed ({type(exc).__name__})") from None
    done = seq.finish_reason is not None
    if done:
        seq.last_step = step
    return StepEvent(seq, text, t.token, done, logprob=t.logprob, text_offset=offset)
