"""OpenAI-compatible ``POST /v1/completions`` and ``GET /v1/models``: ``model`` is the adapter id, so the
``openai`` Python client works unchanged (``base_url=http://host:port/v1``)."""
from __future__ import annotations

import json
import secrets
import time
from datetime import datetime
from typing import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from ptserve.server.api.deps import Principal, ReadyDep
from ptserve.server.api.routes_generate import (ERRORS, SSE_HEADERS, Generation, _first, run_generation, sse_error,
                                                until_disconnect)
from ptserve.server.api.schemas_generate import CompletionRequest, ModelCard, ModelList
from ptserve.server.generation.engine import StepEvent
from ptserve.server.generation.sequence import SamplingParams

router = APIRouter(tags=["openai"])


def _params(req: CompletionRequest) -> SamplingParams:
    return SamplingParams(
        max_new_tokens=req.max_tokens or 16, temperature=1.0 if req.temperature is None else req.temperature,
        top_p=req.top_p or 1.0, seed=req.seed, stop=tuple(req.stop or ()),
    )


def _chunk(cid: str, created: int, model: str, text: str, finish: str | None, usage=None) -> dict:
    body = {"id": cid, "object": "text_completion", "created": created, "model": model,
            "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": finish}]}
    if usage is not None:
        body["usage"] = usage
    return body


@router.post("/v1/completions", responses={**ERRORS, 200: {"content": {"text/event-stream": {}}}})
async def completions(req: CompletionRequest, request: Request, principal: Principal, state: ReadyDep):
    cid, created = f"cmpl-{secrets.token_hex(12)}", int(time.time())
    gen = Generation(req.model, 0)
    events = run_generation(state, principal, req.model, req.prompt, _params(req), gen)
    if req.stream:
        first = await _first(events)
        return StreamingResponse(_stream(cid, created, first, events, gen), media_type="text/event-stream",
                                 headers=SSE_HEADERS)
    await until_disconnect(request, events)
    return _chunk(cid, created, gen.adapter_id, gen.seq.text, gen.seq.finish_reason, gen.usage.model_dump())


async def _stream(cid, created, first: StepEvent | None, events: AsyncIterator[StepEvent], gen: Generation):
    try:
        pending = [first] if first is not None else []
        while True:
            event = pending.pop() if pending else await anext(events, None)
            if event is None:
                break
            if event.text or event.done:
                finish = gen.seq.finish_reason if event.done else None
                usage = gen.usage.model_dump() if event.done else None
                yield f"data: {json.dumps(_chunk(cid, created, gen.adapter_id, event.text, finish, usage))}\n\n"
        yield "data: [DONE]\n\n"
    except Exception as exc:  # the openai client raises APIError on a data event holding "error"
        yield sse_error(exc)
    finally:
        await events.aclose()


@router.get("/v1/models", response_model=ModelList, responses=ERRORS)
async def models(principal: Principal, state: ReadyDep) -> ModelList:
    """The adapters this caller may use (a tenant key sees its own), with the backbone as their parent."""
    task = "generate" if state.backbone.family.causal else "classify"
    tenant = None if principal.is_admin else principal.tenant
    cards, cursor = [], None
    while True:
        page = await state.adapters.list(tenant, cursor, 1000)
        for info in page.items:
            if info.task == task:
                created = int(datetime.fromisoformat(info.created_at.replace("Z", "+00:00")).timestamp())
                cards.append(ModelCard(id=info.id, created=created, owned_by=info.id.split("/")[0],
                                       parent=state.settings.backbone, root=state.settings.backbone))
        cursor = page.next_cursor
        if cursor is None:
            return ModelList(data=cards)
