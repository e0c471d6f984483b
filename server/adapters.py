"""Adapter management on the request path: validate uploads, publish to the store, serve resident copies.

Every upload (ptserve blob or PEFT folder) passes ``decode_blob`` against the loaded backbone before it reaches
the store; the cache holds device-resident copies and is invalidated when this server publishes or deletes.
"""
from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from adapters_store.cache import AdapterCache
from adapters_store.format import Adapter
from adapters_store.ids import AdapterId
from adapters_store.peft_folder import peft_to_blob
from adapters_store.store import AdapterInfo, AdapterMeta, AdapterStore, Page
from adapters_store.validation import Limits, decode_blob
from server.engine import Engine
from server.resident import ResidentAdapter


@dataclass
class Uploaded:
    info: AdapterInfo
    notes: list[str] = field(default_factory=list)


class AdapterService:
    def __init__(self, store: AdapterStore, engine: Engine, cache_bytes: int, limits: Limits):
        self.store, self.engine, self.limits = store, engine, limits
        self.fp = engine.fp
        self.head_kind = engine.backbone.family.head_kind
        self.cache: AdapterCache[ResidentAdapter] = AdapterCache(cache_bytes, self._load)

    # --- uploads ----------------------------------------------------------------------------------------------
    def decode(self, blob: bytes) -> Adapter:
        return decode_blob(blob, self.fp, self.head_kind, self.limits)

    async def put_blob(self, adapter_id: AdapterId, blob: bytes) -> Uploaded:
        adapter = await asyncio.to_thread(self.decode, blob)
        return Uploaded(await self._publish(adapter_id, blob, adapter))

    async def put_peft(
        self, adapter_id: AdapterId, config_raw: bytes, weights_raw: bytes, labels: list[str] | None
    ) -> Uploaded:
        blob, adapter, notes = await asyncio.to_thread(
            peft_to_blob, config_raw, weights_raw, self.fp, self.engine.backbone.name, self.head_kind, labels,
            self.limits,
        )
        return Uploaded(await self._publish(adapter_id, blob, adapter), notes)

    async def _publish(self, adapter_id: AdapterId, blob: bytes, adapter: Adapter) -> AdapterInfo:
        cfg = adapter.config
        info = await self.store.put(adapter_id, blob, AdapterMeta(cfg.task, cfg.num_virtual_tokens, cfg.labels))
        self.cache.invalidate(adapter_id)
        return info

    # --- reads ------------------------------------------------------------------------------------------------
    async def info(self, adapter_id: AdapterId) -> AdapterInfo:
        return await self.store.get_info(adapter_id)

    async def blob(self, adapter_id: AdapterId) -> tuple[AdapterInfo, bytes]:
        return await self.store.get_blob(adapter_id)

    async def list(self, tenant: str | None, cursor: str | None, limit: int) -> Page:
        return await self.store.list(tenant=tenant, cursor=cursor, limit=limit)

    async def delete(self, adapter_id: AdapterId) -> None:
        await self.store.delete(adapter_id)
        self.cache.invalidate(adapter_id)

    async def resident(self, adapter_id: AdapterId) -> ResidentAdapter:
        return await self.cache.get(adapter_id)

    async def _load(self, adapter_id: AdapterId) -> ResidentAdapter:
        info, blob = await self.store.get_blob(adapter_id)

        def materialise() -> ResidentAdapter:
            return self.engine.make_resident(self.decode(blob), str(adapter_id), info.version)

        return await asyncio.to_thread(materialise)

