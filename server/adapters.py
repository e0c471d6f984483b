"""Adapter management on the request path: validate uploads, publish to the store, serve resident copies.

Every upload (ptserve blob or PEFT folder) passes ``decode_blob`` against the loaded backbone before it reaches
the store; the cache holds device-resident copies and is invalidated when this server publishes or deletes.
"""
from __future__ import annotations

import asyncio
import logging
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable

from ptserve.adapters_store.cache import AdapterCache
from ptserve.adapters_store.errors import StoreUnavailable
from ptserve.adapters_store.format import Adapter
from ptserve.adapters_store.ids import AdapterId
from ptserve.adapters_store.peft_folder import peft_to_blob
from ptserve.adapters_store.store import AdapterInfo, AdapterMeta, AdapterStore, Page
from ptserve.adapters_store.validation import Limits, decode_blob
from ptserve.server.engine import Engine  # or an API worker's Frontend (no weights: no _load)
from ptserve.server.logs import note
from ptserve.server.resident import ResidentAdapter

log = logging.getLogger(__name__)


@dataclass
class Uploaded:
    info: AdapterInfo
    notes: list[str] = field(default_factory=list)


class AdapterService:
    def __init__(self, store: AdapterStore, engine: Engine, cache_bytes: int, limits: Limits):
        self.store, self.engine, self.limits = store, engine, limits
        self.fp = engine.fp
        self.head_kind = engine.backbone.family.head_kind
        self.serves = engine.backbone.family.tasks  # an upload of another task could never be used: refused
        self.cache: AdapterCache[ResidentAdapter] = AdapterCache(cache_bytes, self._load)
        self._tasks: set[asyncio.Task] = set()
        # told of every version this service publishes (None: deleted); an API worker tells its engine core
        self.listeners: list[Callable[[AdapterId, int | None], None]] = []

    # --- uploads ----------------------------------------------------------------------------------------------
    def decode(self, blob: bytes) -> Adapter:
        return decode_blob(blob, self.fp, self.head_kind, self.limits, self.serves)

    async def put_blob(self, adapter_id: AdapterId, blob: bytes) -> Uploaded:
        adapter = await asyncio.to_thread(self.decode, blob)
        return Uploaded(await self._publish(adapter_id, blob, adapter))

    async def put_peft(
        self, adapter_id: AdapterId, config_raw: bytes, weights_raw: bytes, labels: list[str] | None
    ) -> Uploaded:
        blob, adapter, notes = await asyncio.to_thread(
            peft_to_blob, config_raw, weights_raw, self.fp, self.engine.backbone.name, self.head_kind, labels,
            self.limits, self.serves,
        )
        return Uploaded(await self._publish(adapter_id, blob, adapter), notes)

    async def _publish(self, adapter_id: AdapterId, blob: bytes, adapter: Adapter) -> AdapterInfo:
        cfg = adapter.config
        info = await self.store.put(adapter_id, blob, AdapterMeta(cfg.task, cfg.num_virtual_tokens, cfg.labels))
        self._refresh(adapter_id)
        self._tell(adapter_id, info.version)
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
        self.cache.unpin(adapter_id)
        self.cache.invalidate(adapter_id)
        self._tell(adapter_id, None)

    async def resident(self, adapter_id: AdapterId) -> ResidentAdapter:
        return await self.cache.get(adapter_id)

    @asynccontextmanager
    async def lease(self, adapter_id: AdapterId) -> AsyncIterator[ResidentAdapter]:
        """The resident adapter, held (not evicted) for as long as the request's rows are in flight."""
        async with self.cache.lease(adapter_id) as resident:
            note(adapter=resident.id, version=resident.version)  # for the request's access-log line
            yield resident

    async def preload(self, ids: list[AdapterId]) -> None:
        """Load and pin adapters that must always be resident (``PTSERVE_PRELOAD``). An unknown adapter, or
        one that does not fit, fails start-up; a store outage does not: the pin stays and the adapter loads at
        the resync after the change feed (re)connects, or with the first request for it."""
        for adapter_id in ids:
            try:
                await self.cache.pin(adapter_id)
            except StoreUnavailable as exc:
                log.warning("preloaded adapter %s waits for the store: %s", adapter_id, exc)

    # --- freshness across replicas ------------------------------------------------------------------------
    async def watch(self) -> None:
        """Follow the store's change feed (a long-lived task); the local store has none and returns at once."""
        await self.store.watch(self.on_change, self.resync)

    async def on_change(self, adapter_id: AdapterId, version: int | None) -> None:
        """Another replica (or this one) published ``version`` of ``adapter_id``, or deleted it (None)."""
        resident = self.cache.peek(adapter_id)
        if resident is not None and resident.version == version:
            return
        self._refresh(adapter_id)

    async def resync(self) -> None:
        """After (re)connecting to the change feed: re-check what we hold, since events may have been missed."""
        # A load still in flight may have read a version whose successor's event was missed; its waiters get
        # what it read, but it must not become resident, where no event would ever correct it.
        loading = set(self.cache.loading())
        for adapter_id in loading:
            self._refresh(adapter_id)
        for adapter_id in self.cache.pins - loading:  # pins whose load failed while the store was out
            if adapter_id not in self.cache:
                self._refresh(adapter_id)
        held = list(self.cache.keys())
        if not held:
            return
        current = await self.store.versions(held)
        for adapter_id in held:
            resident = self.cache.peek(adapter_id)
            if resident is not None and resident.version != current.get(adapter_id):
                self._refresh(adapter_id)

    def _tell(self, adapter_id: AdapterId, version: int | None) -> None:
        for listener in self.listeners:
            try:
                listener(adapter_id, version)
            except Exception:  # a listener must never fail an upload
                log.exception("adapter change listener failed")

    def _refresh(self, adapter_id: AdapterId) -> None:
        self.cache.invalidate(adapter_id)
        if adapter_id in self.cache.pins:  # pinned adapters stay resident: fetch the new version now
            task = asyncio.get_running_loop().create_task(self._repin(adapter_id))
            self._tasks.add(task)  # the loop keeps only a weak reference to a task
            task.add_done_callback(self._tasks.discard)

    async def _repin(self, adapter_id: AdapterId) -> None:
        try:
            await self.cache.pin(adapter_id)
        except Exception as exc:  # deleted, or store down: the next request loads it (or answers 404/503)
            log.warning("could not reload pinned adapter %s: %s", adapter_id, exc)

    async def _load(self, adapter_id: AdapterId) -> ResidentAdapter:
        info, blob = await self.store.get_blob(adapter_id)

        def materialise() -> ResidentAdapter:
            return self.engine.make_resident(self.decode(blob), str(adapter_id), info.version)

        return await asyncio.to_thread(materialise)

