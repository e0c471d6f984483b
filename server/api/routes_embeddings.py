"""OpenAI-compatible ``POST /v1/embeddings`` on encoder backbones: ``model`` is an adapter id (its prefix in
every layer) or the backbone's own name (no prefix); each text is one row in the same batcher, and so in the same
forward passes, as classification rows of any tenant; its output is the mean-pooled, L2-normalised hidden state."""
from __future__ import annotations

import base64
from contextlib import asynccontextmanager
from typing import AsyncIterator

import numpy as np
import torch
from fastapi import APIRouter

from ptserve.adapters_store.errors import AdapterNotFound, InvalidInput, WrongTask
from ptserve.adapters_store.ids import AdapterId
from ptserve.server.api.deps import Principal, ReadyDep, authorize, request_deadline
from ptserve.server.api.json_body import JSONBodyRoute
from ptserve.server.api.schemas import ErrorResponse
from ptserve.server.api.schemas_embeddings import Embedding, EmbeddingRequest, EmbeddingResponse, EmbeddingUsage
from ptserve.server.api.state import ServerState
from ptserve.server.auth import Identity
from ptserve.server.engine import EMBEDDING, Row
from ptserve.server.logs import note
from ptserve.server.resident import ResidentAdapter

router = APIRouter(tags=["openai"], route_class=JSONBodyRoute)
ERRORS = {code: {"model": ErrorResponse} for code in (400, 401, 404, 413, 422, 429, 503, 504)}
# Adapters whose prefix may embed: embed adapters, and classify adapters (their prefix applies, the head is unused).
EMBEDDING_TASKS = ("embed", "classify")


@router.post("/v1/embeddings", response_model=EmbeddingResponse, responses=ERRORS)
async def embeddings(req: EmbeddingRequest, principal: Principal, state: ReadyDep) -> EmbeddingResponse:
    if state.batcher is None:
        raise WrongTask(f"backbone {state.settings.backbone!r} is a decoder LM: /v1/embeddings needs an encoder")
    texts = [req.input] if isinstance(req.input, str) else req.input
    limit = state.settings.max_inputs_per_request
    if len(texts) > limit:
        raise InvalidInput(f"{len(texts)} inputs; at most {limit} per request")
    deadline = request_deadline(state)
    adapter_id = _adapter_id(state, principal, req.model)
    # The bare backbone counts for the caller's tenant (admin and open callers share the empty one).
    tenant = adapter_id.tenant if adapter_id else (principal.tenant or "")
    with state.limiter.slot(tenant):
        state.batcher.check_room(tenant, len(texts))  # refuse before loading or tokenising
        async with _prefix(state, adapter_id) as resident:
            token_ids = state.engine.tokenize(texts, resident.num_virtual_tokens, req.truncate)
            rows = [Row(resident, ids, EMBEDDING) for ids in token_ids]
            vectors = await state.batcher.submit(rows, [r.length for r in rows], tenant, deadline)
    tokens = sum(len(ids) for ids in token_ids)
    state.metrics.observe_embeddings(len(texts), tokens)
    return EmbeddingResponse(
        data=[Embedding(index=i, embedding=_encode(v, req.encoding_format)) for i, v in enumerate(vectors)],
        model=req.model, usage=EmbeddingUsage(prompt_tokens=tokens, total_tokens=tokens),
    )


def _adapter_id(state: ServerState, principal: Identity, model: str) -> AdapterId | None:
    """None for the bare backbone (its name wins over an adapter id that happens to equal it); else the adapter
    id, if the caller may use it (another tenant's answers like a missing one)."""
    if model == state.backbone.name:
        note(adapter=model)
        return None
    if "/" not in model:
        raise AdapterNotFound(
            f"model {model!r} not found: use an adapter id 'tenant/name' or the backbone {state.backbone.name!r}"
        )
    return authorize(principal, model)


@asynccontextmanager
async def _prefix(state: ServerState, adapter_id: AdapterId | None) -> AsyncIterator[ResidentAdapter]:
    """The prefix the rows run under, held for as long as they are in flight (the bare backbone has none)."""
    if adapter_id is None:
        yield state.engine.bare
        return
    async with state.adapters.lease(adapter_id) as resident:
        if resident.config.task not in EMBEDDING_TASKS:
            raise WrongTask(f"adapter {adapter_id} is a {resident.config.task!r} adapter; embeddings need an "
                            f"adapter of task {' or '.join(EMBEDDING_TASKS)}")
        yield resident


def _encode(vector: torch.Tensor, encoding_format: str) -> list[float] | str:
    if encoding_format == "base64":  # OpenAI's: the float32 values' little-endian bytes
        return base64.b64encode(vector.numpy().astype("<f4").tobytes()).decode("ascii")
    return vector.tolist()
