"""The tenant key store contract, for the local directory and for Redis: keys are random, shown once, stored as
sha256 only, listed per tenant, revoked per tenant, and shared by every store object on the same backing store;
Redis outages answer 503 as they do for the adapter store."""
from __future__ import annotations

import asyncio
import uuid

import pytest

from ptserve.adapters_store.errors import InvalidAdapterId, StoreUnavailable
from ptserve.adapters_store.keys import KeyNotFound, hash_key, key_id_of, open_key_store


@pytest.fixture(params=["file", "redis"])
async def url(request, tmp_path):
    if request.param == "file":
        return f"file://{tmp_path}"
    return f"{request.getfixturevalue('redis_server')}?prefix=k{uuid.uuid4().hex[:10]}"


async def test_create_get_list_revoke(url):
    store, other = open_key_store(url), open_key_store(url)  # two replicas on one backing store
    try:
        key, record = await store.create("acme", "ci")
        assert key_id_of(key) == record.key_id and record.tenant == "acme" and record.name == "ci"
        assert record.sha256 == hash_key(key) and key not in repr(record)
        assert await other.get(record.key_id) == record
        key2, record2 = await store.create("acme")
        assert key2 != key and record2.key_id != record.key_id
        await store.create("globex")
        assert [r.key_id for r in await other.list("acme")] == [record.key_id, record2.key_id]
        assert "sha256" not in record.public()

        with pytest.raises(KeyNotFound):
            await other.revoke("globex", record.key_id)  # not globex's key
        await other.revoke("acme", record.key_id)
        assert await store.get(record.key_id) is None
        assert [r.key_id for r in await store.list("acme")] == [record2.key_id]
        with pytest.raises(KeyNotFound):
            await store.revoke("acme", record.key_id)
    finally:
        await store.close()
        await other.close()


async def test_malformed_ids_and_tenants(url):
    store = open_key_store(url)
    try:
        assert await store.get("../../etc/passwd") is None and await store.get("ABC") is None
        with pytest.raises(InvalidAdapterId):
            await store.create("Not A Tenant")
        for tenant in ("acme\n", "acme\r\n", "\nacme"):  # "$" would let a final newline through
            with pytest.raises(InvalidAdapterId):
                await store.create(tenant)
            with pytest.raises(InvalidAdapterId):
                await store.list(tenant)
        assert await store.list("nobody") == []
        _, record = await store.create("acme")
        assert await store.get(record.key_id) == record
        assert await store.get(record.key_id + "\n") is None
    finally:
        await store.close()


def test_key_id_of_accepts_only_well_formed_keys():
    assert key_id_of("ptk_0123456789abcdef_" + "a" * 43) == "0123456789abcdef"
    for bad in ("", "ptk_", "ptk_0123456789abcdef_short", "ptk_0123456789ABCDEF_" + "a" * 43, "admin",
                "ptk_0123456789abcdef_" + "a" * 43 + "\n", "ptk_0123456789abcdef_" + "a" * 43 + "\r\n"):
        assert key_id_of(bad) is None


# --- Redis outages: the key store shares the adapter store's connection and error mapping --------------------
async def test_redis_key_store_outages_answer_503_like_the_adapter_store(redis_server_factory):
    import redis.asyncio

    server = redis_server_factory()
    store, admin = open_key_store(server.url), redis.asyncio.Redis.from_url(server.url)
    try:
        key, record = await store.create("acme")
        await admin.replicaof("127.0.0.1", 1)  # a replica (of nothing): writes answer READONLY
        with pytest.raises(StoreUnavailable, match="ReadOnlyError"):
            await store.create("acme")
        with pytest.raises(StoreUnavailable, match="ReadOnlyError"):
            await store.revoke("acme", record.key_id)
        assert await store.get(record.key_id) == record  # reads still work
        server.kill()
        with pytest.raises(StoreUnavailable, match="key store"):
            await store.get(record.key_id)
        with pytest.raises(StoreUnavailable):
            await store.list("acme")
    finally:
        await admin.aclose()
        await store.close()


async def test_a_redis_restart_between_key_lookups_fails_no_lookup(redis_server_factory):
    """Pooled connections to the old process are dead after a restart; each is replaced on first use (one
    immediate retry on a connection error, as for the adapter store), so no lookup after it answers 503."""
    server = redis_server_factory(persistent=True)
    store = open_key_store(server.url)
    try:
        _, record = await store.create("acme")
        await asyncio.gather(*(store.get(record.key_id) for _ in range(4)))  # several idle connections pooled
        server.kill()
        server.start()
        for _ in range(4):  # sequential: each takes a pooled (stale) connection
            assert await store.get(record.key_id) == record
    finally:
        await store.close()
