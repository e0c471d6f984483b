"""Resident-adapter cache: LRU bounded by bytes, one load per cold adapter however many requests want it.

The cache is generic over what it holds (the engine's device-resident adapters): it needs a loader and each
value's size in bytes. Its accounting (``used_bytes``) covers every value it holds on the device, including an
old version still leased by a running batch after ``invalidate`` replaced it, and never exceeds
``capacity_bytes``: a value that cannot fit (larger than the budget, or everything else pinned or leased) is
served but not kept. Eviction is LRU and skips pinned entries and entries a running batch holds (a lease).
"""
from __future__ import annotations

import asyncio
from collections import OrderedDict
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import AsyncIterator, Awaitable, Callable, Generic, Hashable, TypeVar

V = TypeVar("V")


class CacheFull(Exception):
    """A pinned value does not fit in the budget next to the other pinned values."""


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    loads: int = 0
    evictions: int = 0


@dataclass
class _Entry(Generic[V]):
    value: V
    size: int
    leases: int = 0
    pinned: bool = False
    retired: bool = False  # replaced or invalidated while leased; freed when the last lease ends


class AdapterCache(Generic[V]):
    def __init__(
        self,
        capacity_bytes: int,
        load: Callable[[Hashable], Awaitable[V]],
        size_of: Callable[[V], int] = lambda v: v.nbytes,
    ):
        self.capacity = capacity_bytes
        self._load, self._size_of = load, size_of
        self._entries: OrderedDict[Hashable, _Entry[V]] = OrderedDict()
        self._inflight: dict[Hashable, asyncio.Task] = {}
        self._generation: dict[Hashable, int] = {}
        self._pins: set[Hashable] = set()
        self.used_bytes = 0
        self.stats = CacheStats()

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._entries

    def keys(self) -> list[Hashable]:
        return list(self._entries)

    def loading(self) -> list[Hashable]:
        """Keys whose load is in flight (not yet resident)."""
        return list(self._inflight)

    @property
    def pins(self) -> frozenset:
        return frozenset(self._pins)

    def peek(self, key: Hashable) -> V | None:
        entry = self._entries.get(key)
        return entry.value if entry else None

    # --- reads ------------------------------------------------------------------------------------------------
    async def get(self, key: Hashable) -> V:
        entry = self._entries.get(key)
        if entry is not None:
            self._entries.move_to_end(key)
            self.stats.hits += 1
            return entry.value
        self.stats.misses += 1
        inflight = self._inflight.get(key)
        if inflight is None:
            inflight = asyncio.get_running_loop().create_task(self._fill(key))
            self._inflight[key] = inflight
        # shield: one caller giving up must not cancel the load the others wait for
        return await asyncio.shield(inflight)

    @asynccontextmanager
    async def lease(self, key: Hashable) -> AsyncIterator[V]:
        """``get`` and hold: the value is not evicted (nor its bytes freed) until the block ends."""
        value = await self.get(key)
        entry = self._entries.get(key)
        if entry is None or entry.value is not value:
            entry = None  # served uncached (did not fit, or replaced meanwhile): nothing to hold
        else:
            entry.leases += 1
        try:
            yield value
        finally:
            if entry is not None:
                entry.leases -= 1
                if entry.retired and entry.leases == 0:
                    self.used_bytes -= entry.size

    async def pin(self, key: Hashable) -> V:
        """Load ``key`` and keep it resident for good (also across new versions: the caller reloads it). A key
        that does not fit is un-pinned (``CacheFull``); one whose load fails stays pinned for a later load."""
        self._pins.add(key)
        value = await self.get(key)
        entry = self._entries.get(key)
        if entry is None or not entry.pinned:
            self._pins.discard(key)
            raise CacheFull(f"pinned adapter {key} does not fit in the cache budget of {self.capacity} bytes")
        return value

    # --- filling and eviction -----------------------------------------------------------------------------
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
        self._retire(key)
        if not self._make_room(size):
            return
        self._entries[key] = _Entry(value, size, pinned=key in self._pins)
        self.used_bytes += size

    def _make_room(self, size: int) -> bool:
        """Evict least recently used entries (never pinned or leased ones) until ``size`` fits."""
        if size > self.capacity:
            return False
        evictable = [k for k, e in self._entries.items() if not e.pinned and e.leases == 0]
        while self.used_bytes + size > self.capacity:
            if not evictable:
                return False
            self._retire(evictable.pop(0))
            self.stats.evictions += 1
        return True

    def _retire(self, key: Hashable) -> bool:
        entry = self._entries.pop(key, None)
        if entry is None:
            return False
        if entry.leases:
            entry.retired = True  # bytes stay counted until the running batch lets go
        else:
            self.used_bytes -= entry.size
        return True

    def invalidate(self, key: Hashable) -> bool:
        """Forget ``key`` (a new version was published or it was deleted). True if it was resident."""
        self._generation[key] = self._generation.get(key, 0) + 1
        self._inflight.pop(key, None)  # later gets start a fresh load instead of joining the stale one
        return self._retire(key)

    def unpin(self, key: Hashable) -> None:
        self._pins.discard(key)
        entry = self._entries.get(key)
        if entry is not None:
            entry.pinned = False
