"""``RedisStore``: the shared adapter store — versioned blobs published by Lua scripts, a per-tenant index for
listing, a change feed — composed of this package's parts over one client.

A superseded version expires ``gc_grace_s`` after the put that replaced it, so requests that resolved it just
before can finish. Key layout: ``layout``.
"""
from __future__ import annotations

import json
from typing import Awaitable, Callable, Iterable

from ptserve.adapters_store.ids import AdapterId, check_tenant
from ptserve.adapters_store.redis.blobs import Blobs, get_many, info_of, not_found, version_fields
from ptserve.adapters_store.redis.connection import RedisOptions, connect, translated
from ptserve.adapters_store.redis.feed import ChangeFeed
from ptserve.adapters_store.redis.layout import CUR, EVENTS, NEXT, VERSIONS, adapter_base
from ptserve.adapters_store.redis.listing import scan_page
from ptserve.adapters_store.redis.scripts import register_scripts
from ptserve.adapters_store.redis.tenant_index import TenantIndex
from ptserve.adapters_store.store import AdapterInfo, AdapterMeta, AdapterStore, Page, register_store


class RedisStore(AdapterStore):
    """Options: URL query ``?prefix=&timeout_s=&gc_grace_s=&health_check_interval=``, or as kwargs."""

    def __init__(self, url: str, **options):
        opts = RedisOptions.parse(url, **options)
        self.url, self.redacted_url = opts.url, opts.redacted_url
        self.prefix, self.timeout_s, self.gc_grace_s = opts.prefix, opts.timeout_s, opts.gc_grace_s
        self.health_check_interval = opts.health_check_interval
        self.where = f"adapter store {self.redacted_url}"  # names this store in StoreUnavailable messages
        self.channel = self.prefix + EVENTS
        self._redis = connect(opts)
        self._publish, read, self._delete = register_scripts(self._redis)
        self._blobs = Blobs(self._redis, read)
        self._index = TenantIndex(self._redis, self.prefix)
        self._feed = ChangeFeed(self._redis, self.channel, self.timeout_s, self.health_check_interval)

    @property
    def connected(self) -> bool:
        """The change feed's subscription is up (for readiness reporting)."""
        return self._feed.connected

    def _base(self, adapter_id: AdapterId) -> str:
        return adapter_base(self.prefix, adapter_id)

    @translated
    async def put(self, adapter_id: AdapterId, blob: bytes, meta: AdapterMeta) -> AdapterInfo:
        base, blob = self._base(adapter_id), bytes(blob)
        fields = await version_fields(adapter_id, blob, meta)
        grace_ms = round(self.gc_grace_s * 1000)
        # the info JSON without its opening brace: the publish script writes '{"version": N, ' before it
        args = [base, blob, json.dumps(fields)[1:], grace_ms, self.channel, str(adapter_id)]
        await self._index.add(adapter_id)  # indexed before it is published: a listing never misses it ...
        info = info_of(await self._publish(keys=[base + CUR, base + NEXT, base + VERSIONS], args=args))
        await self._index.add(adapter_id)  # ... and again after, in case a concurrent delete took it out
        return info

    @translated
    async def get_info(self, adapter_id: AdapterId) -> AdapterInfo:
        raw = await self._redis.get(self._base(adapter_id) + CUR)
        if raw is None:
            raise not_found(adapter_id)
        return info_of(raw)

    @translated
    async def get_blob(self, adapter_id: AdapterId, version: int | None = None) -> tuple[AdapterInfo, bytes]:
        return await self._blobs.read(adapter_id, self._base(adapter_id), version)

    @translated
    async def list(self, tenant: str | None = None, cursor: str | None = None, limit: int = 100) -> Page:
        """One tenant: one page of its index, in id order across pages (``next_cursor``: the page's last name).
        All tenants: one page of a SCAN over the cur keys, sorted by id within the page (not across pages;
        ``listing.scan_page``)."""
        if limit < 1:
            raise ValueError(f"limit must be >= 1, got {limit}")
        if tenant is not None:
            return await self._index.page(check_tenant(tenant), cursor, limit)
        return await scan_page(self._redis, self.prefix, cursor, limit)

    @translated
    async def delete(self, adapter_id: AdapterId) -> None:
        base = self._base(adapter_id)
        args = [base, self.channel, str(adapter_id)]
        deleted = await self._delete(keys=[base + CUR, base + VERSIONS], args=args)
        await self._index.discard(adapter_id)
        if not deleted:
            raise not_found(adapter_id)

    @translated
    async def versions(self, ids: Iterable[AdapterId]) -> dict[AdapterId, int | None]:
        ids = list(ids)
        raws = await get_many(self._redis, [self._base(i) + CUR for i in ids])
        return {i: None if raw is None else info_of(raw).version for i, raw in zip(ids, raws)}

    @translated
    async def ping(self) -> None:
        await self._redis.ping()

    async def watch(
        self,
        on_event: Callable[[AdapterId, int | None], Awaitable[None] | None],
        on_resync: Callable[[], Awaitable[None] | None],
    ) -> None:
        """``feed.ChangeFeed.watch`` on ``<prefix>:events``."""
        await self._feed.watch(on_event, on_resync)

    async def close(self) -> None:
        """Close the client; a running ``watch`` is cancelled (its pub/sub connection closes with it)."""
        await self._feed.close()
        await self._redis.aclose()


@register_store("redis")
@register_store("rediss")
def open_redis_store(url: str) -> RedisStore:
    return RedisStore(url)
