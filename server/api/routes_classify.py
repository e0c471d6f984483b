"""``POST /v1/classify``: tokenise against the adapter's prefix, queue the rows, answer with labels."""
from __future__ import annotations

from fastapi import APIRouter, Response

from ptserve.adapters_store.errors import InvalidInput, WrongTask
from ptserve.server.api.deps import Principal, ReadyDep, authorize
from ptserve.server.api.json_body import JSONBodyRoute
from ptserve.server.api.predictions import classify_response
from ptserve.server.api.schemas import ClassifyRequest, ClassifyResponse, ErrorResponse
from ptserve.server.api.state import ServerState
from ptserve.server.auth import Identity
from ptserve.server.engine import LOGITS
from ptserve.server.engine_core.client import AdapterMeta, encode_texts

router = APIRouter(tags=["inference"], route_class=JSONBodyRoute)
ERRORS = {code: {"model": ErrorResponse} for code in (400, 401, 404, 413, 422, 429, 503, 504)}


@router.post("/v1/classify", response_model=ClassifyResponse, responses=ERRORS)
async def classify(req: ClassifyRequest, principal: Principal, state: ReadyDep) -> Response:
    # Requests mostly arrive through ``fast_classify`` (the same answer without FastAPI's routing and dependency
    # machinery); this route is the contract (OpenAPI, validation errors) and serves whatever that hands on.
    return await answer_classify(state, principal, req)


async def answer_classify(state: ServerState, principal: Identity, req: ClassifyRequest) -> Response:
    if state.backbone.family.causal:
        raise WrongTask(f"backbone {state.settings.backbone!r} is a decoder LM: it serves /v1/generate, not /v1/classify")
    limit = state.settings.max_inputs_per_request
    if len(req.inputs) > limit:
        raise InvalidInput(f"{len(req.inputs)} inputs; at most {limit} per request")
    adapter_id = authorize(principal, req.adapter)
    with state.limiter.slot(adapter_id.tenant):
        state.client.check_room(adapter_id.tenant, len(req.inputs))  # refuse before loading or tokenising
        encoded, token_ids = await encode_texts(
            state.client, state.backbone, adapter_id, req.inputs, req.truncate, LOGITS, adapter_id.tenant,
            state.settings.request_timeout_s, ("classify",), _wrong_task,
        )
    # built in one step (one softmax for all rows) and returned as bytes: no response-model revalidation
    return classify_response(encoded.adapter, encoded.version, encoded.labels, encoded.outputs, req.return_logits,
                             sum(len(ids) for ids in token_ids))


def _wrong_task(meta: AdapterMeta) -> str:
    route = {"embed": "/v1/embeddings"}.get(meta.task, "/v1/generate")
    return f"adapter {meta.id} is a {meta.task!r} adapter; use {route}"
