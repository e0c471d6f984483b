"""``POST /v1/generate``: one prompt under one adapter, answered as JSON or streamed as server-sent events.

``run_generation`` is shared with the OpenAI-compatible routes: it authorises, asks the engine client (in process,
or the engine core) for the tokens of the request's choices and yields their events, the text made on this side
(``engine_core.streams``); leaving the iteration early (client disconnect) cancels it.
A request that fails before its first event answers a plain JSON error; a stream that fails later ends with one
``data: {"error": {"type", "message"}}`` event (never a cut connection); a client that disconnects from a
non-streaming request is counted as 499, not as a server error.
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass, field
from typing import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from ptserve.adapters_store.errors import InvalidInput, WrongTask
from ptserve.client.wire.errors import APIError, ClientDisconnected, InternalError
from ptserve.server.api.deps import Principal, ReadyDep, authorize
from ptserve.server.api.json_body import JSONBodyRoute
from ptserve.server.api.schemas import ErrorResponse
from ptserve.server.api.schemas_generate import GenerateRequest, GenerateResponse, GenerateUsage
from ptserve.server.api.state import ServerState
from ptserve.server.engine_core.streams import generate_events
from ptserve.server.generation.engine import StepEvent
from ptserve.server.generation.sequence import SamplingParams, Sequence
from ptserve.server.limits import DeadlineExceeded
from ptserve.server.logs import current, note

log = logging.getLogger(__name__)
router = APIRouter(tags=["inference"], route_class=JSONBodyRoute)
ERRORS = {code: {"model": ErrorResponse} for code in (400, 401, 404, 413, 422, 429, 503, 504)}
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


@dataclass
class Generation:
    """Where a running generation stands, for the answer: one sequence per choice, ``n`` choices per prompt
    (choice ``k`` continues prompt ``k // n``, as OpenAI numbers them)."""

    adapter_id: str
    version: int
    n: int = 1
    seqs: list[Sequence] = field(default_factory=list)

    @property
    def seq(self) -> Sequence:
        return self.seqs[0]

    @property
    def usage(self) -> GenerateUsage:
        prompt = sum(len(s.prompt_ids) for s in self.seqs[:: self.n])  # each prompt counted once
        completion = sum(len(s.output_ids) for s in self.seqs)
        return GenerateUsage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


async def run_generation(
    state: ServerState, principal, adapter: str, prompts: list[str | list[int]], params: list[SamplingParams],
    gen: Generation, fill: bool = False,
) -> AsyncIterator[StepEvent]:
    """Events of every choice of one request: ``params[k]`` for choice ``k`` of ``prompts[k // gen.n]``, through
    the engine client (in process or the engine core); the text is made here (``engine_core.streams``). With
    ``fill``, ``max_new_tokens`` is only a bound: each choice gets as many as fit beside its prompt and prefix."""
    if not state.backbone.family.causal:
        raise WrongTask(f"backbone {state.settings.backbone!r} is an encoder: it serves /v1/classify, not generation")
    limit, most = state.settings.max_new_tokens_limit, state.settings.max_inputs_per_request
    if len(params) > most:
        raise InvalidInput(f"{len(params)} choices (prompts x n); at most {most} per request")
    asked = max((p.max_new_tokens for p in params), default=0)
    if asked > limit:
        raise InvalidInput(f"max_new_tokens={asked}; at most {limit}")
    adapter_id = authorize(principal, adapter)
    with state.limiter.slot(adapter_id.tenant):
        events = generate_events(state.client, state.backbone.tokenizer, adapter_id, prompts, params, gen, fill)
        try:
            async for event in _observed(state, events, gen):
                yield event
        finally:  # into the access-log line: what the engine did for this request
            if gen.seqs:
                finish = [s.finish_reason for s in gen.seqs]
                note(generation={**gen.usage.model_dump(exclude={"total_tokens"}), "choices": len(gen.seqs),
                                 "engine_steps": max(s.steps for s in gen.seqs),
                                 "finish_reason": finish[0] if len(finish) == 1 else finish})


async def _observed(state: ServerState, events: AsyncIterator[StepEvent], gen: Generation,
                    ) -> AsyncIterator[StepEvent]:
    """Time to first token (bounded by the request deadline), inter-token latency, generated and prompt tokens."""
    m, start = state.metrics, time.monotonic()
    deadline, last = start + state.settings.request_timeout_s, None
    it = events.__aiter__()
    try:
        while True:
            timeout = None if last is not None else max(0.0, deadline - time.monotonic())
            try:
                event = await asyncio.wait_for(it.__anext__(), timeout)
            except StopAsyncIteration:
                return
            except asyncio.TimeoutError:
                raise DeadlineExceeded(f"no token within {state.settings.request_timeout_s} s") from None
            now = time.monotonic()
            if last is None:  # the request is queued on the engine: its prompts count
                m.prompt_tokens.inc(sum(len(seq.prompt_ids) for seq in gen.seqs[:: gen.n]))
            if event.token is not None:
                m.generated_tokens.inc()
                (m.time_to_first_token if last is None else m.inter_token_latency).observe(now - (last or start))
                last = now
            yield event
    finally:
        await it.aclose()


def sampling_params(req: GenerateRequest) -> SamplingParams:
    return SamplingParams(max_new_tokens=req.max_new_tokens, temperature=req.temperature, top_k=req.top_k,
                          top_p=req.top_p, seed=req.seed, stop=tuple(req.stop))


async def until_disconnect(request: Request, events: AsyncIterator[StepEvent]) -> list[StepEvent]:
    """Collect all events; if the client goes away first, cancel the sequence and raise ``ClientDisconnected``."""
    collected: list[StepEvent] = []

    async def collect():
        async for event in events:
            collected.append(event)

    work = asyncio.ensure_future(collect())
    while not work.done():
        await asyncio.wait({work}, timeout=0.25)
        if not work.done() and await request.is_disconnected():
            work.cancel()
            await asyncio.gather(work, return_exceptions=True)
            log.info("client disconnected after %d of its tokens; generation cancelled", len(collected))
            raise ClientDisconnected("the client disconnected before the answer was ready")
    work.result()  # re-raise errors
    return collected


def sse_error(exc: BaseException) -> str:
    """The last event of a stream that failed after it started (the status line has gone: 200)."""
    if not isinstance(exc, APIError):
        log.error("generation stream failed", exc_info=exc)
        exc = InternalError("internal server error")
    ctx = current()
    note(generation={**((ctx and ctx.generation) or {}), "error": exc.type})
    return f"data: {json.dumps({'error': {'type': exc.type, 'message': exc.message}})}\n\n"


@router.post("/v1/generate", response_model=GenerateResponse, responses={
    **ERRORS, 200: {"content": {"text/event-stream": {}}}})
async def generate(req: GenerateRequest, request: Request, principal: Principal, state: ReadyDep):
    gen = Generation(req.adapter, 0)
    events = run_generation(state, principal, req.adapter, [req.prompt], [sampling_params(req)], gen)
    if req.stream:
        first = await _first(events)  # errors before the first event answer as plain 4xx/5xx
        return StreamingResponse(_sse(first, events, gen), media_type="text/event-stream", headers=SSE_HEADERS)
    await until_disconnect(request, events)
    return GenerateResponse(adapter=gen.adapter_id, version=gen.version, text=gen.seq.text,
                            finish_reason=gen.seq.finish_reason, usage=gen.usage)


async def _first(events: AsyncIterator[StepEvent]) -> StepEvent | None:
    try:
        return await events.__anext__()
    except StopAsyncIteration:
        return None


async def _sse(first: StepEvent | None, events: AsyncIterator[StepEvent], gen: Generation) -> AsyncIterator[str]:
    async def all_events():
        if first is not None:
            yield first
        async for event in events:
            yield event

    try:
        async for event in all_events():
            body = {"text": event.text, "token": event.token}
            if event.done:
                body.update(finish_reason=gen.seq.finish_reason, adapter=gen.adapter_id, version=gen.version,
                            usage=gen.usage.model_dump())
            yield f"data: {json.dumps(body)}\n\n"
        yield "data: [DONE]\n\n"
    except Exception as exc:
        yield sse_error(exc)
    finally:
        await events.aclose()
