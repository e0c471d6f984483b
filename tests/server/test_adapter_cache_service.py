"""The resident-adapter cache as ``AdapterService`` drives it: MiniLM engine, a real store (local directory
and Redis), real blobs. Store reads are counted by a thin subclass of the store (the real store does the
work)."""
from __future__ import annotations

import asyncio
import random
from collections import Counter

import pytest
import torch

from ptserve.adapters_store.ids import AdapterId
from ptserve.adapters_store.local import LocalDirStore
from ptserve.adapters_store.redis import RedisStore
from ptserve.adapters_store.store import AdapterMeta
from ptserve.adapters_store.validation import Limits, decode_blob
from ptserve.server.adapters import AdapterService
from ptserve.server.engine import Row
from tests.factories import MINILM_LABELS, make_blob


def counting(store_cls):
    """``store_cls`` that counts ``get_blob`` calls per adapter id in ``self.reads``."""

    class Counting(store_cls):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.reads: Counter[AdapterId] = Counter()

        async def get_blob(self, adapter_id, version=None):
            self.reads[adapter_id] += 1
            return await super().get_blob(adapter_id, version)

    return Counting


@pytest.fixture(params=["local", "redis"])
async def store(request, tmp_path):
    if request.param == "local":
        s = counting(LocalDirStore)(tmp_path / "store")
    else:
        server, prefix = request.getfixturevalue("redis_server"), request.getfixturevalue("redis_prefix")
        s = counting(RedisStore)(f"{server}?prefix={prefix}")
    yield s
    await s.close()


def ids(n: int, tenant: str = "t") -> list[AdapterId]:
    return [AdapterId.of(tenant, f"a{i:03d}") for i in range(n)]


async def seed_store(service: AdapterService, adapter_ids, lengths) -> None:
    """Publish one adapter per id through the service (validated like an upload), seed = index."""
    fp = service.engine.fp
    await asyncio.gather(*(
        service.put_blob(aid, make_blob(fp, p, seed=i))
        for i, (aid, p) in enumerate(zip(adapter_ids, lengths))
    ))
    for aid in adapter_ids:  # publishing invalidates; start every test from a cold cache
        assert aid not in service.cache


def resident_bytes(service: AdapterService) -> int:
    """What the cache holds, summed from the values themselves (not the cache's own counter)."""
    return sum(service.cache.peek(k).nbytes for k in service.cache.keys())


def kv_bytes(engine, p: int) -> int:
    """Device bytes of a P-token MiniLM classify adapter (prefix K/V + head), as the engine lays it out."""
    adapter = decode_blob(make_blob(engine.fp, p), engine.fp, engine.backbone.family.head_kind, Limits())
    return engine.make_resident(adapter, "x/y", 1).nbytes


@pytest.mark.parametrize("seed", [0, 1])
async def test_byte_budget_is_never_exceeded_over_a_random_workload(store, minilm_engine, seed):
    rnd = random.Random(seed)
    adapter_ids = ids(40)
    lengths = [rnd.choice([1, 2, 4, 8, 16, 32]) for _ in adapter_ids]
    capacity = 6 * kv_bytes(minilm_engine, 16)  # room for a handful: every few requests evict
    service = AdapterService(store, minilm_engine, capacity, Limits())
    await seed_store(service, adapter_ids, lengths)
    versions = {aid: 1 for aid in adapter_ids}
    fp = minilm_engine.fp

    async def request(aid: AdapterId) -> None:
        async with service.lease(aid) as resident:
            assert resident.id == str(aid) and resident.version == versions[aid]
            assert resident.num_virtual_tokens == lengths[adapter_ids.index(aid)]
            assert service.cache.used_bytes <= capacity  # held by this request, next to the others' leases
            await asyncio.sleep(rnd.random() * 0.002)

    for step in range(60):
        if rnd.random() < 0.1:  # a replacement now and then: the old copy must leave the budget too
            aid = rnd.choice(adapter_ids)
            blob = make_blob(fp, lengths[adapter_ids.index(aid)], seed=1000 + step)
            versions[aid] = (await service.put_blob(aid, blob)).info.version
        wave = [rnd.choice(adapter_ids) for _ in range(rnd.randint(1, 6))]
        await asyncio.gather(*(request(aid) for aid in wave))
        assert service.cache.used_bytes <= capacity
        assert resident_bytes(service) == service.cache.used_bytes  # no lease left: counter == what is held
    assert service.cache.stats.evictions > 20, "the workload never pressed on the budget"


async def test_pinned_adapters_are_never_evicted_and_follow_new_versions(store, minilm_engine):
    pinned, others = ids(3, "pinned"), ids(30)
    p = 16
    one = kv_bytes(minilm_engine, p)
    service = AdapterService(store, minilm_engine, 6 * one, Limits())
    await seed_store(service, pinned + others, [p] * 33)
    await service.preload(pinned)
    held = {aid: service.cache.peek(aid) for aid in pinned}
    assert all(held.values())

    rnd = random.Random(3)
    for _ in range(120):
        async with service.lease(rnd.choice(others)):
            pass
        for aid in pinned:  # the very objects preloaded: never evicted, never reloaded
            assert service.cache.peek(aid) is held[aid]
    assert service.cache.stats.evictions >= 100
    assert all(store.reads[aid] == 1 for aid in pinned)

    # A new version of a pinned adapter replaces the pinned copy (reloaded at once, still pinned).
    info = (await service.put_blob(pinned[0], make_blob(minilm_engine.fp, p, seed=77))).info
    for _ in range(200):
        resident = service.cache.peek(pinned[0])
        if resident is not None and resident.version == info.version:
            break
        await asyncio.sleep(0.01)
    assert service.cache.peek(pinned[0]).version == info.version
    for _ in range(60):
        async with service.lease(rnd.choice(others)):
            pass
    assert service.cache.peek(pinned[0]).version == info.version and pinned[0] in service.cache.pins


async def test_fifty_concurrent_requests_for_a_cold_adapter_read_the_store_once(store, minilm_engine):
    cold = ids(4, "cold")
    service = AdapterService(store, minilm_engine, 64 * kv_bytes(minilm_engine, 16), Limits())
    await seed_store(service, cold, [16] * 4)
    store.reads.clear()

    async def request(aid: AdapterId):
        async with service.lease(aid) as resident:
            await asyncio.sleep(0)
            return resident

    got = await asyncio.gather(*(request(cold[0]) for _ in range(50)))
    assert store.reads[cold[0]] == 1
    assert all(r is got[0] for r in got)

    # Several cold adapters at once, requests interleaved: one read each.
    order = [aid for aid in cold[1:] for _ in range(50)]
    random.Random(0).shuffle(order)
    got = await asyncio.gather(*(request(aid) for aid in order))
    assert {aid: store.reads[aid] for aid in cold} == {cold[0]: 1, cold[1]: 1, cold[2]: 1, cold[3]: 1}
    assert service.cache.stats.loads == 4


async def test_an_adapter_leased_by_an_in_flight_request_is_not_evicted(store, minilm_engine):
    busy, others = AdapterId.of("busy", "a"), ids(12)
    one = kv_bytes(minilm_engine, 16)
    capacity = 3 * one
    service = AdapterService(store, minilm_engine, capacity, Limits())
    await seed_store(service, [busy, *others], [16] * 13)
    text_ids = minilm_engine.tokenize(["the service was great"], 16)[0]

    async with service.lease(busy) as resident:
        before, _ = minilm_engine.classify([Row(resident, text_ids)])
        for aid in others:  # far more than the budget passes through while the request runs
            async with service.lease(aid):
                assert service.cache.used_bytes <= capacity
            assert busy in service.cache and service.cache.peek(busy) is resident
        # A replacement published meanwhile retires the leased copy, which stays counted until released.
        await service.put_blob(busy, make_blob(minilm_engine.fp, 16, seed=999))
        assert busy not in service.cache
        assert service.cache.used_bytes >= resident.nbytes
        assert service.cache.used_bytes <= capacity
        after, _ = minilm_engine.classify([Row(resident, text_ids)])  # the request finishes on its version
        assert torch.equal(before[0], after[0])
    assert resident_bytes(service) == service.cache.used_bytes <= capacity
    evictions = service.cache.stats.evictions

    # Released, it is an ordinary entry again: LRU evicts it under pressure.
    async with service.lease(busy) as fresh:
        assert fresh.version == 2
    for aid in others[:4]:
        async with service.lease(aid):
            pass
    assert busy not in service.cache and service.cache.stats.evictions > evictions


async def test_resync_after_a_missed_event_also_covers_a_load_that_was_in_flight(store, minilm_engine):
    """The change feed was down while another replica published v2: a load that read v1 before the resync
    finishes after it. It must not leave v1 resident (nothing would ever correct it)."""
    aid, fp = AdapterId.of("t", "racy"), minilm_engine.fp
    service = AdapterService(store, minilm_engine, 8 * kv_bytes(minilm_engine, 16), Limits())
    await seed_store(service, [aid], [16])
    read_done, release = asyncio.Event(), asyncio.Event()
    get_blob = store.get_blob

    async def slow_get_blob(adapter_id, version=None):  # the real read, then held before materialising
        got = await get_blob(adapter_id, version)
        read_done.set()
        await release.wait()
        return got

    store.get_blob = slow_get_blob
    request = asyncio.create_task(service.resident(aid))
    await read_done.wait()  # the load has read version 1
    # another replica publishes v2 while this one's feed is down: no event
    await store.put(aid, make_blob(fp, 16, seed=42), AdapterMeta("classify", 16, MINILM_LABELS))
    await service.resync()  # what the feed does after reconnecting
    release.set()
    assert (await request).version == 1  # the request that started earlier may finish on v1...
    store.get_blob = get_blob
    assert (await service.resident(aid)).version == 2  # ...but v1 must not stay resident
