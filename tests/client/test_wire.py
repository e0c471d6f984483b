"""The wire module is what client and server share, each thing defined once: one ``AdapterInfo`` for the
stores, the API and the client (the API's JSON round-trips through it); one class per API error type, raised
by the server and by the client for the same answer; and the bodies the client builds are ones the server's
request models accept, the results it reads fields the server's response models have."""

from __future__ import annotations

import dataclasses
import json

import httpx
import pytest

from ptserve.adapters_store.format import encode_blob
from ptserve.client import Client, calls
from ptserve.client.errors import NotFoundError, error_from_response
from ptserve.client.types import ClassifyResult, Completion, GenerateResult, Model, Prediction
from ptserve.client.wire import errors as wire_errors
from ptserve.client.wire.records import AdapterInfo, AdapterPage
from tests.client.conftest import ADMIN
from tests.factories import make_adapter


def test_one_adapter_info_for_stores_api_and_client():
    from ptserve.adapters_store import store
    from ptserve.client import types
    from ptserve.server.api import schemas

    assert store.AdapterInfo is types.AdapterInfo is AdapterInfo
    assert issubclass(schemas.AdapterPublic, AdapterInfo) and not set(vars(schemas.AdapterPublic)) & {
        f.name for f in dataclasses.fields(AdapterInfo)
    }  # the API's schema name only: no field of its own


def test_the_apis_adapter_json_round_trips_through_the_record(server, minilm):
    blob = encode_blob(make_adapter(minilm.fingerprint, 3, seed=21))
    with Client(server, ADMIN) as c:
        uploaded = c.upload("wire/one", blob)
    headers = {"authorization": f"Bearer {ADMIN}"}
    shown = httpx.get(f"{server}/v1/adapters/wire/one", headers=headers).json()
    listed = httpx.get(f"{server}/v1/adapters", params={"tenant": "wire"}, headers=headers).json()
    assert list(shown) == [f.name for f in dataclasses.fields(AdapterInfo)]  # the record's fields, in order
    info = AdapterInfo.from_json(shown)
    assert info.raw is shown and info.to_json() == shown and info == uploaded
    page = AdapterPage.from_json(listed)
    assert page.data == [info] and page.next_cursor is None and page.to_json() == listed


def test_records_keep_what_a_newer_server_adds_in_raw_only():
    sent = {"id": "a/b", "version": 2, "sha256": "0" * 64, "task": "classify", "num_virtual_tokens": 4,
            "labels": ["x"], "bytes": 10, "created_at": "2026-12-01T00:00:00.000Z", "region": "eu"}
    info = AdapterInfo.from_json(sent)
    assert info.raw["region"] == "eu" and "region" not in info.to_json() and info.notes == []
    built = dataclasses.replace(info, notes=["n"])
    assert built.raw == built.to_json() and built.raw["notes"] == ["n"]  # built here: its own JSON


def test_the_openapi_schema_is_the_records(server):
    doc = httpx.get(f"{server}/openapi.json").json()
    schema = doc["components"]["schemas"]["AdapterPublic"]
    names = [f.name for f in dataclasses.fields(AdapterInfo)]
    required = [f.name for f in dataclasses.fields(AdapterInfo) if f.default_factory is dataclasses.MISSING]
    assert list(schema["properties"]) == names and schema["required"] == required
    assert schema["properties"]["notes"]["description"] == "Warnings about the upload, e.g. base model name."
    assert doc["components"]["schemas"]["AdapterList"]["properties"]["data"]["items"] == {
        "$ref": "#/components/schemas/AdapterPublic"
    }


# --- errors -------------------------------------------------------------------------------------------------
def api_error_classes():
    seen, todo = [], [wire_errors.APIError]
    while todo:
        cls = todo.pop()
        seen.append(cls)
        todo.extend(cls.__subclasses__())
    return seen


def type_classes():
    """One class per error type of the API (the base's ``http_error`` is any other answer's)."""
    return [c for c in api_error_classes() if "type" in vars(c) and c is not wire_errors.APIError]


def test_every_api_error_type_is_defined_once_in_the_wire_module():
    import ptserve.server.api.app  # noqa: F401  (the whole server: every error class it raises is loaded)
    import ptserve.server.api.routes_tenants  # noqa: F401

    classes = api_error_classes()
    assert [c for c in classes if c.__module__ != wire_errors.__name__] == []
    typed = type_classes()
    assert len({c.type for c in typed}) == len(typed) > 20
    from ptserve.adapters_store.keys import KeyNotFound
    from ptserve.server.auth import Unauthorized
    from ptserve.server.limits import QueueFull

    assert (KeyNotFound, Unauthorized, QueueFull) == (
        wire_errors.KeyNotFound, wire_errors.Unauthorized, wire_errors.QueueFull)


@pytest.mark.parametrize("cls", type_classes(), ids=lambda c: c.type)
def test_a_client_raises_the_class_the_server_raised(cls):
    body = json.dumps({"error": {"type": cls.type, "message": "why"}}).encode()
    err = error_from_response(cls.status, {"X-Request-ID": "r1", "Retry-After": "3"}, body)
    assert type(err) is cls
    assert (err.status, err.type, err.message, err.request_id) == (cls.status, cls.type, "why", "r1")
    unknown = error_from_response(cls.status, {}, b'{"error": {"type": "new_kind", "message": "m"}}')
    assert type(unknown) is wire_errors.error_class(cls.status, "") and isinstance(err, type(unknown))


def test_a_type_under_another_status_gets_the_status_class():
    body = json.dumps({"error": {"type": "adapter_not_found", "message": "proxy"}}).encode()
    assert type(error_from_response(502, {}, body)) is wire_errors.InternalServerError
    assert type(error_from_response(418, {}, body)) is wire_errors.APIError


def test_the_live_servers_errors_arrive_as_its_own_classes(server):
    with Client(server, ADMIN) as c:
        with pytest.raises(wire_errors.AdapterNotFound) as missing:
            c.get_adapter("wire/missing")
        with pytest.raises(wire_errors.InvalidAdapterId):
            c.get_adapter("Bad Tenant/x")
        with pytest.raises(wire_errors.InvalidRequest):
            c.classify("wire/missing", [])
    with Client(server, "not-a-key") as c, pytest.raises(wire_errors.Unauthorized):
        c.list_adapters()
    assert isinstance(missing.value, NotFoundError) and missing.value.request_id


def test_server_side_errors_build_their_headers():
    assert wire_errors.QueueFull("busy", retry_after=2.2).headers == {"Retry-After": "3"}
    assert wire_errors.QueueFull("busy", retry_after=500).retry_after == 60
    challenge = wire_errors.Unauthorized("no", invalid=True).header("www-authenticate")
    assert challenge.startswith("Bearer") and challenge.endswith('error="invalid_token"')
    assert wire_errors.Draining().headers == {"Retry-After": "1", "Connection": "close"}


# --- the bodies the client builds and the results it reads --------------------------------------------------
def test_the_bodies_the_client_builds_are_ones_the_server_accepts():
    from ptserve.server.api.routes_tenants import KeyCreate
    from ptserve.server.api.schemas import ClassifyRequest
    from ptserve.server.api.schemas_generate import GenerateRequest
    from ptserve.server.api.schemas_openai import CompletionRequest

    every = dict(max_new_tokens=5, temperature=0.5, top_p=0.9, top_k=3, seed=1, stop=["\n"])
    bodies = [
        (ClassifyRequest, calls.classify("a/b", ["x"], return_logits=True, truncate=True)),
        (GenerateRequest, calls.generate("a/b", "hi", **every)),
        (GenerateRequest, calls.generate_stream("a/b", "hi", **every)),
        (CompletionRequest, calls.completions("a/b", "hi", max_tokens=4, temperature=0, seed=2, stop="\n")),
        (KeyCreate, calls.create_key("acme", name="ci")),
    ]
    for model, call in bodies:
        model.model_validate(call.json)  # raises on a field the server does not know (extra="forbid")
        assert set(call.json) <= set(model.model_fields), (model, call.json)


def test_the_results_the_client_reads_are_fields_the_server_answers():
    from ptserve.server.api.schemas import ClassifyResponse
    from ptserve.server.api.schemas import Prediction as PredictionModel
    from ptserve.server.api.schemas_generate import GenerateResponse
    from ptserve.server.api.schemas_openai import Completion as CompletionModel
    from ptserve.server.api.schemas_openai import ModelCard

    for record, model in [(ClassifyResult, ClassifyResponse), (Prediction, PredictionModel),
                          (GenerateResult, GenerateResponse), (Model, ModelCard), (Completion, CompletionModel)]:
        assert {f.name for f in dataclasses.fields(record)} <= set(model.model_fields), record
    assert {f.name for f in dataclasses.fields(Completion)} >= {"id", "model", "choices", "usage"}
