"""Liveness, readiness and the Prometheus scrape endpoint."""
from __future__ import annotations

import asyncio
from urllib.parse import urlsplit, urlunsplit

from fastapi import APIRouter, Response

from ptserve.adapters_store.errors import PtserveError
from ptserve.server.api.deps import StateDep, engine_down
from ptserve.client.wire.errors import EngineUnavailable
from ptserve.server.api.errors import Draining, NotReady, answer, error_response
from ptserve.server.api.json_body import JSONBodyRoute
from ptserve.server.metrics import CONTENT_TYPE

router = APIRouter(tags=["operations"], route_class=JSONBodyRoute)


@router.get("/healthz")
async def healthz() -> dict:
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(state: StateDep):
    if state.draining:
        return error_response(503, Draining.type, "the server is shutting down", {"Retry-After": "1"})
    if state.load_error:
        return error_response(503, NotReady.type, f"start-up failed: {state.load_error}")
    if not state.ready.is_set():
        return error_response(503, NotReady.type, "the backbone is still loading")
    if state.client is not None and not state.client.available:
        return answer(engine_down(state))
    # A store outage degrades but does not stop serving: resident adapters still answer, so stay in rotation.
    try:
        await asyncio.wait_for(state.store.ping(), timeout=2.0)
        store_status = "ok"
    except (PtserveError, asyncio.TimeoutError):
        store_status = "unavailable"
    try:  # the engine's facts: this process's, or the engine core's (503 engine_unavailable while it is down)
        facts = await state.client.health()
    except EngineUnavailable as exc:
        return answer(exc)
    body = {
        "status": "ready" if store_status == "ok" else "degraded",
        "backbone": state.settings.backbone,
        **{k: v for k, v in facts.items() if k != "resident_adapters"},
        "store": _redact(state.store.url),
        "store_status": store_status,
        "resident_adapters": facts["resident_adapters"],
    }
    # Stores with a change feed (Redis): while it is down, other replicas' updates reach this one only at the
    # resync after it reconnects.
    if (feed := getattr(state.store, "connected", None)) is not None:
        body["change_feed"] = "connected" if feed else "disconnected"
    return body


@router.get("/metrics", response_class=Response)
async def metrics(state: StateDep) -> Response:
    if state.batcher is not None:
        state.metrics.queue_depth.set(state.batcher.depth)
    state.metrics.inflight.set(state.inflight)
    state.metrics.draining.set(1 if state.draining else 0)
    return Response(state.metrics.render(), media_type=CONTENT_TYPE)


def _redact(url: str) -> str:
    """Store URLs may carry a password (redis://:secret@host); never echo it."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme, f"***@{host}", parts.path, parts.query, parts.fragment))
