"""What only the Redis store promises (the shared contract is in ``test_store_contract.py``): key layout,
hash tags, Lua-atomic publish, expiry of superseded versions, SCAN listing, change feed, outages as 503."""
from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import random
import signal
import time

import pytest
import redis.asyncio

from ptserve.adapters_store.errors import (
    AdapterNotFound, IntegrityError, InvalidAdapterId, InvalidInput, StoreUnavailable,
)
from ptserve.adapters_store.ids import AdapterId
from ptserve.adapters_store.redis import RedisStore
from ptserve.adapters_store.redis.layout import BLOB, CUR, INFO, NEXT, VERSIONS
from ptserve.adapters_store.store import AdapterMeta, open_store

META = AdapterMeta(task="classification", num_virtual_tokens=16, labels=("neg", "pos"))
ID = AdapterId.of("acme", "sentiment")


def make_blob(seed: int, size: int = 4096) -> bytes:
    return random.Random(seed).randbytes(size)


@pytest.fixture
def prefix(redis_prefix) -> str:
    return redis_prefix


@pytest.fixture
async def raw(redis_server):
    client = redis.asyncio.Redis.from_url(redis_server)
    yield client
    await client.aclose()


@pytest.fixture
async def open_redis(redis_server, prefix):
    """Open stores on the session server under this test's prefix; all are closed afterwards."""
    stores: list[RedisStore] = []

    def make(**options) -> RedisStore:
        stores.append(RedisStore(f"{redis_server}?prefix={prefix}", **options))
        return stores[-1]

    yield make
    for s in stores:
        await s.close()


async def wait_for(predicate, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


def test_options_come_from_the_url_or_kwargs_and_round_trip():
    s = open_store("redis://127.0.0.1:1/3?prefix=ps.x&timeout_s=0.5&gc_grace_s=5&health_check_interval=2")
    assert isinstance(s, RedisStore)
    assert (s.prefix, s.timeout_s, s.gc_grace_s, s.health_check_interval) == ("ps.x", 0.5, 5.0, 2.0)
    again = open_store(s.url)
    assert (again.prefix, again.timeout_s, again.gc_grace_s) == ("ps.x", 0.5, 5.0)
    assert again.channel == "ps.x:events"
    assert RedisStore("rediss://u:secret@h:1/0", prefix="k", timeout_s=2).prefix == "k"
    assert "secret" not in RedisStore("redis://u:secret@h:1/0").redacted_url
    assert RedisStore("redis://h:1/0").prefix == "ptserve"
    for bad in ("a{b", "a*", ""):
        with pytest.raises(ValueError):
            RedisStore("redis://h:1/0", prefix=bad)


async def test_keys_of_one_adapter_share_a_hash_tag_and_slot(open_redis, raw, prefix):
    from redis.crc import key_slot

    store = open_redis()
    await store.put(ID, make_blob(1), META)
    last = await store.put(ID, make_blob(2), META)
    await store.put(AdapterId.of("acme", "other"), b"x", META)
    keys = {k.decode() async for k in raw.scan_iter(match=f"{prefix}:{{acme/sentiment}}:*")}
    base = f"{prefix}:{{acme/sentiment}}"
    assert keys == {base + s for s in (CUR, NEXT, VERSIONS, BLOB + "1", INFO + "1", BLOB + "2", INFO + "2")}
    assert {key_slot(k.encode()) for k in keys} == {key_slot(b"{acme/sentiment}")}
    assert key_slot(f"{prefix}:{{acme/other}}:cur".encode()) != key_slot(b"{acme/sentiment}")
    assert await raw.get(base + ":cur") == await raw.get(base + ":info:2")
    assert AdapterId.parse(last.id) == ID and await raw.get(base + ":blob:2") == make_blob(2)
    assert await raw.ttl(base + ":cur") == -1 and await raw.ttl(base + ":blob:2") == -1  # current: no expiry
    with pytest.raises(InvalidAdapterId):  # an unchecked id could break out of the hash tag
        await store.put(AdapterId("acme", "x}{y"), b"x", META)


async def test_corrupted_or_missing_blob_raises_integrity_error(open_redis, raw, prefix):
    store = open_redis()
    await store.put(ID, make_blob(5), META)
    blob_key = f"{prefix}:{{acme/sentiment}}:blob:1"
    data = bytearray(await raw.get(blob_key))
    data[100] ^= 0xFF
    await raw.set(blob_key, bytes(data))
    for version in (None, 1):
        with pytest.raises(IntegrityError):
            await store.get_blob(ID, version)
    await raw.set(blob_key, make_blob(5)[:-1])
    with pytest.raises(IntegrityError):
        await store.get_blob(ID)
    await raw.delete(blob_key)
    with pytest.raises(IntegrityError):  # cur names a missing blob: damage, not a race
        await store.get_blob(ID)


async def test_superseded_version_is_readable_during_the_grace_then_expires(open_redis, raw, prefix):
    store = open_redis(gc_grace_s=1)
    await store.put(ID, make_blob(1), META)
    await store.put(ID, make_blob(2), META)
    assert (await store.get_blob(ID, version=1))[1] == make_blob(1)
    base = f"{prefix}:{{acme/sentiment}}"
    assert 0 < await raw.pttl(base + ":blob:1") <= 1000 and 0 < await raw.pttl(base + ":info:1") <= 1000
    await asyncio.sleep(1.2)
    with pytest.raises(AdapterNotFound):
        await store.get_blob(ID, version=1)
    assert (await store.get_blob(ID))[1] == make_blob(2)
    await store.put(ID, make_blob(3), META)
    assert await raw.smembers(base + VERSIONS) == {b"2", b"3"}  # expired members are pruned


async def test_scan_listing_returns_every_adapter_exactly_once(open_redis):
    store = open_redis()
    ids = [AdapterId.of(f"t{i % 5}", f"m{i:04d}") for i in range(2500)]
    gate = asyncio.Semaphore(64)

    async def put(i: AdapterId):
        async with gate:
            await store.put(i, str(i).encode(), META)

    await asyncio.gather(*(put(i) for i in ids))
    seen, cursor, pages = [], None, 0
    while True:
        page = await store.list(cursor=cursor, limit=100)
        names = [info.id for info in page.items]
        assert len(names) <= 100 and names == sorted(names)
        seen += names
        pages += 1
        if (cursor := page.next_cursor) is None:
            break
    assert len(seen) == len(set(seen)) == 2500 and set(seen) == {str(i) for i in ids}
    assert pages >= 25

    one_tenant, cursor = [], None
    while True:
        page = await store.list(tenant="t3", cursor=cursor, limit=100)
        one_tenant += [info.id for info in page.items]
        if (cursor := page.next_cursor) is None:
            break
    assert sorted(one_tenant) == sorted(str(i) for i in ids if i.tenant == "t3")
    with pytest.raises(InvalidInput):
        await store.list(cursor="not-a-cursor")


async def test_prefixes_isolate_stores(redis_server, prefix):
    a, b = RedisStore(f"{redis_server}?prefix={prefix}"), RedisStore(f"{redis_server}?prefix={prefix}:x")
    try:
        await a.put(ID, b"a", META)
        await b.put(AdapterId.of("acme", "b"), b"b", META)
        assert [i.id for i in (await a.list()).items] == ["acme/sentiment"]
        assert [i.id for i in (await b.list()).items] == ["acme/b"]
        assert await b.versions([ID]) == {ID: None}
    finally:
        await a.close()
        await b.close()


async def test_publish_is_atomic_for_a_concurrent_reader(open_redis):
    writer, reader = open_redis(gc_grace_s=0), open_redis()  # no grace: a superseded blob is deleted at once
    blobs = [make_blob(i, 100_000) for i in range(50)]
    hashes = {hashlib.sha256(b).hexdigest(): v for v, b in enumerate(blobs, start=1)}
    done, reads = asyncio.Event(), []

    async def read_loop():
        while not done.is_set():
            try:
                info, data = await reader.get_blob(ID)
            except AdapterNotFound:
                assert not reads, "an adapter that had a version must always be found"
                await asyncio.sleep(0)
                continue
            # (a torn read raises IntegrityError in get_blob)
            assert hashes[hashlib.sha256(data).hexdigest()] == info.version
            reads.append(info.version)

    async def write_all():
        for b in blobs:
            await writer.put(ID, b, META)
            await asyncio.sleep(0)
        done.set()

    await asyncio.gather(write_all(), read_loop())
    assert reads == sorted(reads) and len(set(reads)) > 5, reads


async def test_change_feed_delivers_puts_and_deletes(open_redis, redis_server, prefix):
    watcher, writer = open_redis(), open_redis()
    other = RedisStore(f"{redis_server}?prefix={prefix}x")  # another prefix, so another channel
    events, resyncs = [], []

    async def on_resync():
        resyncs.append(await watcher.versions([ID]))

    task = asyncio.create_task(watcher.watch(lambda i, v: events.append((i, v)), on_resync))
    try:
        await wait_for(lambda: watcher.connected and resyncs)
        assert resyncs == [{ID: None}]
        await writer.put(ID, b"1", META)
        await other.put(ID, b"elsewhere", META)
        await writer.put(ID, b"2", META)
        await writer.delete(ID)
        await wait_for(lambda: len(events) == 3)
        assert events == [(ID, 1), (ID, 2), (ID, None)]
    finally:
        await other.close()
        await watcher.close()
    await asyncio.wait([task], timeout=2)
    assert task.done() and not watcher.connected


async def test_outage_answers_503_fast_and_the_feed_reconnects(redis_server_factory, caplog):
    server = redis_server_factory()
    store = RedisStore(server.url, timeout_s=1)
    await store.put(ID, b"before", META)
    resyncs, events = [], []
    task = asyncio.create_task(store.watch(lambda i, v: events.append((i, v)), lambda: resyncs.append(1)))
    try:
        await wait_for(lambda: store.connected and len(resyncs) == 1)
        caplog.set_level(logging.WARNING, logger="ptserve.adapters_store.redis.feed")
        server.kill()
        await wait_for(lambda: not store.connected, timeout=2)
        calls = {
            "put": lambda: store.put(ID, b"x", META), "get_info": lambda: store.get_info(ID),
            "get_blob": lambda: store.get_blob(ID), "list": lambda: store.list(),
            "delete": lambda: store.delete(ID), "versions": lambda: store.versions([ID]), "ping": store.ping,
        }
        for name, call in calls.items():
            start = time.monotonic()
            with pytest.raises(StoreUnavailable):
                await call()
            assert time.monotonic() - start < 2, name
        await asyncio.sleep(1.5)  # several reconnect attempts (0.1, 0.2, 0.4, 0.8 s apart), one warning
        assert not task.done() and not store.connected and len(resyncs) == 1
        assert sum("change feed lost" in r.message for r in caplog.records) == 1

        server.start()  # same port, empty (no persistence)
        await wait_for(lambda: store.connected and len(resyncs) == 2, timeout=5)
        assert (await store.put(ID, b"after", META)).version == 1
        assert (await store.get_blob(ID))[1] == b"after"
        await wait_for(lambda: events == [(ID, 1)])
        assert sum("change feed back" in r.message for r in caplog.records) == 1
    finally:
        await store.close()


async def test_a_restart_between_requests_fails_no_request(redis_server_factory):
    """Pooled connections to the old process are dead after a restart; each is replaced on first use (one
    immediate retry on a connection error), so the first requests after the restart do not answer 503."""
    server = redis_server_factory(persistent=True)
    store = RedisStore(server.url)
    try:
        await store.put(ID, b"x", META)
        await asyncio.gather(*(store.get_info(ID) for _ in range(8)))  # several idle connections pooled
        server.kill()
        server.start()
        for _ in range(8):  # sequential: each takes a pooled (stale) connection
            assert (await store.get_info(ID)).version == 1
        assert (await store.put(ID, b"y", META)).version == 2
    finally:
        await store.close()


async def test_a_hung_server_answers_503_within_the_timeout(redis_server_factory):
    server = redis_server_factory()
    store = RedisStore(server.url, timeout_s=0.5, health_check_interval=0.5)
    await store.put(ID, b"x", META)
    resyncs = []
    task = asyncio.create_task(store.watch(lambda i, v: None, lambda: resyncs.append(1)))
    try:
        await wait_for(lambda: store.connected)
        os.kill(server.proc.pid, signal.SIGSTOP)
        try:
            start = time.monotonic()
            with pytest.raises(StoreUnavailable):
                await store.get_info(ID)
            assert time.monotonic() - start < 1.5
            await wait_for(lambda: not store.connected, timeout=3)  # the silent pub/sub peer is noticed
        finally:
            os.kill(server.proc.pid, signal.SIGCONT)
        await wait_for(lambda: store.connected and len(resyncs) == 2, timeout=5)
        assert (await store.get_info(ID)).version == 1 and not task.done()
    finally:
        await store.close()


async def test_a_server_that_refuses_writes_answers_503(redis_server_factory, monkeypatch):
    server = redis_server_factory()
    store, admin = RedisStore(server.url), redis.asyncio.Redis.from_url(server.url)
    try:
        await store.put(ID, b"x", META)
        await admin.config_set("maxmemory", 1)  # OOM: writes refused
        with pytest.raises(StoreUnavailable, match="OutOfMemoryError"):
            await store.put(ID, b"y", META)
        await admin.config_set("maxmemory", 0)
        await admin.replicaof("127.0.0.1", 1)  # a replica (of nothing): READONLY
        with pytest.raises(StoreUnavailable, match="ReadOnlyError"):
            await store.delete(ID)
        assert (await store.get_info(ID)).version == 1  # reads still work

        async def misconf(*args, **kwargs):
            raise redis.exceptions.ResponseError("MISCONF Redis is configured to save RDB snapshots, but ...")

        monkeypatch.setattr(store._redis, "get", misconf)
        with pytest.raises(StoreUnavailable, match="MISCONF"):
            await store.get_info(ID)

        async def bug(*args, **kwargs):
            raise redis.exceptions.ResponseError("ERR wrong number of arguments")

        monkeypatch.setattr(store._redis, "get", bug)
        with pytest.raises(redis.exceptions.ResponseError):  # our bug, not an outage: no 503 disguise
            await store.get_info(ID)
    finally:
        await admin.aclose()
        await store.close()


# --- the tenant index ---------------------------------------------------------------------------------------
async def _scans(raw) -> int:
    return (await raw.info("commandstats")).get("cmdstat_scan", {}).get("calls", 0)


async def test_listing_one_tenant_reads_its_index_not_the_keyspace(redis_server_factory):
    server = redis_server_factory()
    store, raw = RedisStore(server.url), redis.asyncio.Redis.from_url(server.url)
    try:
        ids = [AdapterId.of(f"t{i % 10}", f"m{i:03d}") for i in range(300)]
        for i in ids:
            await store.put(i, b"x", META)
        await store.list(tenant="t0", limit=1)  # the first tenant listing checks for older adapters once
        scans = await _scans(raw)
        for tenant in ("t3", "t7"):
            seen, cursor = [], None
            while True:
                page = await store.list(tenant=tenant, cursor=cursor, limit=7)
                seen += [info.id for info in page.items]
                if page.next_cursor is None:
                    break
                cursor = page.next_cursor
            assert seen == sorted(str(i) for i in ids if i.tenant == tenant)  # complete, in order across pages
        assert await _scans(raw) == scans, "a tenant listing scanned the keyspace"
        assert len((await store.list(tenant="t3", limit=1000)).items) == 30
        with pytest.raises(InvalidInput):
            await store.list(tenant="t3", cursor="../x")
    finally:
        await raw.aclose()
        await store.close()


async def test_adapters_written_before_the_index_are_listed(open_redis, raw, prefix):
    ids = [AdapterId.of("acme", f"a{i}") for i in range(5)] + [AdapterId.of("other", "b")]
    await asyncio.gather(*(open_redis().put(i, b"x", META) for i in ids))
    # what a store written by a version without the index looks like
    await raw.delete(f"{prefix}:idx:{{acme}}", f"{prefix}:idx:{{other}}", f"{prefix}:idx-ready")
    await raw.set(f"{prefix}:{{not/an/id}}:cur", b"{}")  # a stray key matching the pattern is skipped
    fresh = open_redis()
    assert [i.id for i in (await fresh.list(tenant="acme")).items] == [f"acme/a{i}" for i in range(5)]
    assert [i.id for i in (await fresh.list(tenant="other")).items] == ["other/b"]
    assert await raw.exists(f"{prefix}:idx-ready")
    # an old replica uploads after the marker is set (no index entry); deleting the marker re-indexes, also
    # for a store instance that has listed before
    await fresh.put(AdapterId.of("other", "c"), b"x", META)
    await raw.zrem(f"{prefix}:idx:{{other}}", "c")
    assert [i.id for i in (await fresh.list(tenant="other")).items] == ["other/b"]
    await raw.delete(f"{prefix}:idx-ready")
    assert [i.id for i in (await fresh.list(tenant="other")).items] == ["other/b", "other/c"]


async def test_the_index_holds_every_live_adapter_under_racing_puts_and_deletes(open_redis, raw, prefix):
    """Puts and deletes of the same ids race from two store clients (two replicas); afterwards the tenant
    listing equals what is live, and names of deleted adapters are gone from the index once listed."""
    a, b = open_redis(), open_redis()
    await a.list(tenant="race")  # the store is marked indexed: no backfill SCAN will repair the index later
    names = [f"n{i}" for i in range(6)]
    rng = random.Random(7)

    async def churn(store: RedisStore, seed: int) -> None:
        r = random.Random(seed)
        for _ in range(60):
            adapter_id = AdapterId.of("race", r.choice(names))
            if r.random() < 0.5:
                await store.put(adapter_id, b"x", META)
            else:
                with contextlib.suppress(AdapterNotFound):
                    await store.delete(adapter_id)

    await asyncio.gather(*(churn(s, rng.random()) for s in (a, b) for _ in range(4)))
    live = []
    for name in names:
        with contextlib.suppress(AdapterNotFound):
            live.append(str((await a.get_info(AdapterId.of("race", name))).id))
    assert [i.id for i in (await b.list(tenant="race")).items] == sorted(live)
    assert sorted(m.decode() for m in await raw.zrange(f"{prefix}:idx:{{race}}", 0, -1)) == \
        sorted(i.split("/")[1] for i in live)


async def test_a_delete_that_lands_inside_a_put_leaves_the_put_listed(open_redis):
    """The two interleavings that could drop a live adapter from the index, forced: (1) a delete's ZREM
    between a put's first ZADD and its publish; (2) a put completing between a delete's script and its ZREM."""
    a, b = open_redis(), open_redis()
    one, two = AdapterId.of("race", "one"), AdapterId.of("race", "two")
    await a.list(tenant="race")  # the store is marked indexed: no backfill SCAN will repair the index later

    publish = a._publish

    async def delete_first(*args, **kwargs):
        with contextlib.suppress(AdapterNotFound):
            await b.delete(one)  # its ZREM runs here, after a's first ZADD, before a's publish
        return await publish(*args, **kwargs)

    a._publish = delete_first
    await a.put(one, b"x", META)
    a._publish = publish

    await a.put(two, b"x", META)
    delete_script = b._delete

    async def put_meanwhile(*args, **kwargs):
        gone = await delete_script(*args, **kwargs)
        await a.put(two, b"y", META)  # published and indexed before b's ZREM
        return gone

    b._delete = put_meanwhile
    await b.delete(two)
    assert (await a.get_info(two)).version == 2 and (await a.get_info(one)).version == 1
    assert [i.id for i in (await a.list(tenant="race")).items] == ["race/one", "race/two"]
