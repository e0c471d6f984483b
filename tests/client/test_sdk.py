"""The SDK against a real ``ptserve serve`` over HTTP (every endpoint, typed results and errors), and against
a
scripted server for what a healthy ptserve rarely answers on cue (429/503 with Retry-After, broken
streams)."""

from __future__ import annotations

import asyncio
import hashlib
import time
from email.utils import formatdate

import httpx
import pytest
import torch

from ptserve.adapters_store.format import encode_blob
from ptserve.client import calls
from ptserve.client import (
    APIConnectionError,
    AsyncClient,
    AuthenticationError,
    BadRequestError,
    Client,
    InternalServerError,
    NotFoundError,
    RateLimitError,
    RetryPolicy,
    ServiceUnavailableError,
    StreamError,
    UnprocessableEntityError,
)
from ptserve.client.sse import SSEDecoder, iter_events
from ptserve.client.wire.errors import parse_retry_after
from ptserve.adapters_store.peft_folder import blob_to_adapter
from ptserve.client.types import AdapterInfo, ClassifyResult, Completion, CreatedKey, GenerateResult, KeyInfo, Model
from tests.client.conftest import ADMIN, CUT_SHORT, error_body
from tests.factories import free_port, make_adapter

TEXTS = ["The waiter was lovely.", "Cold soup, rude staff.", "The shop opens at nine."]
FAST = RetryPolicy(max_retries=3, backoff=0.01, max_backoff=0.05)


@pytest.fixture(scope="module")
def fp(minilm):
    return minilm.fingerprint


def admin(url) -> Client:
    return Client(url, ADMIN)


# --- adapters -----------------------------------------------------------------------------------------------
def test_adapter_lifecycle(server, fp, tmp_path):
    blob = encode_blob(make_adapter(fp, 6, seed=1))
    (tmp_path / "a.safetensors").write_bytes(blob)
    with admin(server) as c:
        first = c.upload("sdk/life", blob)
        assert isinstance(first, AdapterInfo) and first.version == 1 and first.task == "classify"
        assert first.num_virtual_tokens == 6 and first.labels == ["negative", "neutral", "positive"]
        second = c.upload("sdk/life", tmp_path / "a.safetensors")  # a file path: a new version
        assert second.version == 2 and second.sha256 == hashlib.sha256(blob).hexdigest()
        c.upload("sdk/other", blob)
        assert c.get_adapter("sdk/life").version == 2
        page = c.list_adapters(tenant="sdk", limit=1)
        assert len(page.data) == 1 and page.next_cursor
        assert [i.id for i in c.iter_adapters("sdk", page_size=1)] == ["sdk/life", "sdk/other"]
        assert c.download_adapter("sdk/life") == blob
        c.delete_adapter("sdk/life")
        with pytest.raises(NotFoundError) as err:
            c.get_adapter("sdk/life")
        assert (
            err.value.status == 404
            and err.value.type == "adapter_not_found"
            and "sdk/life" in err.value.message
        )
        with pytest.raises(NotFoundError):
            c.delete_adapter("sdk/life")


def test_peft_export_and_folder_upload_round_trip(server, fp, tmp_path):
    with admin(server) as c:
        c.upload("sdk/native", encode_blob(make_adapter(fp, 5, seed=2, labels=("no", "yes"))))
        folder = c.export_peft("sdk/native", tmp_path / "peft")
        assert sorted(p.name for p in folder.iterdir()) == [
            "adapter_config.json",
            "adapter_model.safetensors",
            "labels.json",
        ]
        info = c.upload("sdk/from-peft", folder)  # labels come from labels.json
        assert info.labels == ["no", "yes"] and info.num_virtual_tokens == 5
        relabelled = c.upload("sdk/relabelled", folder, labels=["neg", "pos"])
        assert relabelled.labels == ["neg", "pos"]
        a = c.classify("sdk/native", TEXTS, return_logits=True)
        b = c.classify("sdk/from-peft", TEXTS, return_logits=True)
    assert [p.logits for p in a.predictions] == [p.logits for p in b.predictions]


def test_classify_typed_result(server, fp):
    with admin(server) as c:
        c.upload("sdk/cls", encode_blob(make_adapter(fp, 4, seed=3)))
        res = c.classify("sdk/cls", TEXTS, return_logits=True)
        single = c.classify("sdk/cls", TEXTS[0])
    assert isinstance(res, ClassifyResult) and res.adapter == "sdk/cls" and res.version == 1
    assert len(res.predictions) == 3 and res.usage["input_tokens"] > 0
    p = res.predictions[0]
    assert p.label in p.scores and p.score == pytest.approx(max(p.scores.values()))
    assert len(p.logits) == 3 and single.predictions[0].logits is None
    assert single.predictions[0].label == p.label


def test_server_errors_arrive_typed_with_the_servers_message(server, fp):
    with admin(server) as c:
        c.upload("sdk/err", encode_blob(make_adapter(fp, 8, seed=4)))
        with pytest.raises(UnprocessableEntityError) as err:
            c.classify("sdk/err", ["word " * 600])
        assert err.value.type == "input_too_long" and "truncate=true" in err.value.message
        assert c.classify("sdk/err", ["word " * 600], truncate=True).predictions
        with pytest.raises(NotFoundError) as err:
            c.classify("sdk/missing", ["x"])
        assert err.value.type == "adapter_not_found"
        with pytest.raises(UnprocessableEntityError) as err:
            c.upload("sdk/garbage", b"\x00" * 64)
        assert err.value.type == "invalid_adapter"
        with pytest.raises(BadRequestError) as err:
            c.get_adapter("Bad Tenant/x")
        assert err.value.type == "invalid_adapter_id"
        with pytest.raises(UnprocessableEntityError) as err:
            c.classify("sdk/err", [])
        assert err.value.type == "invalid_request"
    with pytest.raises(ValueError, match="must be 'tenant/name'"):
        Client(server).get_adapter("no-slash")
    with pytest.raises(FileNotFoundError):
        Client(server).upload("sdk/x", "/nonexistent/adapter")


def test_auth_and_keys(server, fp):
    with Client(server) as anonymous, pytest.raises(AuthenticationError) as err:
        anonymous.list_adapters()
    assert err.value.status == 401 and err.value.type == "unauthorized"
    with Client(server, "wrong-key") as wrong, pytest.raises(AuthenticationError):
        wrong.list_adapters()
    with admin(server) as c:
        c.upload("globex/secret", encode_blob(make_adapter(fp, 3, seed=5)))
        created = c.create_key("acme", name="ci")
        assert isinstance(created, CreatedKey) and created.key and created.tenant == "acme" and created.id
        listed = c.list_keys("acme")
        assert all(isinstance(k, KeyInfo) for k in listed) and created.id in [k.id for k in listed]
        assert all(created.key not in k.describe() for k in listed)  # the secret is never listed
    with Client(server, created.key) as tenant:
        info = tenant.upload("acme/mine", encode_blob(make_adapter(fp, 3, seed=6)))
        assert info.id == "acme/mine"
        assert {i.id.split("/")[0] for i in tenant.iter_adapters()} == {"acme"}
        with pytest.raises(NotFoundError):  # another tenant's adapter looks missing
            tenant.get_adapter("globex/secret")
        with pytest.raises(Exception) as denied:
            tenant.create_key("acme")
        assert getattr(denied.value, "status", None) in (401, 403)
    with admin(server) as c:
        c.revoke_key("acme", created.id)
        assert created.id not in [k.id for k in c.list_keys("acme")]
    with Client(server, created.key) as revoked, pytest.raises(AuthenticationError):
        revoked.list_adapters()


def test_operations_endpoints(server):
    with Client(server) as c:
        assert c.health() == {"status": "ok"}
        assert c.ready()["status"] in ("ready", "degraded")
        assert "ptserve_" in c.metrics()


async def test_async_client_covers_the_same_calls(server, fp, tmp_path):
    blob = encode_blob(make_adapter(fp, 4, seed=7))
    async with AsyncClient(server, ADMIN) as c:
        info = await c.upload("async/one", blob)
        assert info.version == 1
        assert (await c.get_adapter("async/one")).sha256 == info.sha256
        assert [i.id async for i in c.iter_adapters("async")] == ["async/one"]
        assert (await c.download_adapter("async/one")) == blob
        folder = await c.export_peft("async/one", tmp_path / "peft")
        assert (await c.upload("async/two", folder)).labels == info.labels
        res, again = await asyncio.gather(c.classify("async/one", TEXTS), c.classify("async/two", TEXTS))
        assert [p.label for p in res.predictions] == [p.label for p in again.predictions]
        key = await c.create_key("async")
        assert key.id in [k.id for k in await c.list_keys("async")]
        await c.revoke_key("async", key.id)
        await c.delete_adapter("async/one")
        with pytest.raises(NotFoundError):
            await c.get_adapter("async/one")
        assert (await c.health())["status"] == "ok" and "ptserve_" in await c.metrics()
        assert (await c.ready())["status"] in ("ready", "degraded")
    async with AsyncClient(server) as anonymous:
        with pytest.raises(AuthenticationError):
            await anonymous.list_adapters()


# --- generation (tiny GPT-2 server) -------------------------------------------------------------------------
def test_generate_json_stream_completions_and_models(gen_server):
    url, aid = gen_server
    with admin(url) as c:
        res = c.generate(aid, "the quick brown", max_new_tokens=8, temperature=0)
        assert (
            isinstance(res, GenerateResult) and res.adapter == aid and res.finish_reason in ("stop", "length")
        )
        assert res.usage["completion_tokens"] >= 1
        events = list(c.generate_stream(aid, "the quick brown", max_new_tokens=8, temperature=0))
        assert "".join(e.text for e in events) == res.text
        assert events[-1].finish_reason == res.finish_reason and events[-1].data["usage"] == res.usage
        seeded = [c.generate(aid, "hello", max_new_tokens=6, temperature=1.0, seed=42).text for _ in range(2)]
        assert seeded[0] == seeded[1]
        comp = c.completions(aid, "the quick brown", max_tokens=8, temperature=0)
        assert isinstance(comp, Completion) and comp.model == aid and comp.choices[0].text == res.text
        chunks = list(c.completions_stream(aid, "the quick brown", max_tokens=8, temperature=0))
        assert "".join(ch.text for ch in chunks) == res.text and chunks[-1].finish_reason == res.finish_reason
        models = c.models()
        assert all(isinstance(m, Model) for m in models) and aid in [m.id for m in models]
        with pytest.raises(NotFoundError):  # a stream that fails before its first event raises like a call
            list(c.generate_stream("acme/missing", "hi"))
        with pytest.raises(UnprocessableEntityError) as err:
            c.generate(aid, "hi", max_new_tokens=0)
        assert err.value.type == "invalid_request" and "max_new_tokens" in err.value.message


async def test_async_generation(gen_server):
    url, aid = gen_server
    async with AsyncClient(url, ADMIN) as c:
        res = await c.generate(aid, "hello world", max_new_tokens=6, temperature=0)
        text = "".join(
            [e.text async for e in c.generate_stream(aid, "hello world", max_new_tokens=6, temperature=0)]
        )
        assert text == res.text
        comp = await c.completions(aid, "hello world", max_tokens=6, temperature=0)
        assert comp.choices[0].text == res.text
        assert (
            "".join(
                [e.text async for e in c.completions_stream(aid, "hello world", max_tokens=6, temperature=0)]
            )
            == res.text
        )
        assert aid in [m.id for m in await c.models()]


# --- retries (scripted server) ------------------------------------------------------------------------------
def test_429_waits_for_retry_after_then_succeeds(scripted):
    scripted.script(
        (429, {"Retry-After": "1"}, error_body("rate_limited", "slow down")),
        (503, {"Retry-After": "0"}, error_body("not_ready", "loading")),
        (200, {}, {"status": "ok"}),
    )
    with Client(scripted.url, retry=FAST) as c:
        assert c.health() == {"status": "ok"}
    assert len(scripted.requests) == 3
    assert scripted.times[1] - scripted.times[0] >= 0.95  # Retry-After: 1 honoured, not the 10 ms backoff


def test_post_is_retried_on_429_with_the_same_body(scripted):
    scripted.script(
        (429, {"Retry-After": "0"}, error_body("rate_limited", "busy")),
        (200, {}, {"adapter": "a/b", "version": 1, "predictions": [], "usage": {"input_tokens": 0}}),
    )
    with Client(scripted.url, "k", retry=FAST) as c:
        assert c.classify("a/b", ["x"]).adapter == "a/b"
    (m1, p1, h1, b1), (m2, p2, h2, b2) = scripted.requests
    assert (m1, p1, b1) == (m2, p2, b2) == ("POST", "/v1/classify", b1) and h2["authorization"] == "Bearer k"


def test_retries_exhausted_raise_the_typed_error(scripted):
    scripted.script(
        *[(429, {"Retry-After": "0"}, error_body("rate_limited", "tenant acme is over its share"))] * 4
    )
    with Client(scripted.url, retry=FAST) as c, pytest.raises(RateLimitError) as err:
        c.list_adapters()
    assert len(scripted.requests) == 4 and err.value.type == "rate_limited"
    assert err.value.message == "tenant acme is over its share" and err.value.retry_after == 0
    scripted.script(*[(503, {}, error_body("draining", "shutting down"))] * 2)
    with Client(scripted.url, max_retries=1, retry=FAST) as c, pytest.raises(ServiceUnavailableError) as err:
        c.health()
    assert len(scripted.requests) == 2 and err.value.type == "draining" and err.value.retry_after is None


def test_too_long_retry_after_is_not_waited_out(scripted):
    scripted.script((429, {"Retry-After": "3600"}, error_body("rate_limited", "come back in an hour")))
    start = time.monotonic()
    with Client(scripted.url, retry=FAST) as c, pytest.raises(RateLimitError) as err:
        c.health()
    assert time.monotonic() - start < 1 and len(scripted.requests) == 1 and err.value.retry_after == 3600


def test_other_errors_are_not_retried_and_non_json_bodies_are_kept(scripted):
    scripted.script((500, {}, "<html>proxy error</html>"), (422, {}, error_body("invalid_input", "no")))
    with Client(scripted.url, retry=FAST) as c:
        with pytest.raises(InternalServerError) as err:
            c.health()
        assert err.value.type == "http_error" and "proxy error" in err.value.message
        with pytest.raises(UnprocessableEntityError):
            c.health()
    assert len(scripted.requests) == 2


def test_connection_refused_is_retried_then_raised():
    url = f"http://127.0.0.1:{free_port()}"
    start = time.monotonic()
    with Client(url, retry=FAST) as c, pytest.raises(APIConnectionError, match="ConnectError"):
        c.health()
    assert time.monotonic() - start < 5


def test_an_answer_cut_short_is_asked_again_for_inference_only(scripted):
    """A replica dying mid-answer leaves a truncated body (no proxy can retry it). Inference changes nothing, so
    the SDK sends it again; a key creation might have minted a key, so its error is raised."""
    answer = {"adapter": "a/b", "version": 1, "predictions": [], "usage": {"input_tokens": 0}}
    scripted.script((200, {CUT_SHORT: "1"}, answer), (200, {}, answer))
    with Client(scripted.url, retry=FAST) as c:
        assert c.classify("a/b", ["x"]).adapter == "a/b"
    assert [r[1] for r in scripted.requests] == ["/v1/classify", "/v1/classify"]
    key = {"id": "k1", "key": "ptk_x", "tenant": "acme", "created_at": "2026-11-27T00:00:00Z"}
    scripted.script((201, {CUT_SHORT: "1"}, key), (201, {}, key))
    with Client(scripted.url, retry=FAST) as c, pytest.raises(APIConnectionError, match="RemoteProtocolError"):
        c.create_key("acme")
    assert len(scripted.requests) == 1


async def test_async_client_retries_too(scripted):
    scripted.script(
        (503, {"Retry-After": "1"}, error_body("not_ready", "loading")), (200, {}, {"status": "ok"})
    )
    async with AsyncClient(scripted.url, retry=FAST) as c:
        assert await c.health() == {"status": "ok"}
    assert scripted.times[1] - scripted.times[0] >= 0.95


def test_retry_after_http_date_and_backoff_policy():
    assert (
        parse_retry_after("2") == 2.0
        and parse_retry_after("junk") is None
        and parse_retry_after(None) is None
    )
    assert 8 <= parse_retry_after(formatdate(time.time() + 10, usegmt=True)) <= 10
    policy = RetryPolicy(max_retries=5, backoff=0.5, max_backoff=3.0, max_retry_after=30)
    assert [round(policy.delay(a, None) / (0.5 * 2**a), 1) <= 1.2 for a in range(2)] == [True, True]
    assert policy.delay(4, None) <= 3.0 * 1.2 and policy.delay(5, None) is None
    assert policy.delay(0, 7.0) == 7.0 and policy.delay(0, 31.0) is None


# --- streams (scripted server) ------------------------------------------------------------------------------
def test_stream_parsing_and_errors_mid_stream(scripted):
    body = (
        ": keep-alive\n\n"
        'data: {"text": "Hel", "token": 1}\n\n'
        'event: message\ndata: {"text": "lo",\ndata:  "token": 2}\n\n'
        'data: {"text": "", "token": 3, "finish_reason": "length", "usage": {"completion_tokens": 3}}\n\n'
        "data: [DONE]\n\n"
        'data: {"text": "after done is ignored"}\n\n'
    )
    scripted.script(
        (200, {"content-type": "text/event-stream"}, body),
        (
            200,
            {"content-type": "text/event-stream"},
            'data: {"text": "a"}\n\nevent: error\ndata: {"type": "internal_error", "message": "boom"}\n\n',
        ),
    )
    with Client(scripted.url) as c:
        events = list(c.generate_stream("a/b", "hi", max_new_tokens=3, stop=["\n"]))
        assert [e.text for e in events] == ["Hel", "lo", ""] and events[1].event == "message"
        assert events[-1].finish_reason == "length"
        sent = scripted.requests[0]
        assert sent[2]["accept"] == "text/event-stream"
        import json as _json

        assert _json.loads(sent[3]) == {
            "adapter": "a/b",
            "prompt": "hi",
            "max_new_tokens": 3,
            "stop": ["\n"],
            "stream": True,
        }
        with pytest.raises(StreamError, match="internal_error: boom"):
            list(c.generate_stream("a/b", "hi"))


def test_sse_decoder_edge_cases():
    events = list(iter_events(['data: {"x": 1}', "", "data: 2", ""]))  # non-object JSON is wrapped
    assert [e.data for e in events] == [{"x": 1}, {"data": 2}]
    assert [e.data for e in iter_events(['data: {"x": 3}'])] == [
        {"x": 3}
    ]  # flushed at the end without blank line
    with pytest.raises(StreamError, match="not JSON"):
        list(iter_events(["data: {oops", ""]))
    with pytest.raises(StreamError, match="rate_limited: later"):
        list(iter_events(['data: {"error": {"type": "rate_limited", "message": "later"}}', ""]))
    d = SSEDecoder()
    assert d.feed("retry: 100") is None and d.feed("") is None  # fields without data dispatch nothing


def test_exported_blob_decodes_against_its_own_fingerprint(fp):
    adapter = make_adapter(fp, 3, seed=8)
    decoded = blob_to_adapter(encode_blob(adapter))
    assert decoded.config == adapter.config
    assert all(torch.equal(decoded.tensors[k], adapter.tensors[k]) for k in adapter.tensors)


def test_transport_is_injectable_for_offline_use():
    def handler(request: httpx.Request) -> httpx.Response:
        assert request.headers["authorization"] == "Bearer t"
        return httpx.Response(
            200, json={"object": "list", "data": [{"id": "a/b", "created": 1, "owned_by": "a"}]}
        )

    with Client("http://ptserve.invalid", "t", transport=httpx.MockTransport(handler)) as c:
        assert [m.id for m in c.models()] == ["a/b"]


@pytest.mark.parametrize("call", [
    lambda: calls.classify("acme/a", ["x"]),
    lambda: calls.generate("acme/a", "hi"),
    lambda: calls.generate_stream("acme/a", "hi"),
    lambda: calls.completions("acme/a", "hi"),
    lambda: calls.get_adapter("acme/a"),
    lambda: calls.download_adapter("acme/a"),
    lambda: calls.delete_adapter("acme/a"),
    lambda: calls.upload("acme/a", b"blob"),
])
def test_adapter_scoped_calls_name_the_adapter_for_the_proxy(call):
    """docker/nginx hashes on X-Ptserve-Adapter: every adapter-scoped call must send it."""
    assert call().request_kwargs()["headers"]["X-Ptserve-Adapter"] == "acme/a"


def test_calls_without_an_adapter_send_no_affinity_header():
    assert "X-Ptserve-Adapter" not in calls.list_adapters().request_kwargs()["headers"]
    assert "X-Ptserve-Adapter" not in calls.models().request_kwargs()["headers"]
