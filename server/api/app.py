"""The app factory: ``create_app(settings)`` wires routes, middleware and error handlers; the lifespan loads
the backbone in the background so ``/healthz`` answers at once and ``/readyz`` says when serving can start."""
from __future__ import annotations

import asyncio
import inspect
from contextlib import asynccontextmanager

from fastapi import FastAPI

from ptserve.server.api import (
    routes_adapters, routes_chat, routes_classify, routes_embeddings, routes_generate, routes_health, routes_models,
    routes_openai, routes_tenants,
)
from ptserve.server.api.errors import install_error_handlers
from ptserve.server.api.fast_classify import PATH as FAST_CLASSIFY_PATH, FastClassify
from ptserve.server.api.middleware import BodyLimitMiddleware, RequestMiddleware
from ptserve.server.api.state import Mode, ServerState
from ptserve.server.settings import Settings


# FastAPI's native OpenTelemetry hooks (FastAPI >= 0.16x) off: they ask the global providers on every request
# (~20 µs, for nothing unless an OTel SDK is set up); the server's own metrics are Prometheus (``/metrics``).
_NO_TELEMETRY = ({"telemetry": {"tracing": False, "metrics": False, "logs": False}}
                 if "telemetry" in inspect.signature(FastAPI.__init__).parameters else {})


def create_app(settings: Settings | None = None, mode: Mode = "inprocess", engine_address: str | None = None,
               fast_classify: bool = True) -> FastAPI:
    """``mode`` "worker": an API worker of an engine core process at ``engine_address`` (``engine_core``).
    ``fast_classify`` False: every classify request goes through FastAPI's route (what the tests and the request
    path benchmark compare ``FastClassify`` with)."""
    settings = settings or Settings()
    state = ServerState(settings, mode, engine_address)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        loading = asyncio.create_task(state.start(), name="ptserve-start")
        try:
            yield
        finally:
            loading.cancel()
            await asyncio.gather(loading, return_exceptions=True)
            await state.stop()

    app = FastAPI(title="ptserve", version="0.1.0", lifespan=lifespan, **_NO_TELEMETRY,
                  description="Multi-tenant inference server for P-Tuning v2 prefixes.")
    app.state.ptserve = state
    for module in (routes_adapters, routes_classify, routes_generate, routes_openai, routes_chat, routes_embeddings,
                   routes_models, routes_health, routes_tenants):
        app.include_router(module.router)
    install_error_handlers(app)

    def body_limit(method: str, path: str) -> int:
        if method == "PUT" and path.startswith("/v1/adapters/"):
            return settings.max_adapter_bytes + (64 << 10)  # multipart framing + adapter_config.json
        return settings.max_body_bytes

    if fast_classify:  # innermost: the hot route without the router
        route = next(r for r in routes_classify.router.routes if r.path == FAST_CLASSIFY_PATH)
        app.add_middleware(FastClassify, state=state, route=route)
    app.add_middleware(BodyLimitMiddleware, limit_for=body_limit)
    app.add_middleware(RequestMiddleware, state=state)  # outermost: request ids, draining, metrics, access log
    return app
