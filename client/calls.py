"""Every endpoint of DESIGN's API contract as a ``Call`` (request + parser), shared by both clients."""

from __future__ import annotations

import os
from urllib.parse import quote

from ptserve.client._core import Call, adapter_path, drop_none, tenant_path, upload_call
from ptserve.client.types import (
    AdapterInfo,
    AdapterPage,
    ClassifyResult,
    Completion,
    CreatedKey,
    GenerateResult,
    KeyInfo,
    Model,
)


def _json(cls):
    return lambda r: cls.from_json(r.json())


# --- adapters -----------------------------------------------------------------------------------------------
def upload(adapter_id: str, source: bytes | str | os.PathLike, labels: list[str] | None = None) -> Call:
    return upload_call(adapter_id, source, labels, _json(AdapterInfo))


def list_adapters(tenant: str | None = None, cursor: str | None = None, limit: int | None = None) -> Call:
    return Call(
        "GET", "/v1/adapters", _json(AdapterPage), params=drop_none(tenant=tenant, cursor=cursor, limit=limit)
    )


def get_adapter(adapter_id: str) -> Call:
    return Call("GET", adapter_path(adapter_id), _json(AdapterInfo), adapter=adapter_id)


def download_adapter(adapter_id: str) -> Call:
    return Call("GET", adapter_path(adapter_id, "/blob"), lambda r: r.content, adapter=adapter_id)


def delete_adapter(adapter_id: str) -> Call:
    return Call("DELETE", adapter_path(adapter_id), adapter=adapter_id)


# --- inference ----------------------------------------------------------------------------------------------
def classify(
    adapter: str, inputs: list[str] | str, return_logits: bool = False, truncate: bool = False
) -> Call:
    inputs = [inputs] if isinstance(inputs, str) else list(inputs)
    body = {"adapter": adapter, "inputs": inputs, "return_logits": return_logits, "truncate": truncate}
    return Call("POST", "/v1/classify", _json(ClassifyResult), json=body, adapter=adapter,
                side_effect_free=True)


def generate_body(adapter: str, prompt: str, stream: bool, **params) -> dict:
    return {"adapter": adapter, "prompt": prompt, **drop_none(**params), "stream": stream}


def generate(adapter: str, prompt: str, **params) -> Call:
    return Call(
        "POST", "/v1/generate", _json(GenerateResult), json=generate_body(adapter, prompt, False, **params),
        adapter=adapter, side_effect_free=True,
    )


def generate_stream(adapter: str, prompt: str, **params) -> Call:
    return Call(
        "POST",
        "/v1/generate",
        json=generate_body(adapter, prompt, True, **params),
        headers={"accept": "text/event-stream"},
        adapter=adapter,
        side_effect_free=True,  # resent only before the stream starts: no event is ever repeated
    )


def completions(model: str, prompt: str | list[str], stream: bool = False, **params) -> Call:
    body = {"model": model, "prompt": prompt, **drop_none(**params), "stream": stream}
    headers = {"accept": "text/event-stream"} if stream else {}
    return Call("POST", "/v1/completions", _json(Completion), json=body, headers=headers, adapter=model,
                side_effect_free=True)


def models() -> Call:
    return Call("GET", "/v1/models", lambda r: [Model.from_json(m) for m in r.json().get("data", [])])


# --- keys (admin) -------------------------------------------------------------------------------------------
def create_key(tenant: str, **params) -> Call:
    return Call(
        "POST",
        tenant_path(tenant, "/keys"),
        lambda r: CreatedKey.from_json(r.json(), tenant),
        json=drop_none(**params),
    )


def list_keys(tenant: str) -> Call:
    def parse(r):
        body = r.json()
        items = body.get("data", body.get("keys", [])) if isinstance(body, dict) else body
        return [KeyInfo.from_json(k, tenant) for k in items]

    return Call("GET", tenant_path(tenant, "/keys"), parse)


def revoke_key(tenant: str, key_id: str) -> Call:
    return Call("DELETE", tenant_path(tenant, f"/keys/{quote(key_id, safe='')}"))


# --- operations ---------------------------------------------------------------------------------------------
def health() -> Call:
    return Call("GET", "/healthz", lambda r: r.json())


def ready() -> Call:
    return Call("GET", "/readyz", lambda r: r.json(), retry=False)


def metrics() -> Call:
    return Call("GET", "/metrics", lambda r: r.text)
