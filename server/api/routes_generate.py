"""``POST /v1/generate``: one prompt under one adapter, answered as JSON or streamed as server-sent events.

``run_generation`` is shared with the OpenAI-compatible route: it authorises, leases the adapter, queues the
sequence on the engine thread and yields its events; leaving the iteration early (client disconnect) cancels it.
A request that fails before its first event answers a plain JSON error; a stream that fails later ends with one
``data: {"error": {"type", "message"}}`` event (never a cut connection); a client that disconnects from a
non-streaming request is counted as 499, not as a server error.
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass
from typing import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from ptserve.adapters_store.errors import InvalidInput, WrongTask
from ptserve.client.wire.errors import APIError, ClientDisconnected, InternalError
from ptserve.server.api.deps import Principal, ReadyDep, authorize
from ptserve.server.api.schemas import ErrorResponse
from ptserve.server.api.schemas_generate import GenerateRequest, GenerateResponse, GenerateUsage
from ptserve.server.api.state import ServerState
from ptserve.server.generation.engine import StepEvent
from ptserve.server.generation.sequence import SamplingParams, Sequence
from ptserve.server.limits import DeadlineExceeded, QueueFull
from ptserve.server.logs import current, note

log = logging.getLogger(__name__)
router = APIRouter(tags=["inference"])
ERRORS = {code: {"model": ErrorResponse} for code in (400, 401, 404, 413, 422, 429, 503, 504)}
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


@dataclass
class Generation:
    """Where a running generation stands, for the answer."""

    adapter_id: str
    version: int
    seq: Sequence | None = None

    @property
    def usage(self) -> GenerateUsage:
        prompt, completion = len(self.seq.prompt_ids), len(self.seq.output_ids)
        return GenerateUsage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


async def run_generation(
    state: ServerState, principal, adapter: str, prompt: str, params: SamplingParams, gen: Generation
) -> AsyncIterator[StepEvent]:
    runner = state.generator
    if runner is None:
        raise WrongTask(f"backbone {state.settings.backbone!r} is an encoder: it serves /v1/classify, not generation")
    limit = state.settings.max_new_tokens_limit
    if params.max_new_tokens > limit:
        raise InvalidInput(f"max_new_tokens={params.max_new_tokens}; at most {limit}")
    if runner.waiting >= state.settings.max_queue_rows:
        raise QueueFull(f"{runner.waiting} requests are waiting to generate; retry later", retry_after=1.0)
    adapter_id = authorize(principal, adapter)
    with state.limiter.slot(adapter_id.tenant):
        async with state.adapters.lease(adapter_id) as resident:
            if resident.config.task != "generate":
                raise WrongTask(f"adapter {adapter} is a {resident.config.task!r} adapter; use /v1/classify")
            gen.adapter_id, gen.version = resident.id, resident.version
            gen.seq = runner.engine.new_sequence(resident, prompt, params)
            state.metrics.prompt_tokens.inc(len(gen.seq.prompt_ids))
            try:
                async for event in _observed(state, runner.generate(gen.seq)):
                    yield event
            finally:
                seq = gen.seq  # into the access-log line: what the engine did for this request
                note(generation={"prompt_tokens": len(seq.prompt_ids), "completion_tokens": len(seq.output_ids),
                                 "engine_steps": seq.steps, "finish_reason": seq.finish_reason})


async def _observed(state: ServerState, events: AsyncIterator[StepEvent]) -> AsyncIterator[StepEvent]:
    """Time to first token (bounded by the request deadline), inter-token latency, generated tokens."""
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
    events = run_generation(state, principal, req.adapter, req.prompt, sampling_params(req), gen)
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
