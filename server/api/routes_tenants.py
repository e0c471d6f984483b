"""Tenant keys (admin only): create one (shown once), list them (never the secret), revoke one."""
from __future__ import annotations

from fastapi import APIRouter, Body, Response
from pydantic import BaseModel, ConfigDict, Field

from ptserve.adapters_store.errors import StoreUnavailable
from ptserve.adapters_store.ids import check_tenant
from ptserve.adapters_store.keys import KEY_ID_RE, KeyNotFound, KeyStore
from ptserve.server.api.deps import AdminPrincipal, StateDep
from ptserve.server.api.json_body import JSONBodyRoute
from ptserve.server.api.schemas import ErrorResponse
from ptserve.server.api.state import ServerState

router = APIRouter(prefix="/v1/tenants", tags=["tenants"], route_class=JSONBodyRoute)
ERRORS = {code: {"model": ErrorResponse} for code in (400, 401, 403, 404, 422, 503)}


class KeyCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field("", max_length=200, description="A note for humans, e.g. where the key is used.")


class KeyPublic(BaseModel):
    key_id: str
    tenant: str
    name: str
    created_at: str


class KeyCreated(KeyPublic):
    key: str = Field(..., description="The API key. Shown this once: only its sha256 is kept.")


class KeyList(BaseModel):
    data: list[KeyPublic]


def _keys(state: ServerState) -> KeyStore:
    if state.keys is None:
        raise StoreUnavailable(f"no key store for {state.settings.store}")
    return state.keys


@router.post("/{tenant}/keys", status_code=201, response_model=KeyCreated, responses=ERRORS)
async def create_key(tenant: str, _: AdminPrincipal, state: StateDep, body: KeyCreate | None = Body(None)):
    """A new key for ``tenant``: it may use, list, upload and delete only ``tenant/*``."""
    key, record = await _keys(state).create(check_tenant(tenant), body.name if body else "")
    return KeyCreated(key=key, **record.public())


@router.get("/{tenant}/keys", response_model=KeyList, responses=ERRORS)
async def list_keys(tenant: str, _: AdminPrincipal, state: StateDep):
    return KeyList(data=[KeyPublic(**r.public()) for r in await _keys(state).list(check_tenant(tenant))])


@router.delete("/{tenant}/keys/{key_id}", status_code=204, response_class=Response, responses=ERRORS)
async def revoke_key(tenant: str, key_id: str, _: AdminPrincipal, state: StateDep):
    """Revoke at once here, and on every replica sharing the store within ``key_cache_ttl_s``."""
    check_tenant(tenant)
    if not KEY_ID_RE.fullmatch(key_id):
        raise KeyNotFound(f"tenant {tenant} has no key {key_id}")
    await _keys(state).revoke(tenant, key_id)
    state.auth.forget(key_id)
    return Response(status_code=204)
