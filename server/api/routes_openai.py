"""OpenAI-compatible ``POST /v1/completions``: ``model`` is the adapter id, so the ``openai`` Python client works
unchanged (``base_url=http://host:port/v1``). Prompt lists and ``n`` make several choices, generated together in
the continuous batch; ``logprobs``, ``echo`` and ``stream_options.include_usage`` follow OpenAI's format.

``choice_params`` and ``stream_sse`` are shared with ``/v1/chat/completions``: the sampling settings of a
prompt's choices, and the loop that turns a request's events into server-sent chunks (each route gives only its
own chunk format); plain answers come from ``openai_choices.collect``.
"""
from __future__ import annotations

import json
import secrets
import time
from typing import AsyncIterator, Callable, Iterable

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from ptserve.server.api.deps import Principal, ReadyDep
from ptserve.server.api.json_body import JSONBodyRoute
from ptserve.server.api.openai_choices import (
    ChoiceDelta, ChoiceTracker, Scored, choice_seed, collect, completion_logprobs, prompt_scored,
)
from ptserve.server.api.routes_generate import (
    ERRORS, SSE_HEADERS, Generation, _first, run_generation, sse_error, until_disconnect,
)
from ptserve.server.api.schemas_openai import Completion, CompletionRequest
from ptserve.server.generation.engine import StepEvent
from ptserve.server.generation.sequence import SamplingParams

router = APIRouter(tags=["openai"], route_class=JSONBodyRoute)  # bodies read by untrusted_json
STREAM_RESPONSES = {**ERRORS, 200: {"content": {"text/event-stream": {}}}}


def choice_params(req, max_new_tokens: int, logprobs: int | None, prompt_logprobs: int | None = None,
                  ) -> list[SamplingParams]:
    """One ``SamplingParams`` per choice of one prompt (the seeds differ, see ``choice_seed``)."""
    return [SamplingParams(
        max_new_tokens=max_new_tokens, temperature=1.0 if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p, seed=choice_seed(req.seed, j), stop=tuple(req.stop or ()),
        logprobs=logprobs, prompt_logprobs=prompt_logprobs,
    ) for j in range(req.n or 1)]


@router.post("/v1/completions", response_model=Completion, responses=STREAM_RESPONSES)
async def completions(req: CompletionRequest, request: Request, principal: Principal, state: ReadyDep):
    cid, created = f"cmpl-{secrets.token_hex(12)}", int(time.time())
    prompts, n, tok = req.prompts(), req.n or 1, state.backbone.tokenizer
    scores = req.logprobs is not None
    params = choice_params(req, req.max_tokens or 16, req.logprobs, req.logprobs if req.echo else None)
    gen = Generation(req.model, 0, n=n)
    events = run_generation(state, principal, req.model, prompts, params * len(prompts), gen)

    def echoed(k: int) -> tuple[str, list[Scored]]:
        """Choice k's prompt text to prepend, and its tokens' scores (with logprobs), when echo is asked."""
        if not req.echo:
            return "", []
        prompt, seq = prompts[k // n], gen.seqs[k]
        text = prompt if isinstance(prompt, str) else tok.decode(prompt, skip_special_tokens=True)
        return text, prompt_scored(tok, seq.prompt_ids, seq.prompt_logprobs) if scores else []

    def choice(k: int, text: str, scored: list[Scored], finish: str | None) -> dict:
        lp = completion_logprobs(tok, scored) if scores else None
        return {"index": k, "text": text, "logprobs": lp, "finish_reason": finish}

    def body(choices: list[dict], **usage) -> dict:
        return {"id": cid, "object": "text_completion", "created": created, "model": gen.adapter_id,
                "choices": choices, **usage}

    if req.stream:
        first = await _first(events)  # errors before the first event answer as plain 4xx/5xx
        chunk_usage = {"usage": None} if req.include_usage else {}  # OpenAI: null on all chunks but the last
        prompt_len: dict[int, int] = {}  # choices whose echo went out: their prompt text's length

        def on_delta(d: ChoiceDelta) -> Iterable[dict]:
            if req.echo and d.index not in prompt_len:  # its prompt was scored at its prefill, before this
                text, scored = echoed(d.index)
                prompt_len[d.index] = len(text)
                yield body([choice(d.index, text, scored, None)], **chunk_usage)
            scored = shifted(d.scored, prompt_len.get(d.index, 0))
            yield body([choice(d.index, d.text, scored, d.finish_reason)], **chunk_usage)

        usage = (lambda: body([], usage=gen.usage.model_dump())) if req.include_usage else None
        return stream_sse(first, events, gen, on_delta, usage)
    collected = await until_disconnect(request, events)  # ClientDisconnected (499) if the client went away
    choices = []
    for r in collect(gen, collected):
        text, scored = echoed(r.index)
        choices.append(choice(r.index, text + r.text, scored + shifted(r.scored, len(text)), r.finish_reason))
    return body(choices, usage=gen.usage.model_dump())


def shifted(scored: list[Scored], by: int) -> list[Scored]:
    """Offsets into a text that has ``by`` characters (the echoed prompt) in front."""
    return [Scored(s.token, s.logprob, s.offset + by) for s in scored] if by else scored


def stream_sse(
    first: StepEvent | None, events: AsyncIterator[StepEvent], gen: Generation,
    on_delta: Callable[[ChoiceDelta], Iterable[dict]], usage_chunk: Callable[[], dict] | None,
) -> StreamingResponse:
    """Server-sent chunks: the route's chunks for each choice delta, the usage chunk when asked, ``[DONE]``."""
    async def lines() -> AsyncIterator[str]:
        tracker = ChoiceTracker(gen)
        try:
            pending = [first] if first is not None else []
            while True:
                event = pending.pop() if pending else await anext(events, None)
                if event is None:
                    break
                delta = tracker.feed(event)
                for chunk in on_delta(delta) if delta is not None else ():
                    yield _sse(chunk)
            if usage_chunk is not None:
                yield _sse(usage_chunk())
            yield "data: [DONE]\n\n"
        except Exception as exc:  # a failure after the first chunk: one error event (the openai client raises it)
            yield sse_error(exc)
        finally:
            await events.aclose()

    return StreamingResponse(lines(), media_type="text/event-stream", headers=SSE_HEADERS)


def _sse(chunk: dict) -> str:
    return f"data: {json.dumps(chunk)}\n\n"
