"""End to end over real HTTP: ``ptserve serve`` on a free loopback port, driven by concurrent httpx clients."""
from __future__ import annotations

import asyncio
import random
import re

import httpx
import pytest
import torch

from ptserve.adapters_store.format import encode_blob
from ptserve.server.engine import Row
from tests.factories import make_adapter, running_server

WORDS = "great awful fine terrible lovely slow quick broken perfect meh the a service product".split()


@pytest.fixture(scope="module")
def server(tmp_path_factory, server_modes):
    # a generous max wait so concurrent requests from different tenants surely share passes
    env = {"PTSERVE_STORE": f"file://{tmp_path_factory.mktemp('store')}", "PTSERVE_MAX_WAIT_MS": "20",
           "PTSERVE_BATCH_OVERHEAD_TOKENS": "256"}
    with running_server(env) as url:
        yield url


def _upload(url: str, adapter_id: str, blob: bytes) -> httpx.Response:
    return httpx.put(f"{url}/v1/adapters/{adapter_id}", content=blob,
                     headers={"content-type": "application/octet-stream"}, timeout=30)


def _metric(text: str, name: str) -> float:
    m = re.search(rf"^{re.escape(name)} ([0-9.e+-]+)$", text, re.M)
    assert m, f"{name} not exported"
    return float(m.group(1))


def test_upload_list_classify_concurrently_then_delete(server, minilm, minilm_engine):
    fp = minilm.fingerprint
    lengths = {"acme/sentiment": 16, "acme/topic": 4, "globex/intent": 32, "initech/tone": 1}
    adapters = {aid: make_adapter(fp, p, seed=i) for i, (aid, p) in enumerate(lengths.items())}
    for aid, adapter in adapters.items():
        r = _upload(server, aid, encode_blob(adapter))
        assert r.status_code == 201, r.text
        assert r.json()["version"] == 1 and r.json()["num_virtual_tokens"] == lengths[aid]

    listed = httpx.get(f"{server}/v1/adapters").json()["data"]
    assert sorted(a["id"] for a in listed) == sorted(adapters)
    only_acme = httpx.get(f"{server}/v1/adapters", params={"tenant": "acme"}).json()["data"]
    assert sorted(a["id"] for a in only_acme) == ["acme/sentiment", "acme/topic"]

    rnd = random.Random(0)
    jobs = [(rnd.choice(list(adapters)), [" ".join(rnd.choices(WORDS, k=rnd.randint(2, 30)))
                                           for _ in range(rnd.randint(1, 3))]) for _ in range(48)]
    before = httpx.get(f"{server}/metrics").text

    async def fire():
        async with httpx.AsyncClient(base_url=server, timeout=60) as client:
            return await asyncio.gather(*(
                client.post("/v1/classify", json={"adapter": aid, "inputs": texts, "return_logits": True})
                for aid, texts in jobs
            ))

    answers = asyncio.run(fire())
    after = httpx.get(f"{server}/metrics").text
    for (aid, texts), answer in zip(jobs, answers):
        assert answer.status_code == 200, answer.text
        body = answer.json()
        assert body["adapter"] == aid and body["version"] == 1 and len(body["predictions"]) == len(texts)
        resident = minilm_engine.make_resident(adapters[aid], aid, 1)
        for text, pred in zip(texts, body["predictions"]):
            expected, _ = minilm_engine.classify([Row(resident, minilm_engine.tokenize([text], lengths[aid])[0])])
            assert (torch.tensor(pred["logits"]) - expected[0]).abs().max() <= 1e-5
            assert pred["label"] == adapters[aid].config.labels[int(expected[0].argmax())]
            assert abs(sum(pred["scores"].values()) - 1) < 1e-5

    rows = sum(len(t) for _, t in jobs)
    passes = _metric(after, "ptserve_batch_size_count") - _metric(before, "ptserve_batch_size_count")
    assert passes < rows / 2, f"{rows} rows took {passes} passes: requests were not batched together"

    assert httpx.delete(f"{server}/v1/adapters/initech/tone").status_code == 204
    gone = httpx.post(f"{server}/v1/classify", json={"adapter": "initech/tone", "inputs": ["hi"]})
    assert gone.status_code == 404 and gone.json()["error"]["type"] == "adapter_not_found"
    assert httpx.get(f"{server}/v1/adapters/initech/tone").status_code == 404


def test_replacing_an_adapter_serves_the_new_version(server, minilm):
    fp = minilm.fingerprint
    first, second = make_adapter(fp, 8, seed=100), make_adapter(fp, 8, seed=101)
    assert _upload(server, "acme/swap", encode_blob(first)).json()["version"] == 1
    v1 = httpx.post(f"{server}/v1/classify", json={"adapter": "acme/swap", "inputs": ["hello"], "return_logits": True})
    assert _upload(server, "acme/swap", encode_blob(second)).json()["version"] == 2
    v2 = httpx.post(f"{server}/v1/classify", json={"adapter": "acme/swap", "inputs": ["hello"], "return_logits": True})
    assert v1.json()["version"] == 1 and v2.json()["version"] == 2
    assert v1.json()["predictions"][0]["logits"] != v2.json()["predictions"][0]["logits"]


def test_health_readiness_metrics_and_openapi(server):
    assert httpx.get(f"{server}/healthz").json() == {"status": "ok"}
    ready = httpx.get(f"{server}/readyz")
    assert ready.status_code == 200 and ready.json()["status"] == "ready"
    metrics = httpx.get(f"{server}/metrics")
    assert metrics.headers["content-type"].startswith("text/plain")
    for name in ("ptserve_requests_total", "ptserve_request_duration_seconds_bucket", "ptserve_batch_size_bucket",
                 "ptserve_adapter_cache_hits_total", "ptserve_build_info"):
        assert name in metrics.text
    paths = httpx.get(f"{server}/openapi.json").json()["paths"]
    assert {"/v1/classify", "/v1/adapters", "/v1/adapters/{tenant}/{name}", "/v1/adapters/{tenant}/{name}/blob"} <= set(paths)
