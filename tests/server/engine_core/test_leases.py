"""Leases live in the engine (issue 12 item 2): a request whose deadline passes while its rows are in a running
pass gets its 504 at once, but the adapter stays leased — not evictable, its bytes counted — until the pass that
uses its tensors has finished. MiniLM engine, a real local store and real blobs; the pass is held open by a run
function that waits for the test before running the real forward pass."""
from __future__ import annotations

import asyncio
import threading

import pytest

from ptserve.adapters_store.ids import AdapterId
from ptserve.adapters_store.local import LocalDirStore
from ptserve.adapters_store.validation import Limits
from ptserve.server.adapters import AdapterService
from ptserve.server.batch_plan import BatchPolicy
from ptserve.server.batcher import Batcher
from ptserve.server.engine import LOGITS
from ptserve.server.engine_core.local import LocalEngineClient, PassWatch
from ptserve.server.limits import DeadlineExceeded
from tests.factories import make_blob

A, B = AdapterId.parse("acme/a"), AdapterId.parse("acme/b")


@pytest.fixture
async def engine_with_slow_pass(tmp_path, minilm_engine):
    """A LocalEngineClient whose cache holds one adapter, and whose passes start only when ``release`` is set."""
    store = LocalDirStore(tmp_path / "store")
    probe = AdapterService(store, minilm_engine, 1 << 30, Limits())
    await probe.put_blob(A, make_blob(minilm_engine.fp, 8, seed=1))
    await probe.put_blob(B, make_blob(minilm_engine.fp, 8, seed=2))
    one_adapter = (await probe.resident(A)).nbytes
    adapters = AdapterService(store, minilm_engine, one_adapter, Limits())  # room for exactly one resident
    in_pass, release = threading.Event(), threading.Event()

    def slow_run(rows):
        in_pass.set()
        release.wait(30)
        return minilm_engine.run(rows)

    watch = PassWatch(slow_run)
    batcher = Batcher(watch, BatchPolicy(max_batch_size=8, max_batch_tokens=4096), max_wait_ms=0)
    batcher.start()
    try:
        yield LocalEngineClient(adapters, batcher, minilm_engine, watch), adapters, in_pass, release
    finally:
        release.set()
        await batcher.stop()


async def test_a_request_timing_out_mid_pass_keeps_its_adapter_leased_until_the_pass_ends(
    engine_with_slow_pass, minilm_engine
):
    client, adapters, in_pass, release = engine_with_slow_pass
    meta = await client.adapter_meta(A)
    ids = minilm_engine.tokenize(["a review of a film"], meta.num_virtual_tokens)
    work = asyncio.ensure_future(client.encode(A, meta.version, ids, LOGITS, "acme", timeout_s=0.5))
    assert await asyncio.to_thread(in_pass.wait, 10), "the pass never started"
    with pytest.raises(DeadlineExceeded):
        await work  # the caller is answered at its deadline, while the pass still runs
    assert not client.idle  # the lease outlives the request

    await adapters.resident(B)  # wants A's bytes: A is still leased by the running pass, so B is served uncached
    assert A in adapters.cache and B not in adapters.cache

    release.set()
    for _ in range(200):  # the pass ends; its lease goes with it
        if client.idle:
            break
        await asyncio.sleep(0.02)
    assert client.idle
    await adapters.resident(B)  # now A may go
    assert B in adapters.cache and A not in adapters.cache


async def test_an_answer_names_the_version_it_was_tokenised_for_or_says_it_changed(engine_with_slow_pass,
                                                                                    minilm_engine):
    from ptserve.server.engine_core.client import VersionChanged

    client, adapters, _, release = engine_with_slow_pass
    release.set()
    meta = await client.adapter_meta(A)
    await adapters.put_blob(A, make_blob(minilm_engine.fp, 4, seed=3))  # v2 while the request is tokenised
    ids = minilm_engine.tokenize(["hello"], meta.num_virtual_tokens)
    with pytest.raises(VersionChanged) as caught:
        await client.encode(A, meta.version, ids, LOGITS, "acme", timeout_s=10)
    assert (caught.value.asked, caught.value.current) == (meta.version, meta.version + 1)
    fresh = await client.adapter_meta(A)
    out = await client.encode(A, fresh.version, minilm_engine.tokenize(["hello"], fresh.num_virtual_tokens),
                              LOGITS, "acme", timeout_s=10)
    assert out.version == fresh.version == meta.version + 1 and fresh.num_virtual_tokens == 4
