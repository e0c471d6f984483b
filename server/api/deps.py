"""FastAPI dependencies: the parts of ``ServerState`` a route needs (or 503 while the server is not ready), and
the caller's identity.

Auth in a route, in one line each (``ptserve.server.auth`` has the rules)::

    async def route(req: Body, principal: Principal, state: ReadyDep):
        adapter_id = authorize(principal, req.adapter)  # AdapterId; another tenant's adapter -> the same 404
        with state.limiter.slot(adapter_id.tenant):      # per-tenant concurrency -> 429
            ... await encode_texts(state.client, ...)    # the engine (in process or the engine core), see
                                                         # ptserve.server.engine_core.client
"""
from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request, Security
from fastapi.security import HTTPBearer

from ptserve.server.adapters import AdapterService
from ptserve.client.wire.errors import EngineUnavailable
from ptserve.server.api.errors import NotReady
from ptserve.server.api.state import ServerState
from ptserve.server.auth import Identity, authorize, authorize_tenant, require_admin  # noqa: F401  (re-exported)
from ptserve.server.logs import note

# Declares the scheme in OpenAPI (Swagger's "Authorize"); the header itself is read by ``Authenticator``.
_bearer = HTTPBearer(auto_error=False, description="An admin key or a tenant key (ptk_...).")


# async, like every dependency here: FastAPI runs a plain ``def`` dependency in its thread pool, a thread hop
# per request and per dependency (issue 12: ~2 of them per request cost more than the route).
async def get_state(request: Request) -> ServerState:
    return request.app.state.ptserve


async def get_ready_state(request: Request) -> ServerState:
    return require_ready(request.app.state.ptserve)


def require_ready(state: ServerState) -> ServerState:
    """``state``, or 503 while the backbone loads or (an API worker) the engine core is down."""
    if not state.ready.is_set():
        raise NotReady(state.load_error or "the backbone is still loading")
    if state.client is not None and not state.client.available:  # an API worker whose engine core is down
        raise engine_down(state)
    return state


def engine_down(state: ServerState) -> Exception:
    """The error for a request while the engine core is not connected: still starting, or gone (restarting)."""
    if getattr(state.client, "ever_connected", True):
        return EngineUnavailable()
    return NotReady("the engine core is still loading")


async def get_adapters(state: Annotated[ServerState, Depends(get_ready_state)]) -> AdapterService:
    return state.adapters


async def authenticate(request: Request, _=Security(_bearer)) -> Identity:
    """The caller (401 for a missing, malformed, unknown or revoked key; everyone is admin on an open server)."""
    return await identify(request.app.state.ptserve, request.headers.get("authorization"))


async def identify(state: ServerState, authorization: str | None) -> Identity:
    """The caller of a request with this ``Authorization`` header, noted for its access-log line."""
    principal = await state.auth.authenticate(authorization)
    note(tenant=principal.log_name, key_id=principal.key_id)
    return principal


async def authenticate_admin(principal: Annotated[Identity, Depends(authenticate)]) -> Identity:
    return require_admin(principal)


StateDep = Annotated[ServerState, Depends(get_state)]
ReadyDep = Annotated[ServerState, Depends(get_ready_state)]
AdaptersDep = Annotated[AdapterService, Depends(get_adapters)]
Principal = Annotated[Identity, Depends(authenticate)]
AdminPrincipal = Annotated[Identity, Depends(authenticate_admin)]
