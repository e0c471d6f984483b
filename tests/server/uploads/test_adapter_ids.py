"""Adapter ids in upload, read and delete paths: every bad or path-escaping id is refused with a 4xx and
nothing is stored, also not outside the store."""
from __future__ import annotations

import json

import pytest

from tests.factories import make_blob
from tests.server.uploads.http_checks import OCTET, Snapshot, assert_error, raw_http


# --- bad ids ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("path,statuses,type_", [
    ("%2E%2E/x", {400}, "invalid_adapter_id"),  # tenant '..'
    ("Acme/x", {400}, "invalid_adapter_id"),  # uppercase tenant
    ("a/%2E%2E", {400}, "invalid_adapter_id"),  # name '..'
    ("acme/a..b", {400}, "invalid_adapter_id"),
    ("acme/.hidden", {400}, "invalid_adapter_id"),
    ("acme/x%00y", {400}, "invalid_adapter_id"),
    ("acme/" + "n" * 200, {400}, "invalid_adapter_id"),
    ("-acme/x", {400}, "invalid_adapter_id"),
    ("acme/a%2Fb", {400, 404}, None),  # an encoded slash makes a third path segment
    ("acme%2Fx/y", {400, 404}, None),
    ("acme/..%2F..%2Fescape", {400, 404}, None),
])
def test_bad_adapter_id_is_refused_and_nothing_is_stored(server, client, fp, path, statuses, type_):
    snap = Snapshot(server, client)
    r = client.put(f"/v1/adapters/{path}", content=make_blob(fp, 1), headers=OCTET)  # a valid blob: only the id is bad
    assert r.status_code in statuses, (r.status_code, r.text)
    assert_error(r, r.status_code, type_ or r.json()["error"]["type"])
    snap.unchanged()
    assert not (server.root / "escape").exists() and not (server.root / "x").exists()


def test_literal_dot_dot_in_the_path_is_refused(server, client, fp):
    blob = make_blob(fp, 1)
    snap = Snapshot(server, client)
    for path in ("/v1/adapters/../x", "/v1/adapters/acme/.."):
        status, body = raw_http(server.url, (
            f"PUT {path} HTTP/1.1\nHost: x\nContent-Type: application/octet-stream\n"
            f"Content-Length: {len(blob)}\nConnection: close\n"), blob)
        assert status == 400, (path, status, body)
        assert json.loads(body)["error"]["type"] == "invalid_adapter_id"
    snap.unchanged()


def test_bad_id_on_read_and_delete_is_refused(client):
    assert_error(client.get("/v1/adapters/Acme/x"), 400, "invalid_adapter_id", "'Acme'")
    assert_error(client.get("/v1/adapters/acme/%2E%2E/blob"), 400, "invalid_adapter_id")
    assert_error(client.delete("/v1/adapters/acme/a..b"), 400, "invalid_adapter_id")
    assert_error(client.get("/v1/adapters", params={"tenant": "../etc"}), 400, "invalid_adapter_id")
