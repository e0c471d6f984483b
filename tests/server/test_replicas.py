"""Two ``ptserve serve`` processes (A and B) on one Redis: what A publishes, B serves within a second, and
never a mix of two versions. Expected logits come from the same engine in-process, per version."""
from __future__ import annotations

import asyncio
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack

import httpx
import pytest
import torch

from ptserve.adapters_store.validation import Limits, decode_blob
from ptserve.server.engine import Row
from tests.factories import make_blob, running_server

pytestmark = pytest.mark.slow

TEXTS = ["the service was great", "awful, slow and broken", "meh", "a perfect product, quick delivery"]
PROPAGATION_S = 1.0  # the promise: what A publishes, B serves within a second


@pytest.fixture(scope="module")
def replicas(redis_server, server_modes):
    """(A, B): two servers on one Redis under a key prefix of this module's own."""
    prefix = f"rep{uuid.uuid4().hex[:12]}"
    env = {"PTSERVE_STORE": f"{redis_server}?prefix={prefix}", "PTSERVE_MAX_WAIT_MS": "2"}
    def start():
        server = running_server(env)
        return server, server.__enter__()

    with ExitStack() as stack:
        with ThreadPoolExecutor(2) as pool:  # both load MiniLM at once
            futures = [pool.submit(start) for _ in range(2)]
        urls = []
        for f in futures:  # whatever started is stopped at the end, also if the other failed
            try:
                server, url = f.result()
            except Exception:
                continue
            stack.push(server.__exit__)
            urls.append(url)
        if len(urls) < 2:
            futures[0].result(), futures[1].result()  # raise the start-up error
        for url in urls:  # both follow the change feed before anything is published
            poll(lambda: httpx.get(f"{url}/readyz"), lambda r: r.json().get("change_feed") == "connected", 10)
        yield tuple(urls)


def upload(url: str, adapter_id: str, blob: bytes) -> dict:
    r = httpx.put(f"{url}/v1/adapters/{adapter_id}", content=blob,
                  headers={"content-type": "application/octet-stream"}, timeout=30)
    assert r.status_code == 201, r.text
    return r.json()


def classify(url: str, adapter_id: str, texts=TEXTS[:1]) -> httpx.Response:
    body = {"adapter": adapter_id, "inputs": texts, "return_logits": True}
    return httpx.post(f"{url}/v1/classify", json=body, timeout=30)


def expected_logits(engine, blob: bytes, p: int, version: int) -> torch.Tensor:
    """[len(TEXTS), labels]: what this version gives for each text, alone, in-process."""
    adapter = decode_blob(blob, engine.fp, engine.backbone.family.head_kind, Limits())
    resident = engine.make_resident(adapter, "x/y", version)
    rows = [Row(resident, ids) for ids in engine.tokenize(TEXTS, p)]
    return torch.stack([engine.classify([row])[0][0] for row in rows])


def poll(fn, until, timeout: float) -> tuple[httpx.Response, float]:
    """Call ``fn`` until ``until(answer)``; the answer and the seconds it took. Fails after ``timeout``."""
    start = time.monotonic()
    while True:
        answer = fn()
        elapsed = time.monotonic() - start
        if until(answer):
            return answer, elapsed
        assert elapsed < timeout, f"not within {timeout} s; last answer {answer.status_code} {answer.text}"
        time.sleep(0.005)


def test_an_upload_through_a_is_served_by_b_within_a_second(replicas, minilm):
    a, b = replicas
    aid, p = "acme/fresh", 16
    assert classify(b, aid).status_code == 404  # B looked for it first: a miss must not be remembered
    blob = make_blob(minilm.fingerprint, p, seed=1)
    start = time.monotonic()
    upload(a, aid, blob)
    answer, _ = poll(lambda: classify(b, aid), lambda r: r.status_code == 200, timeout=5)
    elapsed = time.monotonic() - start
    assert elapsed < PROPAGATION_S, f"B served the upload after {elapsed:.3f} s"
    assert answer.json()["version"] == 1
    info = httpx.get(f"{b}/v1/adapters/{aid}").json()
    assert info["version"] == 1 and info["num_virtual_tokens"] == p


def test_replacing_through_a_while_b_serves_a_stream_mixes_no_versions(replicas, minilm, minilm_engine):
    a, b = replicas
    aid, p = "acme/swap", 16
    blobs = {v: make_blob(minilm.fingerprint, p, seed=10 + v) for v in (1, 2, 3)}
    expected = {v: expected_logits(minilm_engine, blob, p, v) for v, blob in blobs.items()}
    for v in (2, 3):  # versions must be told apart by their logits alone
        assert (expected[v] - expected[v - 1]).abs().max() > 1e-2
    assert upload(a, aid, blobs[1])["version"] == 1
    poll(lambda: classify(b, aid), lambda r: r.status_code == 200, timeout=5)

    published: dict[int, float] = {}  # version -> monotonic time A's PUT answered
    answers: list[tuple[int, float, list[int], httpx.Response]] = []  # worker, sent at, text indices, answer
    stop = asyncio.Event()

    async def worker(client: httpx.AsyncClient, n: int) -> None:
        i = n
        while not stop.is_set():
            picks = [(i + k) % len(TEXTS) for k in range(1 + i % 3)]
            i += 1
            sent = time.monotonic()
            r = await client.post("/v1/classify", json={
                "adapter": aid, "inputs": [TEXTS[j] for j in picks], "return_logits": True})
            answers.append((n, sent, picks, r))

    async def publisher() -> None:
        async with httpx.AsyncClient(base_url=a, timeout=30) as client:
            for v in (2, 3):
                await asyncio.sleep(0.7)
                r = await client.put(f"/v1/adapters/{aid}", content=blobs[v],
                                     headers={"content-type": "application/octet-stream"})
                assert r.status_code == 201 and r.json()["version"] == v, r.text
                published[v] = time.monotonic()
            await asyncio.sleep(PROPAGATION_S + 0.3)
        stop.set()

    async def run() -> None:
        async with httpx.AsyncClient(base_url=b, timeout=30) as client:
            await asyncio.gather(publisher(), *(worker(client, n) for n in range(6)))

    t0 = time.monotonic(); asyncio.run(run()); print("RUN", time.monotonic() - t0, len(answers))

    errors = [r for *_, r in answers if r.status_code != 200]
    assert not errors, f"{len(errors)} of {len(answers)} requests failed, e.g. {errors[0].text}"
    assert len(answers) >= 50, f"only {len(answers)} requests: B served no real stream"
    last_seen = {n: 0 for n in range(6)}
    for n, sent, picks, r in sorted(answers, key=lambda x: x[1]):
        body = r.json()
        v = body["version"]
        assert v in expected, body
        logits = torch.tensor([pred["logits"] for pred in body["predictions"]])
        diff = (logits - expected[v][picks]).abs().max()
        assert diff <= 1e-5, f"answer names version {v} but its logits are off by {diff}"
        # a version is never served again once a newer one answered this worker
        assert v >= last_seen[n], f"worker {n} saw version {last_seen[n]} then {v}"
        last_seen[n] = v
        for newer, at in published.items():  # sent a second after a newer version was published: that one
            if sent > at + PROPAGATION_S:
                assert v >= newer, f"version {v} served {sent - at:.3f} s after version {newer} was published"
    served = {r.json()["version"] for *_, r in answers}
    assert served == {1, 2, 3}, f"versions served: {served}"


def test_a_delete_through_a_is_a_404_on_b_within_a_second(replicas, minilm):
    a, b = replicas
    aid = "acme/doomed"
    upload(a, aid, make_blob(minilm.fingerprint, 8, seed=5))
    poll(lambda: classify(b, aid), lambda r: r.status_code == 200, timeout=5)  # now resident on B
    assert classify(b, aid).status_code == 200

    start = time.monotonic()
    assert httpx.delete(f"{a}/v1/adapters/{aid}").status_code == 204
    answer, _ = poll(lambda: classify(b, aid), lambda r: r.status_code != 200, timeout=5)
    elapsed = time.monotonic() - start
    assert answer.status_code == 404 and answer.json()["error"]["type"] == "adapter_not_found", answer.text
    assert elapsed < PROPAGATION_S, f"B still served the deleted adapter for {elapsed:.3f} s"
    assert httpx.get(f"{b}/v1/adapters/{aid}").status_code == 404
    assert aid not in [x["id"] for x in httpx.get(f"{b}/v1/adapters").json()["data"]]
