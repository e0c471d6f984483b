"""OpenAI-compatible ``GET /v1/models``: per backbone, the adapters of the tasks it serves (``ptserve.server.tasks``)
that the caller may use, owned by their tenant, and the bare backbone where it is usable as a model itself."""
from __future__ import annotations

from datetime import datetime

from fastapi import APIRouter

from ptserve.server.api.json_body import JSONBodyRoute
from ptserve.server.api.deps import Principal, ReadyDep
from ptserve.server.api.routes_generate import ERRORS
from ptserve.server.api.schemas_openai import ModelCard, ModelList
from ptserve.server.tasks import BARE_BACKBONE_SERVES, backbone_kind, served_tasks

router = APIRouter(tags=["openai"], route_class=JSONBodyRoute)
BACKBONE_OWNER = "ptserve"


@router.get("/v1/models", response_model=ModelList, responses=ERRORS)
async def models(principal: Principal, state: ReadyDep) -> ModelList:
    """The models this caller may name: a tenant key sees its own tenant's adapters (and the bare backbone)."""
    backbone = state.backbone.name  # what the server was started with (e.g. "minilm"), as /v1/embeddings names it
    kind = backbone_kind(state.backbone.family.causal)
    tasks = served_tasks(kind)
    cards = []
    if BARE_BACKBONE_SERVES[kind]:
        cards.append(ModelCard(id=backbone, created=int(state.started_at), owned_by=BACKBONE_OWNER, root=backbone))
    tenant = None if principal.is_admin else principal.tenant
    cursor = None
    while True:
        page = await state.adapters.list(tenant, cursor, 1000)
        for info in page.items:
            if info.task in tasks:
                created = int(datetime.fromisoformat(info.created_at.replace("Z", "+00:00")).timestamp())
                cards.append(ModelCard(id=info.id, created=created, owned_by=info.id.split("/")[0],
                                       parent=backbone, root=backbone))
        cursor = page.next_cursor
        if cursor is None:
            return ModelList(data=cards)
