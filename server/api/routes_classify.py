"""``POST /v1/classify``: tokenise against the adapter's prefix, queue the rows, answer with labels."""
from __future__ import annotations

from fastapi import APIRouter, Response

from ptserve.adapters_store.errors import InvalidInput, WrongTask
from ptserve.server.api.deps import Principal, ReadyDep, authorize, request_deadline
from ptserve.server.api.json_body import JSONBodyRoute
from ptserve.server.api.predictions import classify_response
from ptserve.server.api.schemas import ClassifyRequest, ClassifyResponse, ErrorResponse
from ptserve.server.engine import Row

router = APIRouter(tags=["inference"], route_class=JSONBodyRoute)
ERRORS = {code: {"model": ErrorResponse} for code in (400, 401, 404, 413, 422, 429, 503, 504)}


@router.post("/v1/classify", response_model=ClassifyResponse, responses=ERRORS)
async def classify(req: ClassifyRequest, principal: Principal, state: ReadyDep) -> Response:
    if state.batcher is None:
        raise WrongTask(f"backbone {state.settings.backbone!r} is a decoder LM: it serves /v1/generate, not /v1/classify")
    deadline = request_deadline(state)
    limit = state.settings.max_inputs_per_request
    if len(req.inputs) > limit:
        raise InvalidInput(f"{len(req.inputs)} inputs; at most {limit} per request")
    adapter_id = authorize(principal, req.adapter)
    with state.limiter.slot(adapter_id.tenant):
        state.batcher.check_room(adapter_id.tenant, len(req.inputs))  # refuse before loading or tokenising
        async with state.adapters.lease(adapter_id) as adapter:
            if adapter.config.task != "classify":
                route = {"embed": "/v1/embeddings"}.get(adapter.config.task, "/v1/generate")
                raise WrongTask(f"adapter {req.adapter} is a {adapter.config.task!r} adapter; use {route}")
            token_ids = state.engine.tokenize(req.inputs, adapter.num_virtual_tokens, req.truncate)
            rows = [Row(adapter, ids) for ids in token_ids]
            logits = await state.batcher.submit(rows, [r.length for r in rows], adapter_id.tenant, deadline)
    # built in one step (one softmax for all rows) and returned as bytes: no response-model revalidation
    return classify_response(adapter.id, adapter.version, adapter.labels, logits, req.return_logits,
                             sum(len(ids) for ids in token_ids))
