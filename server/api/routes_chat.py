"""OpenAI-compatible ``POST /v1/chat/completions`` on decoder backbones: ``model`` is the adapter id, ``messages``
are rendered by the chat template (``ptserve.server.chat_template``) and continued under the adapter's prefix;
streamed as ``chat.completion.chunk`` events (each choice's role first, then its content, then its finish)."""
from __future__ import annotations

import secrets
import time
from typing import Iterable

from fastapi import APIRouter, Request

from ptserve.adapters_store.errors import WrongTask
from ptserve.server.api.json_body import JSONBodyRoute
from ptserve.server.api.deps import Principal, ReadyDep
from ptserve.server.api.openai_choices import ChoiceDelta, chat_logprobs, collect
from ptserve.server.api.routes_generate import Generation, _first, run_generation, until_disconnect
from ptserve.server.api.routes_openai import STREAM_RESPONSES, choice_params, stream_sse
from ptserve.server.api.schemas_openai import ChatCompletion, ChatCompletionRequest

router = APIRouter(tags=["openai"], route_class=JSONBodyRoute)


@router.post("/v1/chat/completions", response_model=ChatCompletion, responses=STREAM_RESPONSES)
async def chat_completions(req: ChatCompletionRequest, request: Request, principal: Principal, state: ReadyDep):
    if state.chat is None:
        raise WrongTask(f"backbone {state.settings.backbone!r} is an encoder: it serves /v1/classify, not chat")
    prompt = state.chat.render([m.for_template() for m in req.messages])
    cid, created, tok = f"chatcmpl-{secrets.token_hex(12)}", int(time.time()), state.backbone.tokenizer
    k = (req.top_logprobs or 0) if req.logprobs else None
    gen = Generation(req.model, 0, n=req.n or 1)
    asked = req.max_new_tokens  # None: as many as fit (OpenAI's default), up to PTSERVE_MAX_NEW_TOKENS_LIMIT
    params = choice_params(req, asked or state.settings.max_new_tokens_limit, k)
    events = run_generation(state, principal, req.model, [prompt], params, gen, fill=asked is None)

    def logprobs(scored) -> dict | None:
        return chat_logprobs(tok, scored) if k is not None else None

    if req.stream:
        first = await _first(events)  # errors before the first event answer as plain 4xx/5xx
        chunk_usage = {"usage": None} if req.include_usage else {}  # OpenAI: null on all chunks but the last
        started: set[int] = set()

        def chunk(choices: list[dict], **usage) -> dict:
            return {"id": cid, "object": "chat.completion.chunk", "created": created, "model": gen.adapter_id,
                    "system_fingerprint": None, "choices": choices, **(usage or chunk_usage)}

        def on_delta(d: ChoiceDelta) -> Iterable[dict]:
            if d.index not in started:
                started.add(d.index)
                yield chunk([{"index": d.index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                              "finish_reason": None}])
            if d.text or d.scored:
                yield chunk([{"index": d.index, "delta": {"content": d.text}, "logprobs": logprobs(d.scored),
                              "finish_reason": None}])
            if d.finish_reason is not None:
                yield chunk([{"index": d.index, "delta": {}, "logprobs": None, "finish_reason": d.finish_reason}])

        usage = (lambda: chunk([], usage=gen.usage.model_dump())) if req.include_usage else None
        return stream_sse(first, events, gen, on_delta, usage)
    collected = await until_disconnect(request, events)  # ClientDisconnected (499) if the client went away
    choices = [{"index": r.index, "message": {"role": "assistant", "content": r.text},
                "logprobs": logprobs(r.scored), "finish_reason": r.finish_reason} for r in collect(gen, collected)]
    return {"id": cid, "object": "chat.completion", "created": created, "model": gen.adapter_id,
            "choices": choices, "usage": gen.usage.model_dump(), "system_fingerprint": None}
