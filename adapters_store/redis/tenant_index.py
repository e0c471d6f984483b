"""The per-tenant index: ``<prefix>:idx:{<tenant>}``, a sorted set of the tenant's adapter names (all scores 0,
read in name order with ZRANGE BYLEX), so listing one tenant costs its page, not a SCAN of every tenant's keys.

It lives in another slot than the adapters' keys, so it cannot be updated inside their scripts; it is kept a
superset of the live adapters instead (see ``TenantIndex.discard``), and names of adapters that are gone are
skipped and cleaned when listed. ``<prefix>:idx-ready`` marks a store whose adapters written before the index
existed have been added to it.
"""
from __future__ import annotations

import logging

import redis.asyncio

from ptserve.adapters_store.errors import InvalidAdapterId, InvalidInput
from ptserve.adapters_store.ids import NAME_RE, AdapterId
from ptserve.adapters_store.redis.blobs import get_many, info_of
from ptserve.adapters_store.redis.layout import (
    CUR, IDX_READY, adapter_base, cur_pattern, id_of_cur_key, index_key,
)
from ptserve.adapters_store.store import Page

log = logging.getLogger(__name__)


class TenantIndex:
    def __init__(self, client: redis.asyncio.Redis, prefix: str):
        self._redis, self.prefix = client, prefix

    async def add(self, adapter_id: AdapterId) -> None:
        await self._redis.zadd(index_key(self.prefix, adapter_id.tenant), {adapter_id.name: 0})

    async def discard(self, adapter_id: AdapterId) -> None:
        """Take a name out of its tenant's index unless its adapter is live. ZREM, then re-add if it is live:
        with a put's ZADD after its publish, whichever of the two comes last restores a live adapter's name,
        so the index always holds every live adapter (a name may outlive its adapter; listing skips it)."""
        index = index_key(self.prefix, adapter_id.tenant)
        await self._redis.zrem(index, adapter_id.name)
        if await self._redis.exists(adapter_base(self.prefix, adapter_id) + CUR):
            await self._redis.zadd(index, {adapter_id.name: 0})

    async def page(self, tenant: str, cursor: str | None, limit: int) -> Page:
        """One page of the tenant's live adapters in id order (``next_cursor``: the page's last name)."""
        if cursor is not None and not NAME_RE.fullmatch(cursor):
            raise InvalidInput(f"invalid list cursor {cursor!r}")
        await self._ensure()
        names = await self._redis.zrange(index_key(self.prefix, tenant), f"({cursor}" if cursor else "-", "+",
                                         bylex=True, offset=0, num=limit)
        ids = [AdapterId.of(tenant, n.decode()) for n in names]
        items = []
        raws = await get_many(self._redis, [adapter_base(self.prefix, i) + CUR for i in ids])
        for adapter_id, raw in zip(ids, raws):
            if raw is None:  # deleted, or a put that failed or is not published yet: skip, clean if gone
                await self.discard(adapter_id)
            else:
                items.append(info_of(raw))
        return Page(items=items, next_cursor=names[-1].decode() if len(names) == limit else None)

    async def _ensure(self) -> None:
        """Once per store: adapters written before the index existed are added to it by one SCAN, then the
        marker is set. Idempotent, so replicas may race through it. The marker is checked on every tenant
        listing (one EXISTS), so after a rolling upgrade from a version without the index, deleting
        ``<prefix>:idx-ready`` once the last old replica is gone makes the next tenant listing rebuild it."""
        if await self._redis.exists(self.prefix + IDX_READY):
            return
        match, pos = cur_pattern(self.prefix), 0
        while True:
            pos, keys = await self._redis.scan(pos, match=match, count=1000)
            pipe = self._redis.pipeline(transaction=False)
            for key in keys:
                try:
                    adapter_id = id_of_cur_key(self.prefix, key)
                except (InvalidAdapterId, UnicodeDecodeError):
                    log.warning("not indexing %r: not an adapter key of this store", key[:200])
                    continue
                pipe.zadd(index_key(self.prefix, adapter_id.tenant), {adapter_id.name: 0})
            await pipe.execute()
            if pos == 0:
                break
        await self._redis.set(self.prefix + IDX_READY, b"1")
