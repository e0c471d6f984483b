"""Resident-adapter cache: LRU bounded by bytes, one load per cold adapter however many requests want it.

The cache is generic over what it holds (the engine's device-resident adapters): it needs a loader and each
value's size in bytes. It never holds more than ``capacity_bytes``; a value larger than the whole budget is
served but not kept. ``invalidate`` drops an entry and makes an in-flight load of it not stick.
"""
from __future__ import annotations

import asyncio
from collections import OrderedDict
from dataclasses import dataclass
from typing import Awaitable, Callable, Generic, Hashable, TypeVar

V = TypeVar("V")


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    loads: int = 0
    evictions: int = 0


class AdapterCache(Generic[V]):
    def __init__(
        self,
        capacity_bytes: int,
        load: Callable[[Hashable], Awaitable[V]],
        size_of: Callable[[V], int] = lambda v: v.nbytes,
    ):
        self.capacity = capacity_bytes
        self._load, self._size_of = load, size_of
        self._entries: OrderedDict[Hashable, tuple[V, int]] = OrderedDict()
        self._inflight: dict[Hashable, asyncio.Future] = {}
        self._generation: dict[Hashable, int] = {}
        self.used_bytes = 0
        self.stats = CacheStats()

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._entries

    def keys(self) -> list[Hashable]:
        return list(self._entries)

    def peek(self, key: Hashable) -> V | None:
        entry = self._entries.get(key)
        return entry[0] if entry else None

    async def get(self, key: Hashable) -> V:
        entry = self._entries.get(key)
        if entry is not None:
            self._entries.move_to_end(key)
            self.stats.hits += 1
            return entry[0]
        self.stats.misses += 1
        inflight = self._inflight.get(key)
        if inflight is None:
            inflight = asyncio.get_running_loop().create_task(self._fill(key))
            self._inflight[key] = inflight
        # shield: one caller giving up must not cancel the load the others wait for
        return await asyncio.shield(inflight)

    async def _fill(self, key: Hashable) -> V:
        generation = self._generation.get(key, 0)
        task = asyncio.current_task()
        try:
            self.stats.loads += 1
            value = await self._load(key)
        finally:
            if self._inflight.get(key) is task:  # invalidate may have detached us; don't drop a newer load
                del self._inflight[key]
        if self._generation.get(key, 0) == generation:  # not invalidated while loading
            self._insert(key, value)
        return value

    def _insert(self, key: Hashable, value: V) -> None:
        size = self._size_of(value)
        self._drop(key)
        if size > self.capacity:
            return
        while self.used_bytes + size > self.capacity and self._entries:
            old, (_, old_size) = self._entries.popitem(last=False)
            self.used_bytes -= old_size
            self.stats.evictions += 1
        self._entries[key] = (value, size)
        self.used_bytes += size

    def _drop(self, key: Hashable) -> bool:
        entry = self._entries.pop(key, None)
        if entry is not None:
            self.used_bytes -= entry[1]
        return entry is not None

    def invalidate(self, key: Hashable) -> bool:
        """Forget ``key`` (a new version was published or it was deleted). True if it was resident."""
        self._generation[key] = self._generation.get(key, 0) + 1
        self._inflight.pop(key, None)  # later gets start a fresh load instead of joining the stale one
        return self._drop(key)
