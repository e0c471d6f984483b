"""``FastClassify`` (``/v1/classify`` without FastAPI's router) answers exactly what the FastAPI route answers.

Two apps in this process on the same tiny encoder, store contents and keys: one with the shortcut (the server's
default), one without (every request through the route). Every request below — well-formed ones the shortcut
serves, and bad ones it hands to the route (other content types, broken JSON, wrong shapes) or answers itself
(auth, unknown adapters, wrong task, too many or too long inputs) — must get the same status, headers and body
from both, plus every classify case of the hostile-input table. The request metrics still count the shortcut's
requests under the route's label.
"""
from __future__ import annotations

import asyncio
import json
from contextlib import AsyncExitStack

import httpx
import pytest
from starlette.responses import Response

from ptserve.server import hf_compat
from ptserve.server.api import routes_classify
from ptserve.server.api.app import create_app
from ptserve.server.api.fast_classify import FastClassify
from ptserve.server.backbone import fingerprint_from_config, resolve_path
from ptserve.server.settings import Settings
from tests.factories import make_blob, save_tiny_encoder
from tests.server.test_hostile_inputs import CASES as HOSTILE

ADMIN = {"authorization": "Bearer fast-admin"}
JSON_CT = {"content-type": "application/json"}
MAX_INPUTS = 4


def _body(**fields) -> bytes:
    return json.dumps({"adapter": "acme/clf", "inputs": ["a fine day"], **fields}).encode()


def _cases(key: str, other_key: str) -> list[tuple[str, str, bytes, dict]]:
    """(id, method, body, headers) on /v1/classify."""
    auth = {"authorization": f"Bearer {key}", **JSON_CT}
    long_text = " ".join(["word"] * 400)
    return [
        ("one input", "POST", _body(), auth),
        ("several inputs with logits", "POST", _body(inputs=["good", "bad", "héllo ✓"], return_logits=True), auth),
        ("charset parameter", "POST", _body(), {**auth, "content-type": "application/json; charset=utf-8"}),
        ("upper-case media type", "POST", _body(), {**auth, "content-type": "Application/JSON"}),
        ("truncated long input", "POST", _body(inputs=[long_text], truncate=True), auth),
        ("long input refused", "POST", _body(inputs=[long_text]), auth),
        ("admin key", "POST", _body(), {**ADMIN, **JSON_CT}),
        ("too many inputs", "POST", _body(inputs=["x"] * (MAX_INPUTS + 1)), auth),
        ("unknown adapter", "POST", _body(adapter="acme/nope"), auth),
        ("another tenant's adapter", "POST", _body(), {"authorization": f"Bearer {other_key}", **JSON_CT}),
        ("embedding adapter", "POST", _body(adapter="acme/emb"), auth),
        ("malformed adapter id", "POST", _body(adapter="acme"), auth),
        ("no key", "POST", _body(), JSON_CT),
        ("wrong key", "POST", _body(), {"authorization": "Bearer ptk_0123456789abcdef_" + "a" * 43, **JSON_CT}),
        ("wrong key and bad body", "POST", b"{", {"authorization": "Bearer nope", **JSON_CT}),
        ("text/plain", "POST", _body(), {**auth, "content-type": "text/plain"}),
        ("no content type", "POST", _body(), {"authorization": f"Bearer {key}"}),
        ("empty body", "POST", b"", auth),
        ("broken JSON", "POST", b'{"adapter": ', auth),
        ("NaN literal", "POST", b'{"adapter": "acme/clf", "inputs": ["x"], "x": NaN}', auth),
        ("extra field", "POST", _body(temperature=1), auth),
        ("empty inputs", "POST", _body(inputs=[]), auth),
        ("inputs not a list", "POST", _body(inputs="x"), auth),
        ("a list body", "POST", b'["acme/clf"]', auth),
        ("lone surrogate", "POST", b'{"adapter": "acme/clf", "inputs": ["\\ud800"]}', auth),
        ("GET", "GET", b"", auth),
    ]


@pytest.fixture(scope="module")
def apps(tmp_path_factory):
    """(fast app, routed app, tenant key, other tenant's key), both serving, on one event loop."""
    root = tmp_path_factory.mktemp("fast-classify")
    tiny = save_tiny_encoder("bert", root / "tiny", resolve_path("minilm"))
    fp = fingerprint_from_config(hf_compat.load_config(str(tiny), True))
    loop = asyncio.new_event_loop()
    stack = AsyncExitStack()

    async def start():
        made, keys = [], {}
        for fast in (True, False):
            settings = Settings(backbone=str(tiny), store=f"file://{root / f'store-{fast}'}", admin_key="fast-admin",
                                dtype="float32", threads=1, max_wait_ms=0, max_inputs_per_request=MAX_INPUTS)
            app = create_app(settings, fast_classify=fast)
            await stack.enter_async_context(app.router.lifespan_context(app))
            while not app.state.ptserve.ready.is_set():
                await asyncio.sleep(0.02)
            client = await stack.enter_async_context(
                httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://test"))
            for tenant in ("acme", "other"):
                r = await client.post(f"/v1/tenants/{tenant}/keys", headers=ADMIN)
                assert r.status_code == 201, r.text
                keys.setdefault(tenant, []).append(r.json()["key"])
            octet = {**ADMIN, "content-type": "application/octet-stream"}
            for name, blob in {"clf": make_blob(fp, 4, seed=1), "emb": make_blob(fp, 4, seed=2, task="embed")}.items():
                r = await client.put(f"/v1/adapters/acme/{name}", content=blob, headers=octet)
                assert r.status_code == 201, r.text
            made.append((client, app))
        return made, keys

    ((fast, fast_app), (routed, _)), keys = loop.run_until_complete(start())
    fast.app = fast_app  # for the test of the shortcut alone
    yield loop, fast, routed, keys
    loop.run_until_complete(stack.aclose())
    loop.close()


def _same(loop, fast, routed, method, path, body, headers_fast, headers_routed):
    async def both():
        return [await c.request(method, path, content=body, headers={**h, "x-request-id": "parity"})
                for c, h in ((fast, headers_fast), (routed, headers_routed))]

    a, b = loop.run_until_complete(both())
    drop = {"x-ptserve-replica"}  # each app names its own replica; everything else must match
    return (a.status_code, {k: v for k, v in a.headers.items() if k not in drop}, a.content), \
           (b.status_code, {k: v for k, v in b.headers.items() if k not in drop}, b.content)


def test_every_request_gets_the_routes_answer(apps):
    loop, fast, routed, keys = apps
    cases = _cases(keys["acme"][0], keys["other"][0])
    statuses = set()
    for cid, method, body, headers in cases:
        # the two apps issued different keys: each is asked with its own, everything else alike
        headers_routed = {k: v.replace(keys["acme"][0], keys["acme"][1]).replace(keys["other"][0], keys["other"][1])
                          for k, v in headers.items()}
        a, b = _same(loop, fast, routed, method, "/v1/classify", body, headers, headers_routed)
        assert a == b, cid
        statuses.add(a[0])
    # the table covers what it claims: answers, auth, not found, validation, too many, wrong method
    assert {200, 401, 404, 405, 422}.issubset(statuses), statuses


def test_hostile_classify_cases_get_the_routes_answer(apps):
    loop, fast, routed, keys = apps
    cases = [c for c in HOSTILE if c.path == "/v1/classify"]
    assert len(cases) > 20
    for case in cases:
        headers = {**case.headers, "authorization": "Bearer fast-admin"}
        a, b = _same(loop, fast, routed, case.method, case.path, case.body or b"", headers, headers)
        assert a == b, case.id
        assert 400 <= a[0] < 500 or not case.strict, case.id


def test_shortcut_requests_are_counted_under_the_route(apps):
    loop, fast, _, keys = apps
    auth = {"authorization": f"Bearer {keys['acme'][0]}", **JSON_CT}

    async def scrape_after():
        before = (await fast.get("/metrics")).text
        assert (await fast.post("/v1/classify", content=_body(), headers=auth)).status_code == 200
        return before, (await fast.get("/metrics")).text

    before, after = loop.run_until_complete(scrape_after())

    def count(text: str) -> float:
        lines = [line for line in text.splitlines() if line.startswith("ptserve_requests_total{")
                 and 'endpoint="/v1/classify"' in line and 'status_class="2xx"' in line]
        return sum(float(line.rsplit(" ", 1)[1]) for line in lines)

    assert count(after) == count(before) + 1


def test_well_formed_requests_skip_the_router_and_the_rest_reach_it(apps):
    """The shortcut alone (its inner app a recorder): a well-formed request is answered without the inner app;
    a body it does not take reaches the inner app whole, as sent."""
    loop, fast, _, keys = apps
    state = fast.app.state.ptserve
    route = next(r for r in routes_classify.router.routes if r.path == "/v1/classify")
    reached: list[bytes] = []

    async def inner(scope, receive, send):
        reached.append((await receive())["body"])
        await Response(b"inner", 299)(scope, receive, send)

    shortcut = httpx.AsyncClient(transport=httpx.ASGITransport(FastClassify(inner, state, route)),
                                 base_url="http://test")
    auth = {"authorization": f"Bearer {keys['acme'][0]}", **JSON_CT}

    async def ask():
        good = await shortcut.post("/v1/classify", content=_body(), headers=auth)
        bad = await shortcut.post("/v1/classify", content=b'{"adapter": 1}', headers=auth)
        other = await shortcut.post("/v1/classify/", content=_body(), headers=auth)
        return good, bad, other

    good, bad, other = loop.run_until_complete(ask())
    assert good.status_code == 200 and good.json()["adapter"] == "acme/clf"
    assert (bad.status_code, other.status_code) == (299, 299)
    assert reached == [b'{"adapter": 1}', _body()]
