"""Hostile inputs against real servers (issue 10): for every route, bodies with extreme numbers, deep nesting, bad
encodings, control characters, wrong types and oversized fields answer 4xx — never 5xx — and the servers stay
healthy and keep answering right. Table-driven: ``CASES`` is built from each route's fields and kinds.

Two ``ptserve serve`` processes run the table: an encoder (MiniLM: adapters, classify, tenant keys, models,
operations) and a tiny GPT-2 decoder (generate, SSE, completions). Both have an admin key, so auth runs too.
Regression tests for the findings close the file: lone surrogates (3), ids with a final newline (4), adapters
a backbone can never serve (7).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest

from ptserve.adapters_store.peft_folder import CONFIG_FILE, WEIGHTS_FILE, read_peft_folder, write_peft_folder
from ptserve.server.backbone import load_backbone
from tests.factories import make_adapter, make_blob, save_tiny_decoder, server_process

ADMIN = "hostile-admin-key"
AUTH = {"authorization": f"Bearer {ADMIN}"}
JSON_CT = {"content-type": "application/json"}
OCTET = {"content-type": "application/octet-stream"}
MAX_BODY_BYTES = 256 << 10
MAX_ADAPTER_BYTES = 2_000_000
SENTINEL = "\x00sentinel\x00"


# --- the table -------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Case:
    id: str
    target: str  # "encoder" | "decoder"
    method: str
    path: str
    body: bytes | None = None
    headers: dict = field(default_factory=dict)
    strict: bool = True  # True: must be 4xx; False: must not be 5xx (the input is odd but may be valid)


@dataclass(frozen=True)
class Route:
    target: str
    path: str
    body: dict  # a valid body
    kinds: dict  # field -> kind (what values it takes), for the mutations below


ROUTES = {
    "classify": Route("encoder", "/v1/classify",
                      {"adapter": "acme/clf", "inputs": ["good"], "return_logits": False, "truncate": False},
                      {"adapter": "id", "inputs": "texts", "return_logits": "bool", "truncate": "bool"}),
    "generate": Route("decoder", "/v1/generate",
                      {"adapter": "acme/gen", "prompt": "the", "max_new_tokens": 2, "temperature": 0.5,
                       "top_p": 0.9, "top_k": 5, "seed": 1, "stop": ["zz"], "stream": False},
                      {"adapter": "id", "prompt": "text", "max_new_tokens": "int", "temperature": "float",
                       "top_p": "float", "top_k": "int", "seed": "int?", "stop": "texts0", "stream": "bool"}),
    "generate-sse": Route("decoder", "/v1/generate",
                          {"adapter": "acme/gen", "prompt": "the", "max_new_tokens": 2, "stream": True},
                          {"adapter": "id", "prompt": "text", "max_new_tokens": "int"}),
    "completions": Route("decoder", "/v1/completions",
                         {"model": "acme/gen", "prompt": "the", "max_tokens": 2, "temperature": 0.5, "top_p": 0.9,
                          "n": 1, "stream": False, "stop": "zz", "seed": 1, "echo": False, "best_of": 1,
                          "user": "u"},
                         {"model": "id", "prompt": "prompt", "max_tokens": "int?", "temperature": "float?",
                          "top_p": "float?", "n": "int?", "stream": "bool?", "stop": "text?|texts0",
                          "seed": "int?", "echo": "bool?", "best_of": "int?", "user": "text?"}),
    "tenant-keys": Route("encoder", "/v1/tenants/acme/keys", {"name": "ci"}, {"name": "text"}),
    "embeddings": Route("encoder", "/v1/embeddings",
                        {"model": "acme/clf", "input": ["good"], "encoding_format": "float", "truncate": False},
                        {"model": "id", "input": "text|texts", "encoding_format": "enum", "truncate": "bool"}),
}

# refused by the JSON reader whatever the field: must be 4xx everywhere
JSON_LEVEL = {"nan": "NaN", "inf": "Infinity", "-inf": "-Infinity", "1e400": "1e400", "-1e999": "-1e999",
              "int-400-digits": "9" * 400, "nest-100k": "[" * 100_000 + "]" * 100_000, "nest-40": "[" * 40 + "]" * 40,
              "lone-high": '"\\ud800"', "lone-low": '"\\udfff x"', "high-then-text": '"\\ud83dx"'}
# valid JSON, extreme: 4xx for fields that are not numbers; for numbers the schema decides (never a 5xx)
EXTREME_NUMBERS = {"1e308": "1e308", "-1e308": "-1e308", "-0": "-0", "-0.0": "-0.0", "2^64": str(2**64),
                   "-2^63": str(-2**63), "10^99": "1" + "0" * 99, "5e-324": "5e-324", "1e-300": "1e-300",
                   "1e-40": "1e-40"}  # the tiny ones: sampling's temperature and top-p (issue 10 finding 1)
WRONG = {  # kind -> {case: raw JSON}: values that kind never takes
    "id": {"null": "null", "int": "1", "bool": "true", "list": '["acme/clf"]', "obj": "{}", "nl": '"acme/x\\n"',
           "nul": '"acme/x\\u0000"', "esc": '"acme\\u001b/x"', "ls": '"acme/x\\u2028"', "bom": '"\\ufeffacme/x"',
           "accent": '"acme/\\u00e9"', "long": json.dumps("acme/" + "n" * 5000), "no-slash": '"acme"'},
    "text": {"null": "null", "int": "1", "bool": "false", "list": '["x"]', "obj": '{"a": 1}'},
    "texts": {"null": "null", "str": '"x"', "int": "1", "obj": "{}", "ints": "[1, 2]", "nulls": "[null]",
              "nested": '[["x"]]', "empty": "[]", "10k": json.dumps(["x"] * 10_000)},
    "texts0": {"null": "null", "str": '"x"', "ints": "[1]", "nested": '[["x"]]', "nine": json.dumps(["s"] * 9),
               "too-long": json.dumps(["s" * 65]), "blank": '[""]'},
    "bool": {"null": "null", "str": '"maybe"', "int": "2", "float": "0.5", "list": "[]", "obj": "{}"},
    "int": {"null": "null", "str": '"abc"', "float": "1.5", "list": "[1]", "obj": "{}"},
    "float": {"null": "null", "str": '"abc"', "list": "[0.5]", "obj": "{}"},
}
WRONG["text|texts"] = {k: v for k, v in WRONG["texts"].items() if k != "str"}
WRONG["enum"] = {"null": "null", "other": '"hex"', "int": "1", "list": '["float"]', "upper": '"FLOAT"'}
WRONG["text?"] = {k: v for k, v in WRONG["text"].items() if k != "null"}
WRONG["int?"] = {k: v for k, v in WRONG["int"].items() if k != "null"}
WRONG["float?"] = {k: v for k, v in WRONG["float"].items() if k != "null"}
WRONG["bool?"] = {k: v for k, v in WRONG["bool"].items() if k != "null"}
# /v1/completions' prompt: a text, a list of texts, token ids or lists of them (OpenAI's four forms)
WRONG["prompt"] = {"null": "null", "int": "1", "empty": "[]", "obj": "{}", "floats": "[1.5]", "mixed": '["a", 1]',
                   "negative-id": "[-1]", "huge-id": "[99999999]", "empty-ids": "[[]]"}
WRONG["text?|texts0"] = {"int": "1", "ints": "[1]", "obj": "{}", "nine": json.dumps(["s"] * 9)}
ODD_TEXT = {  # valid text that tokenizers and logs must survive: not a 5xx (most answer 200)
    "nul": '"a\\u0000b"', "esc": '"\\u001b[2J\\u001b[31m"', "crlf": '"a\\r\\nb"', "ls": '"\\u2028\\u2029"',
    "nonchar": '"\\ufffe\\uffff"', "astral": '"\\udbff\\udfff\\ud83d\\ude00"', "rtl": '"\\u202e\\u200b"',
    "long-accents": json.dumps("é" * 3000),
}


def _body(route: Route, name: str, raw: str) -> bytes:
    body = {**route.body, name: SENTINEL}
    return json.dumps(body).replace(json.dumps(SENTINEL), raw).encode()


def _json_cases() -> list[Case]:
    cases = []
    for rname, route in ROUTES.items():
        def add(cid: str, body: bytes, strict: bool = True, headers=JSON_CT) -> None:
            cases.append(Case(f"{rname}:{cid}", route.target, "POST", route.path, body, {**AUTH, **headers}, strict))

        first = next(iter(route.kinds))
        for cid, raw in JSON_LEVEL.items():
            add(f"{first}={cid}", _body(route, first, raw))
        for name, kind in route.kinds.items():
            numeric = kind.startswith(("int", "float", "bool"))  # pydantic takes 0 and 1 for false and true
            for cid, raw in EXTREME_NUMBERS.items():
                add(f"{name}={cid}", _body(route, name, raw), strict=not numeric)
            for cid, raw in WRONG[kind].items():
                add(f"{name}={cid}", _body(route, name, raw))
            if kind.startswith("text") and kind != "texts0":
                for cid, raw in ODD_TEXT.items():
                    value = f"[{raw}]" if kind == "texts" else raw
                    add(f"{name}={cid}", _body(route, name, value), strict=False)
        # the body as a whole
        for cid, raw in {"empty": b"", "null": b"null", "list": b"[]", "int": b"1", "str": b'"x"', "open": b"{",
                         "nothing": b"{}", "trailing": json.dumps(route.body).encode() + b" x",
                         "bom": b"\xef\xbb\xbf" + json.dumps(route.body).encode(),
                         "utf16": json.dumps(route.body).encode("utf-16"),
                         "bad-utf8": json.dumps(route.body).encode().replace(b'"', b'"\xff', 1),
                         "overlong": json.dumps(route.body).encode().replace(b'"', b'"\xc0\xaf', 1),
                         "cesu-surrogate": json.dumps(route.body).encode().replace(b'"', b'"\xed\xa0\x80', 1),
                         "nest-100k": b"[" * 100_000 + b"]" * 100_000,
                         "5000-keys": json.dumps({**route.body, **{f"k{i}": i for i in range(5000)}}).encode(),
                         "over-body-limit": json.dumps({**route.body, "pad": "x" * MAX_BODY_BYTES}).encode(),
                         }.items():
            valid = (rname == "completions" and cid == "5000-keys"  # it ignores fields it does not know
                     or rname == "tenant-keys" and cid in ("empty", "null", "nothing")  # its body is optional
                     or cid == "bom")  # a UTF-8 byte order mark may be ignored (RFC 8259)
            add(f"body={cid}", raw, strict=not valid)
        add("content-type=text", json.dumps(route.body).encode(), headers={"content-type": "text/plain"})
        add("content-type=none", json.dumps(route.body).encode(), headers={})
        add("content-type=form", json.dumps(route.body).encode(),
            headers={"content-type": "application/x-www-form-urlencoded"})
    return cases


def _oversized_cases() -> list[Case]:
    gen, clf = ROUTES["generate"], ROUTES["classify"]
    return [
        Case("classify:input-200k-chars", "encoder", "POST", clf.path,
             _body(clf, "inputs", json.dumps(["word " * 40_000])), {**AUTH, **JSON_CT}),
        Case("generate:prompt-100001-chars", "decoder", "POST", gen.path,
             _body(gen, "prompt", json.dumps("a" * 100_001)), {**AUTH, **JSON_CT}),
        Case("generate:max_new_tokens-over-limit", "decoder", "POST", gen.path,
             _body(gen, "max_new_tokens", "4097"), {**AUTH, **JSON_CT}),
        Case("completions:prompt-200k-chars", "decoder", "POST", "/v1/completions",
             _body(ROUTES["completions"], "prompt", json.dumps("the " * 50_000)), {**AUTH, **JSON_CT}),
        Case("tenant-keys:name-201-chars", "encoder", "POST", "/v1/tenants/acme/keys",
             json.dumps({"name": "n" * 201}).encode(), {**AUTH, **JSON_CT}),
    ]


BAD_TENANTS = ["acme%0A", "%0Aacme", "acme%0D", "acme%00", "acme%1B", "acme%7F", "acme%FF", "acme%ED%A0%80",
               "acme%C0%AF", "acme%E2%80%A8", "ACME", "acme%20x", "-acme", "a" * 200, "%2E%2E", "acme%09"]
BAD_NAMES = ["x%0A", "x%0D%0A", "x%00", "x%1B", "x%7F", "x%FF", "x%ED%A0%80", "x%C0%AF", "x%E2%80%A8", "%2E%2E",
             ".x", "-x", "x%20y", "x%09", "n" * 5000, "x%2Fy"]


def _path_cases(blob: bytes) -> list[Case]:
    cases = []
    ids = [f"acme/{n}" for n in BAD_NAMES] + [f"{t}/x" for t in BAD_TENANTS]
    for aid in ids:
        cases += [Case(f"adapters:PUT:{aid[:40]}", "encoder", "PUT", f"/v1/adapters/{aid}", blob, {**AUTH, **OCTET}),
                  Case(f"adapters:GET:{aid[:40]}", "encoder", "GET", f"/v1/adapters/{aid}", None, AUTH),
                  Case(f"adapters:blob:{aid[:40]}", "encoder", "GET", f"/v1/adapters/{aid}/blob", None, AUTH),
                  Case(f"adapters:DELETE:{aid[:40]}", "encoder", "DELETE", f"/v1/adapters/{aid}", None, AUTH)]
    for t in BAD_TENANTS:
        cases += [Case(f"keys:POST:{t[:40]}", "encoder", "POST", f"/v1/tenants/{t}/keys", b"{}", {**AUTH, **JSON_CT}),
                  Case(f"keys:GET:{t[:40]}", "encoder", "GET", f"/v1/tenants/{t}/keys", None, AUTH),
                  Case(f"adapters:list:tenant={t[:40]}", "encoder", "GET", f"/v1/adapters?tenant={t}", None, AUTH)]
    for k in ["0123456789abcdef%0A", "0123456789abcdef%00", "%FF" * 8, "k" * 5000, "..%2F..%2Fetc", "0123456789ABCDEF"]:
        cases.append(Case(f"keys:DELETE:{k[:40]}", "encoder", "DELETE", f"/v1/tenants/acme/keys/{k}", None, AUTH))
    for q in ["limit=1e308", "limit=-0", "limit=NaN", "limit=Infinity", "limit=" + "9" * 400, "limit=0",
              "limit=-1", "limit=abc", "limit=", "limit=1001"]:
        cases.append(Case(f"adapters:list:{q[:40]}", "encoder", "GET", f"/v1/adapters?{q}", None, AUTH))
    for q in ["cursor=%00", "cursor=%FF%FE", "cursor=" + "c" * 5000, "cursor=acme%2F..", "tenant=acme&cursor=%0A"]:
        cases.append(Case(f"adapters:list:{q[:40]}", "encoder", "GET", f"/v1/adapters?{q}", None, AUTH, strict=False))
    blob_body_cases = {"empty": b"", "nest-100k": (100_000).to_bytes(8, "little") + b"[" * 100_000,
                       "over-limit": b"\0" * (MAX_ADAPTER_BYTES + (64 << 10) + 1)}
    for cid, body in blob_body_cases.items():
        cases.append(Case(f"adapters:PUT-body:{cid}", "encoder", "PUT", "/v1/adapters/acme/hostile", body,
                          {**AUTH, **OCTET}))
    cases.append(Case("adapters:PUT-multipart-garbage", "encoder", "PUT", "/v1/adapters/acme/hostile",
                      b"--x\r\nContent-Disposition: form-data; name=\"a\"\r\n\r\n" + b"\xff" * 100,
                      {**AUTH, "content-type": "multipart/form-data; boundary=x"}))
    # operations and listing answer whatever the query (not a 5xx); a method they lack is 405
    for target in ("encoder", "decoder"):
        for path in ["/healthz?x=%00", "/readyz?%FF=%0A", "/metrics?name[]=1e308", "/v1/models?x=NaN",
                     "/v1/adapters?tenant=acme&limit=1"]:
            cases.append(Case(f"{target}:GET:{path}", target, "GET", path, None, AUTH, strict=False))
        for path in ["/healthz", "/readyz", "/metrics", "/v1/models"]:
            cases.append(Case(f"{target}:POST:{path}", target, "POST", path, b"[" * 100_000, {**AUTH, **JSON_CT}))
    # the key itself
    for cid, value in {"latin1": b"Bearer \xff\xfe\xfd", "long": b"Bearer " + b"k" * 10_000,
                       "basic": b"Basic Zm9vOmJhcg==", "empty": b"Bearer", "ctl": b"Bearer \x01\x7f",
                       "unknown-tenant-key": b"Bearer ptk_0123456789abcdef_" + b"a" * 43}.items():
        cases.append(Case(f"auth:{cid}", "encoder", "GET", "/v1/adapters", None, {"authorization": value}))
    for cid, value in {"latin1": b"id\xff\xfe", "long": b"r" * 10_000, "spaces": b"a b c"}.items():
        cases.append(Case(f"request-id:{cid}", "encoder", "GET", "/v1/adapters", None,
                          {**AUTH, "x-request-id": value}, strict=False))
    return cases


def _all_cases() -> list[Case]:
    blob = b"placeholder"  # the PUT cases get a valid blob at run time (the bad id is what they test)
    return _json_cases() + _oversized_cases() + _path_cases(blob)


CASES = _all_cases()
assert len({c.id for c in CASES}) == len(CASES), "case ids must be unique"


# --- the servers -----------------------------------------------------------------------------------------------
def _tree(root: Path) -> list[str]:
    """The adapter store's files (tenant keys, which some cases create, live apart in .keys/)."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.relative_to(root).parts[0] != ".keys")


@pytest.fixture(scope="module")
def servers(tmp_path_factory, minilm):
    enc_store = tmp_path_factory.mktemp("hostile-enc")
    gpt2 = save_tiny_decoder("gpt2", tmp_path_factory.mktemp("hostile-gpt2"))
    gpt2_fp = load_backbone(str(gpt2), device="cpu", dtype="float32").fingerprint
    common = {"PTSERVE_ADMIN_KEY": ADMIN, "PTSERVE_MAX_BODY_BYTES": str(MAX_BODY_BYTES),
              "PTSERVE_MAX_ADAPTER_BYTES": str(MAX_ADAPTER_BYTES), "PTSERVE_REQUEST_TIMEOUT_S": "20"}
    with server_process({**common, "PTSERVE_STORE": f"file://{enc_store}"}) as enc, \
            server_process({**common, "PTSERVE_STORE": f"file://{tmp_path_factory.mktemp('hostile-dec')}",
                            "PTSERVE_BACKBONE": str(gpt2), "PTSERVE_MAX_SEQ_TOKENS": "200"}) as dec:
        clf_blob = make_blob(minilm.fingerprint, 4, seed=3)
        for url, aid, blob in ((enc.url, "acme/clf", clf_blob),
                               (dec.url, "acme/gen", make_blob(gpt2_fp, 3, seed=4, task="generate"))):
            r = httpx.put(f"{url}/v1/adapters/{aid}", content=blob, headers={**AUTH, **OCTET}, timeout=30)
            assert r.status_code == 201, r.text
        ns = SimpleNamespace(encoder=enc, decoder=dec, enc_store=enc_store, clf_blob=clf_blob,
                             gpt2=gpt2, gpt2_fp=gpt2_fp)
        ns.reference = _reference_answers(ns)
        ns.enc_tree = _tree(enc_store)
        yield ns


def _reference_answers(ns) -> dict:
    """A classify and a greedy generate answer, to compare with after the table ran."""
    clf = httpx.post(f"{ns.encoder.url}/v1/classify", headers=AUTH, timeout=60,
                     json={"adapter": "acme/clf", "inputs": ["a fine day", "awful"], "return_logits": True})
    gen = httpx.post(f"{ns.decoder.url}/v1/generate", headers=AUTH, timeout=60,
                     json={"adapter": "acme/gen", "prompt": "the quick", "max_new_tokens": 8, "temperature": 0})
    assert clf.status_code == gen.status_code == 200, (clf.text, gen.text)
    return {"classify": clf.json(), "generate": gen.json()}


def _send(ns, case: Case) -> httpx.Response:
    server = getattr(ns, case.target)
    body = ns.clf_blob if case.body == b"placeholder" else case.body
    with httpx.Client(base_url=server.url, timeout=60) as c:
        return c.request(case.method, case.path, content=body, headers=case.headers)


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_hostile_input_is_refused_and_the_server_stays_healthy(servers, case):
    r = _send(servers, case)
    assert r.status_code < 500, (r.status_code, r.text[:500])
    if case.strict:
        assert 400 <= r.status_code < 500, (r.status_code, r.text[:500])
        body = r.json()
        assert set(body) == {"error"} and set(body["error"]) == {"type", "message"}, body
        assert body["error"]["message"], body
    assert httpx.get(f"{getattr(servers, case.target).url}/readyz", timeout=10).status_code == 200


# --- regressions for the findings ------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("target,path,body", [
    ("encoder", "/v1/classify", {"adapter": "acme/clf", "inputs": ["ok", "\ud800"]}),
    ("encoder", "/v1/classify", {"adapter": "acme/clf", "inputs": ["\udfff"]}),
    ("decoder", "/v1/generate", {"adapter": "acme/gen", "prompt": "\ud800", "max_new_tokens": 2}),
    ("decoder", "/v1/completions", {"model": "acme/gen", "prompt": "x\ud800", "max_tokens": 2}),
    ("decoder", "/v1/completions", {"model": "acme/gen", "prompt": "x", "stop": "\ud800"}),
    ("encoder", "/v1/tenants/acme/keys", {"name": "\ud800"}),
    ("encoder", "/v1/embeddings", {"model": "acme/clf", "input": "\ud800"}),
    ("encoder", "/v1/embeddings", {"model": "minilm", "input": ["ok", "\udbff"]}),
])
def test_a_lone_surrogate_is_refused_the_same_way_on_every_route(servers, target, path, body):
    """Finding 3: classify answered 500 (the tokenizer cannot encode it) where generate answered 422."""
    raw = json.dumps(body).encode()  # json.dumps writes a lone surrogate as the escape "\ud800"
    r = httpx.post(f"{getattr(servers, target).url}{path}", content=raw, headers={**AUTH, **JSON_CT}, timeout=30)
    assert r.status_code == 422, r.text
    assert r.json()["error"]["type"] == "invalid_request"
    assert "lone surrogate" in r.json()["error"]["message"] and "valid Unicode" in r.json()["error"]["message"]


@pytest.mark.slow
def test_ids_with_a_final_newline_are_refused_and_nothing_is_stored(servers):
    """Finding 4: '$' matched before a final newline: acme/nl\\n was stored and listed, a store directory
    'acme\\n' made, and a key created for tenant 'acme\\n'."""
    url, blob = servers.encoder.url, servers.clf_blob
    before = _tree(servers.enc_store)
    for path in ("/v1/adapters/acme/nl%0A", "/v1/adapters/acme%0A/nl", "/v1/adapters/acme/nl%0D%0A"):
        r = httpx.put(f"{url}{path}", content=blob, headers={**AUTH, **OCTET}, timeout=30)
        assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_adapter_id", r.text
    r = httpx.post(f"{url}/v1/tenants/acme%0A/keys", headers=AUTH, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_adapter_id", r.text
    assert httpx.get(f"{url}/v1/tenants/acme%0A/keys", headers=AUTH).status_code == 400
    listed = [a["id"] for a in httpx.get(f"{url}/v1/adapters", headers=AUTH).json()["data"]]
    assert not any("\n" in x or "\r" in x for x in listed), listed
    assert _tree(servers.enc_store) == before and not (servers.enc_store / "acme\n").exists()


def test_a_request_id_with_a_final_newline_is_replaced(tmp_path):
    """Finding 4 for ``X-Request-ID`` (checked in the ASGI middleware: HTTP parsers never pass a newline, but
    the app must not rely on the server in front of it)."""
    import asyncio

    from ptserve.server.api.app import create_app
    from ptserve.server.settings import Settings

    app = create_app(Settings(store=f"file://{tmp_path}"))
    sent = []

    async def call(request_id: bytes) -> bytes:
        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET",
                 "scheme": "http", "path": "/healthz", "raw_path": b"/healthz", "query_string": b"",
                 "root_path": "", "headers": [(b"host", b"x"), (b"x-request-id", request_id)],
                 "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 2)}
        messages = [{"type": "http.request", "body": b"", "more_body": False}]

        async def receive():
            return messages.pop(0) if messages else {"type": "http.disconnect"}

        async def send(message):
            sent.append(message)

        await app(scope, receive, send)
        start = next(m for m in sent[::-1] if m["type"] == "http.response.start")
        return dict(start["headers"])[b"x-request-id"]

    assert asyncio.run(call(b"trace-1")) == b"trace-1"
    for bad in (b"trace-1\n", b"trace-1\r\n", b"trace\n-1"):
        got = asyncio.run(call(bad))
        assert got != bad and b"\n" not in got and len(got) == 32, got


@pytest.mark.slow
def test_adapters_a_backbone_can_never_serve_are_refused_at_upload(servers, minilm, tmp_path):
    """Finding 7: a CAUSAL_LM PEFT folder was stored by an encoder server (201) and every use answered 422;
    the same for a classify adapter on a decoder server. Refused at upload, with the reason, nothing stored."""
    def peft(fp, task: str) -> dict:
        folder = write_peft_folder(make_adapter(fp, 3, seed=1, task=task), tmp_path / f"{task}-{fp.model_type}")
        cfg, weights = read_peft_folder(folder)
        return {CONFIG_FILE: (CONFIG_FILE, cfg), WEIGHTS_FILE: (WEIGHTS_FILE, weights)}

    uploads = [
        (servers.encoder.url, {"files": peft(minilm.fingerprint, "generate")}, "CAUSAL_LM", "'classify'"),
        (servers.encoder.url, {"content": make_blob(minilm.fingerprint, 3, task="generate"), "headers": OCTET},
         "CAUSAL_LM", "'classify'"),
        (servers.decoder.url, {"files": peft(servers.gpt2_fp, "classify")}, "SEQ_CLS", "'generate'"),
        (servers.decoder.url, {"content": make_blob(servers.gpt2_fp, 3), "headers": OCTET},
         "SEQ_CLS", "'generate'"),
    ]
    for url, kw, task_type, serves in uploads:
        headers = {**AUTH, **kw.pop("headers", {})}
        r = httpx.put(f"{url}/v1/adapters/acme/never", headers=headers, timeout=30, **kw)
        assert r.status_code == 422 and r.json()["error"]["type"] == "invalid_adapter", r.text
        message = r.json()["error"]["message"]
        assert "cannot be served here" in message and task_type in message and f"serves only {serves}" in message
        assert httpx.get(f"{url}/v1/adapters/acme/never", headers=AUTH).status_code == 404


# --- after the table ---------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_after_the_table_the_servers_answer_as_before_and_logged_no_server_error(servers):
    assert _reference_answers(servers) == servers.reference  # same labels, scores, logits and tokens
    assert _tree(servers.enc_store) == servers.enc_tree  # no hostile PUT stored anything
    for server in (servers.encoder, servers.decoder):
        lines = [json.loads(x) for x in server.log_lines() if x.startswith("{")]
        errors = [x for x in lines if x.get("level") in ("error", "critical")
                  or x.get("status", 0) >= 500 and x.get("path") != "/readyz"]  # 503 while the backbone loaded
        assert not errors, errors[:3]


async def test_every_json_operation_reads_its_body_through_untrusted_json(tmp_path):
    """One place for every route that takes text: each operation of the OpenAPI spec with a JSON body refuses a
    lone surrogate with the reader's message (a router added without ``JSONBodyRoute`` would parse it with plain
    ``json.loads`` and let it through to the tokenizer). In process: the body is read before the backbone is
    needed."""
    from ptserve.server.api.app import create_app
    from ptserve.server.settings import Settings

    app = create_app(Settings(store=f"file://{tmp_path}"))
    operations = [(method, path) for path, ops in app.openapi()["paths"].items() for method, op in ops.items()
                  if "application/json" in op.get("requestBody", {}).get("content", {})]
    assert len(operations) >= 4, operations  # classify, generate, completions, tenant keys
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://x") as client:
        for method, path in operations:
            url = path.replace("{tenant}", "acme").replace("{name}", "x").replace("{key_id}", "0" * 16)
            r = await client.request(method.upper(), url, content=b'{"a": "\\ud800"}', headers=JSON_CT)
            assert r.status_code == 422 and "lone surrogate" in r.json()["error"]["message"], (path, r.text)
