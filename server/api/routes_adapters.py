"""Adapter routes: upload (ptserve blob or PEFT folder), list, show, download, delete."""
from __future__ import annotations

from fastapi import APIRouter, Query, Request, Response
from starlette.datastructures import UploadFile

from ptserve.adapters_store.errors import InvalidAdapter
from ptserve.adapters_store.ids import AdapterId, check_tenant
from ptserve.adapters_store.peft_folder import CONFIG_FILE, WEIGHTS_FILE, parse_labels
from ptserve.client.wire.records import AdapterInfo
from ptserve.server.api.deps import AdaptersDep, Principal, authorize, authorize_tenant
from ptserve.server.api.errors import BadRequest, UnsupportedMediaType, answer
from ptserve.server.api.json_body import JSONBodyRoute
from ptserve.server.api.schemas import AdapterList, AdapterPublic, ErrorResponse

router = APIRouter(prefix="/v1/adapters", tags=["adapters"], route_class=JSONBodyRoute)
ERRORS = {code: {"model": ErrorResponse} for code in (400, 401, 403, 404, 413, 415, 422, 503)}


def _public(info: AdapterInfo, notes: list[str] | None = None) -> AdapterPublic:
    return AdapterPublic(**{**info.to_json(), "notes": notes or []})


@router.put(
    "/{tenant}/{name}", status_code=201, response_model=AdapterPublic, responses=ERRORS,
    openapi_extra={"requestBody": {"content": {
        "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
        "multipart/form-data": {"schema": {"type": "object", "properties": {
            CONFIG_FILE: {"type": "string", "format": "binary"},
            WEIGHTS_FILE: {"type": "string", "format": "binary"},
            "labels": {"type": "string", "description": "JSON list of label names (PEFT folders carry none)"},
        }}},
    }}},
)
async def put_adapter(tenant: str, name: str, request: Request, principal: Principal, adapters: AdaptersDep):
    """Upload a new version: a ptserve blob (octet-stream) or a PEFT folder (multipart, PEFT file names)."""
    adapter_id = AdapterId.of(tenant, name)
    authorize_tenant(principal, adapter_id.tenant)
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    try:
        if content_type == "application/octet-stream":
            uploaded = await adapters.put_blob(adapter_id, await request.body())
        elif content_type == "multipart/form-data":
            config_raw, weights_raw, labels = await _read_peft_form(request, adapters.limits.max_bytes)
            uploaded = await adapters.put_peft(adapter_id, config_raw, weights_raw, labels)
        else:
            return answer(UnsupportedMediaType(
                "send application/octet-stream (ptserve blob) or multipart/form-data with the PEFT files "
                f"{CONFIG_FILE!r} and {WEIGHTS_FILE!r}"
            ))
    except Exception:
        adapters_metrics(request).uploads.labels("rejected").inc()
        raise
    adapters_metrics(request).uploads.labels("accepted").inc()
    return _public(uploaded.info, uploaded.notes)


def adapters_metrics(request: Request):
    return request.app.state.ptserve.metrics


async def _read_peft_form(request: Request, max_bytes: int) -> tuple[bytes, bytes, list[str] | None]:
    form = await request.form(max_files=2, max_fields=2, max_part_size=max_bytes)
    parts = {}
    for field in (CONFIG_FILE, WEIGHTS_FILE):
        part = form.get(field)
        if not isinstance(part, UploadFile):
            raise BadRequest(f"multipart upload needs a file part named {field!r} (the PEFT folder's files)")
        parts[field] = await part.read()
    labels = None
    if (raw := form.get("labels")) is not None:
        if not isinstance(raw, str):
            raise InvalidAdapter('labels must be a form field (not a file) holding a JSON list of strings')
        labels = parse_labels(raw)
    return parts[CONFIG_FILE], parts[WEIGHTS_FILE], labels


@router.get("", response_model=AdapterList, responses=ERRORS)
async def list_adapters(
    principal: Principal,
    adapters: AdaptersDep,
    tenant: str | None = None,
    cursor: str | None = None,
    limit: int = Query(100, ge=1, le=1000),
):
    """Current adapters, by id; a tenant key sees only its own tenant's (``tenant`` defaults to it)."""
    if tenant is not None:
        check_tenant(tenant)
        authorize_tenant(principal, tenant)
    elif not principal.is_admin:
        tenant = principal.tenant
    page = await adapters.list(tenant, cursor, limit)
    return AdapterList(data=[_public(i) for i in page.items], next_cursor=page.next_cursor)


@router.get("/{tenant}/{name}", response_model=AdapterPublic, responses=ERRORS)
async def get_adapter(tenant: str, name: str, principal: Principal, adapters: AdaptersDep):
    return _public(await adapters.info(authorize(principal, AdapterId.of(tenant, name))))


@router.get(
    "/{tenant}/{name}/blob", responses={200: {"content": {"application/octet-stream": {}}}, **ERRORS},
    response_class=Response,
)
async def get_blob(tenant: str, name: str, principal: Principal, adapters: AdaptersDep):
    info, blob = await adapters.blob(authorize(principal, AdapterId.of(tenant, name)))
    return Response(
        blob, media_type="application/octet-stream",
        headers={"ETag": f'"{info.sha256}"', "X-Ptserve-Version": str(info.version)},
    )


@router.delete("/{tenant}/{name}", status_code=204, response_class=Response, responses=ERRORS)
async def delete_adapter(tenant: str, name: str, principal: Principal, adapters: AdaptersDep):
    await adapters.delete(authorize(principal, AdapterId.of(tenant, name)))
    return Response(status_code=204)
