"""Tenant API keys in Redis: one hash per store prefix, ``<prefix>:apikeys``, field key id -> record JSON, over a
connection made and error-mapped exactly as the adapter store's (``connection``)."""
from __future__ import annotations

import json
from dataclasses import asdict

from ptserve.adapters_store.ids import check_tenant
from ptserve.adapters_store.keys import KEY_ID_RE, KeyNotFound, KeyRecord, KeyStore
from ptserve.adapters_store.redis.connection import RedisOptions, connect, translated
from ptserve.adapters_store.redis.layout import API_KEYS


class RedisKeyStore(KeyStore):
    def __init__(self, url: str):
        opts = RedisOptions.parse(url)
        self.hash = opts.prefix + API_KEYS
        self.where = f"key store {opts.redacted_url}"  # names this store in StoreUnavailable messages
        self._redis = connect(opts)

    @translated
    async def _put(self, record: KeyRecord) -> None:
        await self._redis.hset(self.hash, record.key_id, json.dumps(asdict(record)))

    @translated
    async def get(self, key_id: str) -> KeyRecord | None:
        if not KEY_ID_RE.fullmatch(key_id):
            return None
        raw = await self._redis.hget(self.hash, key_id)
        return None if raw is None else KeyRecord(**json.loads(raw))

    @translated
    async def list(self, tenant: str) -> list[KeyRecord]:
        check_tenant(tenant)
        raw = await self._redis.hgetall(self.hash)
        records = [r for v in raw.values() if (r := KeyRecord(**json.loads(v))).tenant == tenant]
        return sorted(records, key=lambda r: (r.created_at, r.key_id))

    @translated
    async def revoke(self, tenant: str, key_id: str) -> None:
        record = await self.get(key_id)
        if record is None or record.tenant != tenant or not await self._redis.hdel(self.hash, key_id):
            raise KeyNotFound(f"tenant {tenant} has no key {key_id}")

    async def close(self) -> None:
        await self._redis.aclose()
