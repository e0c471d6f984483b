"""FastAPI dependencies: the parts of ``ServerState`` a route needs, or 503 while the server is not ready."""
from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from server.adapters import AdapterService
from server.api.errors import NotReady
from server.api.state import ServerState


def get_state(request: Request) -> ServerState:
    return request.app.state.ptserve


def get_ready_state(request: Request) -> ServerState:
    state: ServerState = request.app.state.ptserve
    if not state.ready.is_set():
        raise NotReady(state.load_error or "the backbone is still loading")
    return state


def get_adapters(state: Annotated[ServerState, Depends(get_ready_state)]) -> AdapterService:
    return state.adapters


StateDep = Annotated[ServerState, Depends(get_state)]
ReadyDep = Annotated[ServerState, Depends(get_ready_state)]
AdaptersDep = Annotated[AdapterService, Depends(get_adapters)]
