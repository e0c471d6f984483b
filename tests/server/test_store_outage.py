"""Redis dies under load and comes back: resident adapters keep serving, everything else answers 503 at once,
and ``ptserve serve`` recovers by itself without losing anything Redis acknowledged.

Why ``kill -9`` and an fsync'd append-only file: a crash is the outage that matters (no chance to save), and
"nothing uploaded is lost" is then ptserve's promise on top of Redis's durability, not a property of a clean
shutdown. With ``appendfsync always`` Redis answers a write only once it is on disk, so every upload that
answered 201 must be there after the restart; one in flight at the kill may go either way (it got no 201).
"""
from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import time
import uuid

import httpx
import pytest
import torch

from ptserve.adapters_store.ids import AdapterId
from ptserve.adapters_store.redis import RedisStore
from ptserve.adapters_store.store import AdapterMeta
from ptserve.adapters_store.validation import Limits, decode_blob
from ptserve.server.engine import Row
from tests.factories import MINILM_LABELS, make_blob, running_server

# in process and with an engine core process (one list: a second ``pytestmark =`` would replace the first)
pytestmark = [pytest.mark.usefixtures("server_modes"), pytest.mark.slow]

TEXT = "the delivery was quick and the product is great"
PROMPT_S = 3.0  # an answer during the outage comes within this (bounded store timeouts, no hang)
RECOVER_S = 10.0  # after Redis is back: the change feed's backoff tops out at 2 s


def put(client: httpx.AsyncClient, adapter_id: str, blob: bytes):
    headers = {"content-type": "application/octet-stream"}
    return client.put(f"/v1/adapters/{adapter_id}", content=blob, headers=headers)


def classify(client: httpx.AsyncClient, adapter_id: str):
    return client.post("/v1/classify", json={"adapter": adapter_id, "inputs": [TEXT], "return_logits": True})


def expected_logits(engine, blob: bytes, p: int) -> torch.Tensor:
    adapter = decode_blob(blob, engine.fp, engine.backbone.family.head_kind, Limits())
    ids = engine.tokenize([TEXT], p)[0]
    return engine.classify([Row(engine.make_resident(adapter, "x/y", 1), ids)])[0][0]


def assert_logits(answer: httpx.Response, expected: torch.Tensor) -> None:
    assert answer.status_code == 200, answer.text
    got = torch.tensor(answer.json()["predictions"][0]["logits"])
    assert (got - expected).abs().max() <= 1e-5


def feed_connected(ready: httpx.Response) -> bool:
    return ready.json().get("change_feed") == "connected"


async def timed(coro) -> tuple[httpx.Response, float]:
    start = time.monotonic()
    answer = await coro
    return answer, time.monotonic() - start


async def until(fn, ok, timeout: float) -> tuple[httpx.Response, float]:
    """Call ``fn()`` until ``ok(answer)``; the answer and the seconds it took."""
    start = time.monotonic()
    while True:
        answer = await fn()
        if ok(answer):
            return answer, time.monotonic() - start
        assert time.monotonic() - start < timeout, f"not in {timeout} s: {answer.status_code} {answer.text}"
        await asyncio.sleep(0.05)


def test_killing_redis_under_load_then_restarting_it(redis_server_factory, minilm, minilm_engine):
    fp = minilm.fingerprint
    redis_server = redis_server_factory(persistent=True)
    store = f"{redis_server.url}?prefix=out{uuid.uuid4().hex[:8]}"
    hot = {f"hot/a{i}": make_blob(fp, 16, seed=i) for i in range(3)}
    cold = {f"cold/a{i}": make_blob(fp, 8, seed=100 + i) for i in range(2)}
    expected = {aid: expected_logits(minilm_engine, blob, 16 if aid.startswith("hot") else 8)
                for aid, blob in {**hot, **cold}.items()}

    with running_server({"PTSERVE_STORE": store, "PTSERVE_MAX_WAIT_MS": "2"}) as url:
        asyncio.run(_scenario(url, store, redis_server, redis_server_factory, hot, cold, expected, fp))


async def _scenario(url, store, redis_server, redis_server_factory, hot, cold, expected, fp):
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        for aid, blob in {**hot, **cold}.items():
            assert (await put(client, aid, blob)).status_code == 201
        for aid in hot:  # resident from now on; the cold ones were never requested here
            assert_logits(await classify(client, aid), expected[aid])
        assert (await client.get("/readyz")).json()["resident_adapters"] == len(hot)
        await until(lambda: client.get("/readyz"), feed_connected, RECOVER_S)

        # --- load: hot adapters classified non-stop; an uploader adds adapters until Redis dies -----------
        stop = asyncio.Event()
        hot_answers: list[tuple[str, httpx.Response]] = []
        acked: dict[str, dict] = {}  # uploads answered 201: must survive

        async def hammer(n: int) -> None:
            ids = list(hot)
            while not stop.is_set():
                aid = ids[n % len(ids)]
                n += 1
                hot_answers.append((aid, await classify(client, aid)))

        async def uploader() -> None:
            i = 0
            while not stop.is_set():
                aid, blob = f"up/a{i}", make_blob(fp, 4, seed=1000 + i)
                r = await put(client, aid, blob)
                if r.status_code == 201:
                    acked[aid] = {**r.json(), "blob_sha256": hashlib.sha256(blob).hexdigest()}
                else:
                    assert r.status_code == 503 and r.json()["error"]["type"] == "store_unavailable", r.text
                i += 1
                await asyncio.sleep(0.01)

        load = [asyncio.create_task(hammer(n)) for n in range(4)] + [asyncio.create_task(uploader())]
        await asyncio.sleep(1.0)

        # --- a hung Redis (SIGSTOP): connections open, no answers; only the timeouts bound the wait ------
        os.kill(redis_server.proc.pid, signal.SIGSTOP)
        try:
            await _answers_503_promptly(client, cold, fp)
        finally:
            os.kill(redis_server.proc.pid, signal.SIGCONT)
        # (an upload that timed out may still land once Redis resumes: it got a 503, never a 201)
        await until(lambda: client.get("/readyz"), lambda r: r.json().get("store_status") == "ok", RECOVER_S)
        await asyncio.sleep(0.5)
        served_before_kill = len(hot_answers)
        await asyncio.to_thread(redis_server.kill)  # SIGKILL: a crash, no save
        killed_at = time.monotonic()
        uploaded_before_kill = len(acked)
        assert uploaded_before_kill > 0 and served_before_kill > 0

        # --- outage ----------------------------------------------------------------------------------
        await _answers_503_promptly(client, cold, fp)
        await asyncio.sleep(max(0.0, 2.5 - (time.monotonic() - killed_at)))  # let the feed's backoff grow
        assert (await client.get("/readyz")).json()["change_feed"] == "disconnected"
        served_in_outage = len(hot_answers)

        # --- Redis is back on the same port with what it had acknowledged -----------------------------
        await asyncio.to_thread(redis_server_factory, redis_server.port, True)
        await until(lambda: client.get("/readyz"), lambda r: r.json().get("store_status") == "ok", RECOVER_S)
        answer, _ = await until(lambda: classify(client, "cold/a0"), lambda r: r.status_code != 503,
                                RECOVER_S)
        assert_logits(answer, expected["cold/a0"])
        assert (await put(client, "new/a", make_blob(fp, 4, seed=7))).status_code == 201
        await asyncio.sleep(0.5)
        stop.set()
        await asyncio.gather(*load)

        # --- nothing failed, nothing lost ------------------------------------------------------------
        failed = [(aid, r.status_code, r.text) for aid, r in hot_answers if r.status_code != 200]
        assert not failed, f"{len(failed)} of {len(hot_answers)} requests for resident adapters failed: " \
                           f"{failed[:3]}"
        assert served_in_outage - served_before_kill >= 20, "resident adapters had no load in the outage"
        for aid, r in hot_answers[::25]:
            assert_logits(r, expected[aid])
        for aid, info in acked.items():
            got = await client.get(f"/v1/adapters/{aid}")
            assert got.status_code == 200, f"{aid} (acknowledged before the outage) is lost: {got.text}"
            assert (got.json()["version"], got.json()["sha256"]) == (info["version"], info["sha256"])
            assert info["sha256"] == info["blob_sha256"]
        for aid, blob in {**hot, **cold}.items():
            got = await client.get(f"/v1/adapters/{aid}/blob")
            assert got.status_code == 200 and got.content == blob

        # --- the change feed is back too: a version published by another writer reaches this server --
        await until(lambda: client.get("/readyz"), feed_connected, RECOVER_S)
        await _publish_elsewhere(store, "hot/a0", make_blob(fp, 16, seed=55))
        answer, took = await until(lambda: classify(client, "hot/a0"), lambda r: r.json()["version"] == 2, 5)
        assert took < 1.0, f"the new version reached the recovered server after {took:.2f} s"


async def _answers_503_promptly(client: httpx.AsyncClient, cold: dict, fp) -> None:
    """While the store is out: cold adapters, uploads and listing answer 503 ``store_unavailable`` promptly;
    /readyz says the store is degraded (and stays 200: resident adapters still serve)."""
    async def check(request) -> httpx.Response:
        answer, took = await timed(request)
        assert took < PROMPT_S, f"{answer.request.method} {answer.request.url.path} took {took:.2f} s"
        return answer

    unavailable = [await check(classify(client, aid)) for aid in cold]
    unavailable.append(await check(put(client, "new/a", make_blob(fp, 4, seed=7))))
    unavailable.append(await check(client.get("/v1/adapters")))
    for answer in unavailable:
        assert answer.status_code == 503, answer.text
        assert answer.json()["error"]["type"] == "store_unavailable", answer.text
    ready = await check(client.get("/readyz"))
    assert ready.status_code == 200, ready.text
    assert ready.json()["store_status"] == "unavailable" and ready.json()["status"] == "degraded", ready.text


async def _publish_elsewhere(store_url: str, adapter_id: str, blob: bytes) -> None:
    """Publish as another replica would: straight into the same Redis, not through this server."""
    store = RedisStore(store_url)
    try:
        info = await store.put(AdapterId.parse(adapter_id), blob, AdapterMeta("classify", 16, MINILM_LABELS))
        assert info.version == 2
    finally:
        await store.close()


def test_a_server_started_during_an_outage_serves_and_pins_its_preloads_once_redis_is_back(
    redis_server_factory, minilm, minilm_engine,
):
    fp = minilm.fingerprint
    redis_server = redis_server_factory(persistent=True)
    store = f"{redis_server.url}?prefix=pre{uuid.uuid4().hex[:8]}"
    blob = make_blob(fp, 16, seed=3)
    asyncio.run(_put_directly(store, "pin/a", blob))
    redis_server.kill()

    env = {"PTSERVE_STORE": store, "PTSERVE_PRELOAD": "pin/a"}
    with running_server(env, timeout=60) as url:
        ready = httpx.get(f"{url}/readyz")
        assert ready.json()["store_status"] == "unavailable" and ready.json()["resident_adapters"] == 0
        answer = httpx.post(f"{url}/v1/classify", json={"adapter": "pin/a", "inputs": [TEXT]}, timeout=10)
        assert answer.status_code == 503 and answer.json()["error"]["type"] == "store_unavailable"

        redis_server_factory(redis_server.port, True)
        deadline = time.monotonic() + RECOVER_S
        while httpx.get(f"{url}/readyz").json()["resident_adapters"] < 1:  # loaded without being asked
            assert time.monotonic() < deadline, "the preloaded adapter was not loaded after Redis came back"
            time.sleep(0.1)
        answer = httpx.post(f"{url}/v1/classify", json={"adapter": "pin/a", "inputs": [TEXT],
                                                        "return_logits": True}, timeout=10)
        assert_logits(answer, expected_logits(minilm_engine, blob, 16))


async def _put_directly(store_url: str, adapter_id: str, blob: bytes) -> None:
    store = RedisStore(store_url)
    try:
        await store.put(AdapterId.parse(adapter_id), blob, AdapterMeta("classify", 16, MINILM_LABELS))
    finally:
        await store.close()
