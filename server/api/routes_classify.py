"""``POST /v1/classify``: tokenise against the adapter's prefix, queue the rows, answer with labels."""
from __future__ import annotations

import torch
from fastapi import APIRouter

from ptserve.adapters_store.errors import InvalidInput, WrongTask
from ptserve.server.api.deps import Principal, ReadyDep, authorize
from ptserve.server.api.json_body import JSONBodyRoute
from ptserve.server.api.schemas import ClassifyRequest, ClassifyResponse, ErrorResponse, Prediction, Usage
from ptserve.server.engine import LOGITS
from ptserve.server.engine_core.client import AdapterMeta, encode_texts

router = APIRouter(tags=["inference"], route_class=JSONBodyRoute)
ERRORS = {code: {"model": ErrorResponse} for code in (400, 401, 404, 413, 422, 429, 503, 504)}


@router.post("/v1/classify", response_model=ClassifyResponse, responses=ERRORS)
async def classify(req: ClassifyRequest, principal: Principal, state: ReadyDep) -> ClassifyResponse:
    if state.client is None:
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
    labels = encoded.labels
    return ClassifyResponse(
        adapter=encoded.adapter,
        version=encoded.version,
        predictions=[_prediction(labels, row_logits, req.return_logits) for row_logits in encoded.outputs],
        usage=Usage(input_tokens=sum(len(ids) for ids in token_ids)),
    )


def _wrong_task(meta: AdapterMeta) -> str:
    route = {"embed": "/v1/embeddings"}.get(meta.task, "/v1/generate")
    return f"adapter {meta.id} is a {meta.task!r} adapter; use {route}"


def _prediction(labels: tuple[str, ...], logits: torch.Tensor, with_logits: bool) -> Prediction:
    probs = torch.softmax(logits, dim=-1)
    best = int(probs.argmax())
    return Prediction(
        label=labels[best],
        score=float(probs[best]),
        scores={label: float(p) for label, p in zip(labels, probs)},
        logits=[float(x) for x in logits] if with_logits else None,
    )
