"""Tenants and keys over real HTTP: 401s, the admin-only key routes, and the isolation matrix — tenant A's key
against tenant B's adapters answers exactly as for an adapter that does not exist, on every route."""
from __future__ import annotations

import time

import httpx
import pytest

from tests.factories import make_blob, running_server

ADMIN = "admin-secret-for-tests"
OCTET = {"content-type": "application/octet-stream"}


def bearer(key: str) -> dict:
    return {"authorization": f"Bearer {key}"}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    env = {"PTSERVE_STORE": f"file://{tmp_path_factory.mktemp('auth-store')}", "PTSERVE_ADMIN_KEY": ADMIN}
    with running_server(env) as url:
        yield url


@pytest.fixture(scope="module")
def admin(server):
    with httpx.Client(base_url=server, timeout=30, headers=bearer(ADMIN)) as c:
        yield c


@pytest.fixture(scope="module")
def keys(admin):
    out = {}
    for tenant in ("alpha", "bravo"):
        r = admin.post(f"/v1/tenants/{tenant}/keys", json={"name": "tests"})
        assert r.status_code == 201, r.text
        out[tenant] = r.json()["key"]
    return out


@pytest.fixture(scope="module")
def adapters(admin, minilm):
    fp = minilm.fingerprint
    for i, aid in enumerate(("alpha/a1", "bravo/b1", "bravo/b2")):
        r = admin.put(f"/v1/adapters/{aid}", content=make_blob(fp, 4, seed=i), headers=OCTET)
        assert r.status_code == 201, r.text
    return admin.get("/v1/adapters/bravo/b1").json()


def error_type(r: httpx.Response) -> str:
    return r.json()["error"]["type"]


# --- authentication ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("headers, invalid", [
    ({}, False),
    ({"authorization": "Basic dXNlcjpwYXNz"}, True),
    ({"authorization": "Bearer"}, True),
    (bearer("not-a-key"), True),
    (bearer("ptk_0123456789abcdef_" + "x" * 43), True),  # well-formed, unknown key id
    (bearer(ADMIN + "x"), True),
])
def test_missing_or_unknown_key_is_401_with_a_bearer_challenge(server, headers, invalid):
    for method, path, body in [("GET", "/v1/adapters", None), ("POST", "/v1/classify", {"adapter": "a/b", "inputs": ["x"]}),
                               ("POST", "/v1/tenants/alpha/keys", None), ("GET", "/v1/adapters/alpha/a1/blob", None)]:
        r = httpx.request(method, f"{server}{path}", json=body, headers=headers, timeout=30)
        assert r.status_code == 401, (path, r.text)
        assert error_type(r) == "unauthorized"
        assert r.headers["www-authenticate"].startswith("Bearer")
        assert ('error="invalid_token"' in r.headers["www-authenticate"]) == invalid


def test_operations_endpoints_need_no_key(server):
    for path in ("/healthz", "/readyz", "/metrics", "/openapi.json"):
        assert httpx.get(f"{server}{path}", timeout=30).status_code == 200, path


def test_openapi_declares_the_bearer_scheme(server):
    spec = httpx.get(f"{server}/openapi.json").json()
    assert any(s.get("scheme") == "bearer" for s in spec["components"]["securitySchemes"].values())


# --- keys ---------------------------------------------------------------------------------------------------
def test_keys_are_shown_once_listed_without_secrets_and_revocable(server, admin):
    created = admin.post("/v1/tenants/charlie/keys").json()
    key, key_id = created["key"], created["key_id"]
    assert key.startswith(f"ptk_{key_id}_") and len(key) > 40 and created["tenant"] == "charlie"
    listed = admin.get("/v1/tenants/charlie/keys").json()["data"]
    assert [k["key_id"] for k in listed] == [key_id]
    assert key not in str(listed) and "sha256" not in listed[0]
    assert httpx.get(f"{server}/v1/adapters", headers=bearer(key)).status_code == 200

    assert admin.delete(f"/v1/tenants/charlie/keys/{key_id}").status_code == 204
    r = httpx.get(f"{server}/v1/adapters", headers=bearer(key))
    assert r.status_code == 401 and error_type(r) == "unauthorized"
    assert admin.get("/v1/tenants/charlie/keys").json()["data"] == []
    again = admin.delete(f"/v1/tenants/charlie/keys/{key_id}")
    assert again.status_code == 404 and error_type(again) == "key_not_found"


def test_keys_are_stored_hashed(server, admin, tmp_path_factory):
    created = admin.post("/v1/tenants/delta/keys").json()
    root = next(tmp_path_factory.getbasetemp().glob("auth-store*"))
    stored = (root / ".keys" / f"{created['key_id']}.json").read_text()
    secret = created["key"].split("_", 2)[2]  # ptk_<key_id>_<secret>; the secret itself may contain "_"
    assert created["key"] not in stored and secret not in stored
    import hashlib

    assert hashlib.sha256(created["key"].encode()).hexdigest() in stored


def test_revoking_another_tenants_key_id_is_404(admin, keys):
    alpha_id = admin.get("/v1/tenants/alpha/keys").json()["data"][0]["key_id"]
    r = admin.delete(f"/v1/tenants/bravo/keys/{alpha_id}")
    assert r.status_code == 404 and error_type(r) == "key_not_found"
    assert admin.get("/v1/tenants/alpha/keys").json()["data"][0]["key_id"] == alpha_id


@pytest.mark.parametrize("method, path", [("POST", "/v1/tenants/alpha/keys"), ("GET", "/v1/tenants/alpha/keys"),
                                          ("DELETE", "/v1/tenants/alpha/keys/0123456789abcdef"),
                                          ("POST", "/v1/tenants/bravo/keys")])
def test_tenant_keys_cannot_manage_keys(server, keys, method, path):
    r = httpx.request(method, f"{server}{path}", headers=bearer(keys["alpha"]))
    assert r.status_code == 403 and error_type(r) == "forbidden"


@pytest.mark.parametrize("tenant", ["Bad", "../x", "a" * 70])
def test_key_routes_check_the_tenant_name(admin, tenant):
    assert admin.post(f"/v1/tenants/{tenant}/keys").status_code in (400, 404)


# --- isolation ----------------------------------------------------------------------------------------------
def _request(op: str, adapter_id: str, key: str, blob: bytes) -> httpx.Request:
    tenant, name = adapter_id.split("/")
    h = bearer(key)
    return {
        "classify": ("POST", "/v1/classify", {"json": {"adapter": adapter_id, "inputs": ["hello"]}}),
        "generate": ("POST", "/v1/generate", {"json": {"adapter": adapter_id, "prompt": "hi", "max_new_tokens": 1}}),
        "completions": ("POST", "/v1/completions", {"json": {"model": adapter_id, "prompt": "hi", "max_tokens": 1}}),
        "get": ("GET", f"/v1/adapters/{adapter_id}", {}),
        "blob": ("GET", f"/v1/adapters/{adapter_id}/blob", {}),
        "delete": ("DELETE", f"/v1/adapters/{adapter_id}", {}),
        "upload": ("PUT", f"/v1/adapters/{adapter_id}", {"content": blob, "headers": {**h, **OCTET}}),
    }[op], h


OPS = ["classify", "generate", "completions", "get", "blob", "delete", "upload"]


@pytest.mark.parametrize("op", OPS)
def test_isolation_matrix_another_tenants_adapter_looks_missing(server, admin, keys, adapters, minilm, op):
    """alpha's key on bravo/b1 (exists) answers exactly like alpha's key on bravo/nope (does not exist)."""
    blob = make_blob(minilm.fingerprint, 4, seed=99)
    answers = {}
    for target in ("bravo/b1", "bravo/nope"):
        (method, path, kw), h = _request(op, target, keys["alpha"], blob)
        kw = {"headers": h, **kw}
        answers[target] = httpx.request(method, f"{server}{path}", timeout=30, **kw)
    leaked, missing = answers["bravo/b1"], answers["bravo/nope"]
    assert leaked.status_code == missing.status_code, (op, leaked.text, missing.text)
    assert not leaked.is_success, (op, leaked.text)
    if op not in ("generate", "completions"):  # on an encoder backbone these refuse every adapter alike (422)
        assert leaked.status_code in (403, 404), (op, leaked.status_code, leaked.text)
    assert leaked.text.replace("bravo/b1", "bravo/nope").replace("b1", "nope") == missing.text
    assert "b2" not in leaked.text
    # bravo's adapter is untouched and still works for bravo
    assert admin.get("/v1/adapters/bravo/b1").json() == adapters
    r = httpx.post(f"{server}/v1/classify", json={"adapter": "bravo/b1", "inputs": ["hello"]},
                   headers=bearer(keys["bravo"]), timeout=30)
    assert r.status_code == 200, r.text


def test_isolation_matrix_list(server, keys, adapters):
    alpha = httpx.get(f"{server}/v1/adapters", headers=bearer(keys["alpha"])).json()["data"]
    assert [a["id"] for a in alpha] == ["alpha/a1"]
    bravo = httpx.get(f"{server}/v1/adapters", headers=bearer(keys["bravo"])).json()["data"]
    assert [a["id"] for a in bravo] == ["bravo/b1", "bravo/b2"]
    r = httpx.get(f"{server}/v1/adapters", params={"tenant": "bravo"}, headers=bearer(keys["alpha"]))
    assert r.status_code == 403 and "bravo/b" not in r.text
    paged = httpx.get(f"{server}/v1/adapters", params={"limit": 1, "cursor": "alpha/a1"},
                      headers=bearer(keys["alpha"])).json()
    assert paged["data"] == []
    # the OpenAI-compatible listing: the bare encoder (embeddings) for everyone, and the caller's own adapters
    models = httpx.get(f"{server}/v1/models", headers=bearer(keys["alpha"])).json()["data"]
    assert [(m["id"], m["owned_by"]) for m in models] == [("minilm", "ptserve"), ("alpha/a1", "alpha")]


def test_a_tenant_key_manages_its_own_adapters(server, keys, minilm):
    h = {**bearer(keys["alpha"]), **OCTET}
    r = httpx.put(f"{server}/v1/adapters/alpha/own", content=make_blob(minilm.fingerprint, 4, seed=5), headers=h)
    assert r.status_code == 201, r.text
    c = httpx.post(f"{server}/v1/classify", json={"adapter": "alpha/own", "inputs": ["a", "b"]},
                   headers=bearer(keys["alpha"]), timeout=30)
    assert c.status_code == 200 and len(c.json()["predictions"]) == 2
    assert httpx.get(f"{server}/v1/adapters/alpha/own/blob", headers=bearer(keys["alpha"])).status_code == 200
    assert httpx.delete(f"{server}/v1/adapters/alpha/own", headers=bearer(keys["alpha"])).status_code == 204


def test_admin_reaches_every_tenant(admin, adapters):
    ids = [a["id"] for a in admin.get("/v1/adapters").json()["data"]]
    assert {"alpha/a1", "bravo/b1", "bravo/b2"} <= set(ids)
    assert admin.get("/v1/adapters/bravo/b1/blob").status_code == 200


# --- replicas sharing a store ---------------------------------------------------------------------------------
@pytest.mark.slow
def test_keys_are_shared_and_revocation_reaches_every_replica_within_a_second(redis_server, minilm):
    import uuid

    env = {"PTSERVE_STORE": f"{redis_server}?prefix=t{uuid.uuid4().hex[:12]}", "PTSERVE_ADMIN_KEY": ADMIN}
    with running_server(env) as a, running_server(env) as b:
        created = httpx.post(f"{a}/v1/tenants/echo/keys", headers=bearer(ADMIN)).json()
        key = created["key"]
        up = httpx.put(f"{b}/v1/adapters/echo/x", content=make_blob(minilm.fingerprint, 4), timeout=30,
                       headers={**bearer(key), **OCTET})
        assert up.status_code == 201, up.text  # a key made on replica a works on replica b at once
        for url in (a, b):
            assert httpx.get(f"{url}/v1/adapters", headers=bearer(key)).status_code == 200
        assert httpx.delete(f"{a}/v1/tenants/echo/keys/{created['key_id']}", headers=bearer(ADMIN)).status_code == 204
        revoked_at = time.monotonic()
        assert httpx.get(f"{a}/v1/adapters", headers=bearer(key)).status_code == 401  # at once where revoked
        while httpx.get(f"{b}/v1/adapters", headers=bearer(key)).status_code != 401:
            assert time.monotonic() - revoked_at < 1.0, "replica b still honours a revoked key after 1 s"
            time.sleep(0.02)


# --- the authenticator, in process ----------------------------------------------------------------------------
class FlakyKeys:
    """A key store stub counting lookups; ``down`` makes it raise like an unreachable store."""

    def __init__(self, records):
        self.records, self.calls, self.down = dict(records), 0, False

    async def get(self, key_id):
        from ptserve.adapters_store.errors import StoreUnavailable

        self.calls += 1
        if self.down:
            raise StoreUnavailable("down")
        return self.records.get(key_id)


async def test_authenticator_caches_for_its_ttl_then_sees_revocation():
    from ptserve.adapters_store.keys import new_key
    from ptserve.server.auth import Authenticator, Unauthorized

    key, record = new_key("acme")
    keys = FlakyKeys({record.key_id: record})
    auth = Authenticator("root", keys, ttl_s=0.2)
    assert (await auth.authenticate(f"Bearer {key}")).tenant == "acme"
    assert (await auth.authenticate(f"bearer {key}")).tenant == "acme" and keys.calls == 1  # cached
    assert (await auth.authenticate("Bearer root")).is_admin
    del keys.records[record.key_id]  # revoked elsewhere
    time.sleep(0.25)
    with pytest.raises(Unauthorized):
        await auth.authenticate(f"Bearer {key}")
    with pytest.raises(Unauthorized):  # right id, wrong secret
        await auth.authenticate(f"Bearer {key[:-4]}abcd")


async def test_authenticator_keeps_known_keys_through_a_store_outage_only():
    from ptserve.adapters_store.errors import StoreUnavailable
    from ptserve.adapters_store.keys import new_key
    from ptserve.server.auth import Authenticator

    known, record = new_key("acme")
    unseen, other = new_key("acme")
    keys = FlakyKeys({record.key_id: record, other.key_id: other})
    auth = Authenticator("root", keys, ttl_s=0)
    assert (await auth.authenticate(f"Bearer {known}")).tenant == "acme"
    keys.down = True
    assert (await auth.authenticate(f"Bearer {known}")).tenant == "acme"
    with pytest.raises(StoreUnavailable):
        await auth.authenticate(f"Bearer {unseen}")


async def test_open_server_lets_everyone_in_and_authorize_hides_other_tenants():
    from ptserve.adapters_store.errors import AdapterNotFound
    from ptserve.server.auth import Authenticator, Forbidden, Identity, authorize, authorize_tenant

    assert (await Authenticator(None, None).authenticate(None)).is_admin
    alpha = Identity("tenant", "alpha", "0123456789abcdef")
    assert str(authorize(alpha, "alpha/x")) == "alpha/x"
    with pytest.raises(AdapterNotFound, match="adapter bravo/x not found"):
        authorize(alpha, "bravo/x")
    with pytest.raises(Forbidden):
        authorize_tenant(alpha, "bravo")


# --- generation routes on a decoder backbone ---------------------------------------------------------------------
@pytest.mark.slow
def test_isolation_on_generation_routes(tmp_path_factory):
    from ptserve.server.backbone import load_backbone
    from tests.factories import CHAT_TEMPLATE, save_tiny_decoder

    model = save_tiny_decoder("gpt2", tmp_path_factory.mktemp("gpt2-auth"), chat_template=CHAT_TEMPLATE)
    fp = load_backbone(str(model), device="cpu", dtype="float32").fingerprint
    env = {"PTSERVE_STORE": f"file://{tmp_path_factory.mktemp('gen-auth')}", "PTSERVE_BACKBONE": str(model),
           "PTSERVE_ADMIN_KEY": ADMIN}
    with running_server(env) as url:
        keys = {t: httpx.post(f"{url}/v1/tenants/{t}/keys", headers=bearer(ADMIN)).json()["key"]
                for t in ("alpha", "bravo")}
        for aid in ("alpha/g", "bravo/g"):
            r = httpx.put(f"{url}/v1/adapters/{aid}", content=make_blob(fp, 4, task="generate"),
                          headers={**bearer(ADMIN), **OCTET}, timeout=30)
            assert r.status_code == 201, r.text
        own = httpx.post(f"{url}/v1/generate", json={"adapter": "alpha/g", "prompt": "hi", "max_new_tokens": 2},
                         headers=bearer(keys["alpha"]), timeout=60)
        assert own.status_code == 200, own.text
        chat = httpx.post(f"{url}/v1/chat/completions", json=_gen_body("/v1/chat/completions", "model", "alpha/g"),
                          headers=bearer(keys["alpha"]), timeout=60)
        assert chat.status_code == 200 and chat.json()["model"] == "alpha/g", chat.text
        for path, field in (("/v1/generate", "adapter"), ("/v1/completions", "model"),
                            ("/v1/chat/completions", "model")):
            answers = [httpx.post(f"{url}{path}", json=_gen_body(path, field, target), headers=bearer(keys["alpha"]),
                                  timeout=60)
                       for target in ("bravo/g", "bravo/nope")]
            assert answers[0].status_code == answers[1].status_code == 404, [a.text for a in answers]
            assert answers[0].text.replace("bravo/g", "bravo/nope") == answers[1].text
        models = httpx.get(f"{url}/v1/models", headers=bearer(keys["alpha"])).json()
        assert [m["id"] for m in models["data"]] == ["alpha/g"]


def _gen_body(path: str, field: str, target: str) -> dict:
    if path == "/v1/chat/completions":
        return {field: target, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    if path == "/v1/completions":
        return {field: target, "prompt": "hi", "max_tokens": 2}
    return {field: target, "prompt": "hi", "max_new_tokens": 2}
