"""OpenAI-compatible ``POST /v1/embeddings`` on encoder backbones: ``model`` is an adapter id (its prefix in
every layer) or the backbone's own name (no prefix); each text is one row in the same batcher, and so in the same
forward passes, as classification rows of any tenant; its output is the mean-pooled, L2-normalised hidden state."""
from __future__ import annotations

import base64
import numpy as np
import torch
from fastapi import APIRouter

from ptserve.adapters_store.errors import AdapterNotFound, InvalidInput, WrongTask
from ptserve.adapters_store.ids import AdapterId
from ptserve.server.api.deps import Principal, ReadyDep, authorize
from ptserve.server.api.json_body import JSONBodyRoute
from ptserve.server.api.schemas import ErrorResponse
from ptserve.server.api.schemas_embeddings import Embedding, EmbeddingRequest, EmbeddingResponse, EmbeddingUsage
from ptserve.server.api.state import ServerState
from ptserve.server.auth import Identity
from ptserve.server.engine import EMBEDDING
from ptserve.server.engine_core.client import AdapterMeta, encode_texts
from ptserve.server.logs import note

router = APIRouter(tags=["openai"], route_class=JSONBodyRoute)
ERRORS = {code: {"model": ErrorResponse} for code in (400, 401, 404, 413, 422, 429, 503, 504)}
# Adapters whose prefix may embed: embed adapters, and classify adapters (their prefix applies, the head is unused).
EMBEDDING_TASKS = ("embed", "classify")


@router.post("/v1/embeddings", response_model=EmbeddingResponse, responses=ERRORS)
async def embeddings(req: EmbeddingRequest, principal: Principal, state: ReadyDep) -> EmbeddingResponse:
    if state.backbone.family.causal:
        raise WrongTask(f"backbone {state.settings.backbone!r} is a decoder LM: /v1/embeddings needs an encoder")
    texts = [req.input] if isinstance(req.input, str) else req.input
    limit = state.settings.max_inputs_per_request
    if len(texts) > limit:
        raise InvalidInput(f"{len(texts)} inputs; at most {limit} per request")
    adapter_id = _adapter_id(state, principal, req.model)
    # The bare backbone counts for the caller's tenant (admin and open callers share the empty one).
    tenant = adapter_id.tenant if adapter_id else (principal.tenant or "")
    with state.limiter.slot(tenant):
        state.client.check_room(tenant, len(texts))  # refuse before loading or tokenising
        encoded, token_ids = await encode_texts(
            state.client, state.backbone, adapter_id, texts, req.truncate, EMBEDDING, tenant,
            state.settings.request_timeout_s, EMBEDDING_TASKS, _wrong_task,
        )
    vectors = encoded.outputs
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


def _wrong_task(meta: AdapterMeta) -> str:
    return (f"adapter {meta.id} is a {meta.task!r} adapter; embeddings need an adapter of task "
            f"{' or '.join(EMBEDDING_TASKS)}")


def _encode(vector: torch.Tensor, encoding_format: str) -> list[float] | str:
    if encoding_format == "base64":  # OpenAI's: the float32 values' little-endian bytes
        return base64.b64encode(vector.numpy().astype("<f4").tobytes()).decode("ascii")
    return vector.tolist()
