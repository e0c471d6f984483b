"""Every endpoint of DESIGN's API contract as a ``Call`` (request + parser), shared by both clients: the
paths, the bodies the client builds (the caller's generation parameters pass through, so a newer server's
work from an older client) and what each answer parses into. Sans-IO: reading an upload's files is the only
I/O."""

from __future__ import annotations

import json
import os
from pathlib import Path
from urllib.parse import quote

from ptserve.client._core import Call
from ptserve.client.errors import PtserveClientError
from ptserve.client import types
from ptserve.client.wire.layout import BLOB_FILE, LABELS_FILE, PEFT_CONFIG_FILE, PEFT_DIR, PEFT_WEIGHTS_FILE

EVENT_STREAM = {"accept": "text/event-stream"}


def _json(cls):
    return lambda r: cls.from_json(r.json())


def adapter_path(adapter_id: str, suffix: str = "") -> str:
    # Only the shape is checked here: for the rest the server answers 400 invalid_adapter_id, naming the rule.
    tenant, sep, name = adapter_id.partition("/")
    if not sep or not tenant or not name:
        raise ValueError(f"adapter id {adapter_id!r} must be 'tenant/name'")
    return f"/v1/adapters/{quote(tenant, safe='')}/{quote(name, safe='')}{suffix}"


def tenant_path(tenant: str, suffix: str = "") -> str:
    if not tenant or "/" in tenant:
        raise ValueError(f"tenant {tenant!r} must be a non-empty name without '/'")
    return f"/v1/tenants/{quote(tenant, safe='')}{suffix}"


def drop_none(**kw) -> dict:
    return {k: v for k, v in kw.items() if v is not None}


# --- adapters -----------------------------------------------------------------------------------------------
def upload(adapter_id: str, source: bytes | str | os.PathLike, labels: list[str] | None = None) -> Call:
    """The PUT for ``source``: blob bytes, a blob file, a PEFT folder, or a ``ptserve train --out`` folder."""
    path, parse = adapter_path(adapter_id), _json(types.AdapterInfo)
    if isinstance(source, (bytes, bytearray, memoryview)):
        return _blob_upload(path, bytes(source), adapter_id)
    src = Path(source)
    if src.is_file():
        return _blob_upload(path, src.read_bytes(), adapter_id)
    if not src.is_dir():
        raise FileNotFoundError(f"{src}: no such file or folder")
    if (src / BLOB_FILE).is_file():  # a `ptserve train --out` folder: its blob carries the labels
        return _blob_upload(path, (src / BLOB_FILE).read_bytes(), adapter_id)
    folder = src / PEFT_DIR if (src / PEFT_DIR / PEFT_CONFIG_FILE).is_file() else src
    if not (folder / PEFT_CONFIG_FILE).is_file():
        raise FileNotFoundError(f"{src} holds neither {BLOB_FILE} nor a PEFT folder ({PEFT_CONFIG_FILE})")
    if labels is None and (folder / LABELS_FILE).is_file():
        labels = json.loads((folder / LABELS_FILE).read_text())
    files = {
        name: (name, (folder / name).read_bytes(), "application/octet-stream")
        for name in (PEFT_CONFIG_FILE, PEFT_WEIGHTS_FILE)
    }
    data = {"labels": json.dumps(list(labels))} if labels else None
    return Call("PUT", path, parse, files=files, data=data, adapter=adapter_id)


def _blob_upload(path: str, blob: bytes, adapter_id: str) -> Call:
    return Call("PUT", path, _json(types.AdapterInfo), content=blob,
                headers={"content-type": "application/octet-stream"}, adapter=adapter_id)


def list_adapters(tenant: str | None = None, cursor: str | None = None, limit: int | None = None) -> Call:
    params = drop_none(tenant=tenant, cursor=cursor, limit=limit)
    return Call("GET", "/v1/adapters", _json(types.AdapterPage), params=params)


def get_adapter(adapter_id: str) -> Call:
    return Call("GET", adapter_path(adapter_id), _json(types.AdapterInfo), adapter=adapter_id)


def download_adapter(adapter_id: str) -> Call:
    return Call("GET", adapter_path(adapter_id, "/blob"), lambda r: r.content, adapter=adapter_id)


def export_peft(adapter_id: str, out_dir: str | os.PathLike) -> Call:
    """The download, parsed into a PEFT folder at ``out_dir`` (its path is the result)."""
    convert = _peft_exporter()  # before the request: a client-only install says so without downloading
    call = download_adapter(adapter_id)
    call.parse = lambda r: convert(r.content, out_dir)
    return call


def _peft_exporter():
    """The blob → PEFT folder converter: it decodes tensors with torch, so it comes with the server."""
    try:
        from ptserve.adapters_store.peft_folder import blob_to_peft_folder
    except ImportError as exc:
        raise PtserveClientError(
            "export_peft converts with torch: install the server distribution (pip install ptserve), "
            "or save download_adapter()'s blob as is"
        ) from exc
    return blob_to_peft_folder


def delete_adapter(adapter_id: str) -> Call:
    return Call("DELETE", adapter_path(adapter_id), adapter=adapter_id)


# --- inference (free of side effects: resent when an answer is cut short) -----------------------------------
def classify(
    adapter: str, inputs: list[str] | str, return_logits: bool = False, truncate: bool = False
) -> Call:
    inputs = [inputs] if isinstance(inputs, str) else list(inputs)
    body = {"adapter": adapter, "inputs": inputs, "return_logits": return_logits, "truncate": truncate}
    return Call("POST", "/v1/classify", _json(types.ClassifyResult), json=body, adapter=adapter,
                side_effect_free=True)


def generate_body(adapter: str, prompt: str, stream: bool, **params) -> dict:
    return {"adapter": adapter, "prompt": prompt, **drop_none(**params), "stream": stream}


def generate(adapter: str, prompt: str, **params) -> Call:
    body = generate_body(adapter, prompt, False, **params)
    return Call("POST", "/v1/generate", _json(types.GenerateResult), json=body, adapter=adapter,
                side_effect_free=True)


def generate_stream(adapter: str, prompt: str, **params) -> Call:
    body = generate_body(adapter, prompt, True, **params)
    return Call("POST", "/v1/generate", json=body, headers=EVENT_STREAM, adapter=adapter,
                side_effect_free=True)


def completions(model: str, prompt: str | list[str], stream: bool = False, **params) -> Call:
    body = {"model": model, "prompt": prompt, **drop_none(**params), "stream": stream}
    headers = EVENT_STREAM if stream else {}
    return Call("POST", "/v1/completions", _json(types.Completion), json=body, headers=headers, adapter=model,
                side_effect_free=True)


def models() -> Call:
    return Call("GET", "/v1/models", lambda r: [types.Model.from_json(m) for m in r.json().get("data", [])])


# --- keys (admin) -------------------------------------------------------------------------------------------
def create_key(tenant: str, **params) -> Call:
    return Call(
        "POST",
        tenant_path(tenant, "/keys"),
        lambda r: types.CreatedKey.from_json(r.json(), tenant),
        json=drop_none(**params),
    )


def list_keys(tenant: str) -> Call:
    def parse(r):
        body = r.json()
        items = body.get("data", body.get("keys", [])) if isinstance(body, dict) else body
        return [types.KeyInfo.from_json(k, tenant) for k in items]

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
