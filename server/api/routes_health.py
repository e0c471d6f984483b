"""Liveness, readiness and the Prometheus scrape endpoint."""
from __future__ import annotations

from fastapi import APIRouter, Response

from server.api.deps import StateDep
from server.api.errors import error_response
from server.metrics import CONTENT_TYPE

router = APIRouter(tags=["operations"])


@router.get("/healthz")
async def healthz() -> dict:
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(state: StateDep):
    if state.load_error:
        return error_response(503, "not_ready", f"start-up failed: {state.load_error}")
    if not state.ready.is_set():
        return error_response(503, "not_ready", "the backbone is still loading")
    return {"status": "ready", "backbone": state.settings.backbone, "store": state.store.url}


@router.get("/metrics", response_class=Response)
async def metrics(state: StateDep) -> Response:
    if state.batcher is not None:
        state.metrics.queue_depth.set(state.batcher.depth)
    return Response(state.metrics.render(), media_type=CONTENT_TYPE)
