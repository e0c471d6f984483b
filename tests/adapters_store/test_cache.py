"""``AdapterCache``: single flight, a byte budget that always holds, LRU eviction, invalidation, errors."""
from __future__ import annotations

import asyncio
import random
from collections import OrderedDict
from dataclasses import dataclass

import pytest

from ptserve.adapters_store.cache import AdapterCache


@dataclass(frozen=True)
class Value:
    key: str
    nbytes: int
    load_no: int  # which load of this key produced it


class Loader:
    """Loads ``Value(key, size)``, counting calls; optional gate to hold loads in flight."""

    def __init__(self, sizes: dict[str, int], delay: float = 0.005):
        self.sizes, self.delay = sizes, delay
        self.calls: dict[str, int] = {}
        self.gate: asyncio.Event | None = None
        self.entered = asyncio.Event()
        self.fail: set[str] = set()

    async def __call__(self, key: str) -> Value:
        self.calls[key] = self.calls.get(key, 0) + 1
        n = self.calls[key]
        self.entered.set()
        await asyncio.sleep(self.delay)
        if self.gate is not None:
            await self.gate.wait()
        if key in self.fail:
            raise RuntimeError(f"store down while loading {key}")
        return Value(key, self.sizes[key], n)

    @property
    def total(self) -> int:
        return sum(self.calls.values())


def check_budget(cache: AdapterCache) -> None:
    resident = [cache.peek(k) for k in cache.keys()]
    assert cache.used_bytes == sum(v.nbytes for v in resident)
    assert cache.used_bytes <= cache.capacity
    assert len(cache) == len(resident)


async def test_concurrent_gets_of_a_cold_key_load_once():
    loader = Loader({"a": 10})
    cache = AdapterCache(100, loader)
    values = await asyncio.gather(*(cache.get("a") for _ in range(50)))
    assert loader.calls == {"a": 1}
    assert all(v is values[0] for v in values)
    assert values[0] == Value("a", 10, 1)
    assert cache.stats.loads == 1 and cache.stats.misses == 50 and cache.stats.hits == 0
    assert await cache.get("a") is values[0]
    assert cache.stats.hits == 1 and loader.total == 1
    check_budget(cache)


async def test_concurrent_gets_of_many_cold_keys_load_each_once():
    sizes = {f"k{i}": 5 for i in range(10)}
    loader = Loader(sizes)
    cache = AdapterCache(1000, loader)
    keys = [f"k{i % 10}" for i in range(200)]
    random.Random(3).shuffle(keys)
    values = await asyncio.gather(*(cache.get(k) for k in keys))
    assert [v.key for v in values] == keys
    assert loader.calls == {k: 1 for k in sizes}
    check_budget(cache)


@pytest.mark.parametrize("seed", range(6))
async def test_byte_budget_holds_across_random_gets_and_matches_a_reference_lru(seed):
    rng = random.Random(seed)
    capacity = 100
    sizes = {f"k{i}": rng.choice([1, 7, 20, 33, 50, 99, 100, 101, 250]) for i in range(15)}
    loader = Loader(sizes, delay=0)
    cache = AdapterCache(capacity, loader)
    model: OrderedDict[str, int] = OrderedDict()  # reference LRU: key -> size, oldest first
    for _ in range(300):
        key = rng.choice(list(sizes))
        if rng.random() < 0.1:
            assert cache.invalidate(key) == (key in model)
            model.pop(key, None)
        else:
            value = await cache.get(key)
            assert (value.key, value.nbytes) == (key, sizes[key])
            if key in model:
                model.move_to_end(key)
            elif sizes[key] <= capacity:
                while sum(model.values()) + sizes[key] > capacity:
                    model.popitem(last=False)
                model[key] = sizes[key]
        check_budget(cache)
        assert cache.keys() == list(model), seed
    assert cache.stats.misses == loader.total == cache.stats.loads
    assert cache.stats.evictions > 0


async def test_least_recently_used_is_evicted_first():
    loader = Loader({k: 10 for k in "abcdef"}, delay=0)
    cache = AdapterCache(30, loader)
    for k in "abc":
        await cache.get(k)
    await cache.get("a")  # a is now the most recent; b the least
    await cache.get("d")
    assert cache.keys() == ["c", "a", "d"]
    assert cache.stats.evictions == 1
    await cache.get("c")
    await cache.get("e")
    assert cache.keys() == ["d", "c", "e"]
    assert "a" not in cache and "b" not in cache
    await cache.get("b")  # evicted keys load again
    assert loader.calls["b"] == 2
    check_budget(cache)


async def test_one_large_value_evicts_as_many_as_it_needs():
    loader = Loader({"a": 10, "b": 10, "c": 5, "big": 20}, delay=0)
    cache = AdapterCache(30, loader)
    for k in "abc":
        await cache.get(k)
    assert cache.used_bytes == 25
    await cache.get("big")  # 25 + 20 > 30: a and b go (oldest first), c stays
    assert cache.keys() == ["c", "big"]
    assert cache.used_bytes == 25 and cache.stats.evictions == 2
    check_budget(cache)


async def test_value_larger_than_capacity_is_served_but_not_cached():
    loader = Loader({"small": 10, "huge": 31}, delay=0)
    cache = AdapterCache(30, loader)
    await cache.get("small")
    huge = await cache.get("huge")
    assert huge == Value("huge", 31, 1)
    assert "huge" not in cache and cache.keys() == ["small"]  # and nothing was evicted for it
    assert cache.used_bytes == 10 and cache.stats.evictions == 0
    again = await cache.get("huge")
    assert again.load_no == 2 and loader.calls["huge"] == 2


async def test_zero_capacity_caches_nothing():
    loader = Loader({"a": 1}, delay=0)
    cache = AdapterCache(0, loader)
    assert (await cache.get("a")).key == "a"
    assert len(cache) == 0 and cache.used_bytes == 0
    await cache.get("a")
    assert loader.calls["a"] == 2


async def test_invalidate_during_an_in_flight_load_keeps_the_value_out():
    loader = Loader({"a": 10})
    loader.gate = asyncio.Event()
    cache = AdapterCache(100, loader)
    waiter = asyncio.create_task(cache.get("a"))
    await asyncio.wait_for(loader.entered.wait(), 1)
    assert cache.invalidate("a") is False  # not resident yet
    loader.gate.set()
    value = await asyncio.wait_for(waiter, 1)
    assert value == Value("a", 10, 1)  # the caller that asked before the invalidation is still served
    assert "a" not in cache and cache.used_bytes == 0
    fresh = await cache.get("a")
    assert fresh.load_no == 2 and "a" in cache


async def test_get_after_invalidate_does_not_join_the_stale_in_flight_load():
    loader = Loader({"a": 10})
    loader.gate = asyncio.Event()
    cache = AdapterCache(100, loader)
    old = asyncio.create_task(cache.get("a"))
    await asyncio.wait_for(loader.entered.wait(), 1)
    cache.invalidate("a")  # e.g. a new version was published while v1 was loading
    new = asyncio.create_task(cache.get("a"))
    await asyncio.sleep(0.02)
    loader.gate.set()
    old_value, new_value = await asyncio.wait_for(asyncio.gather(old, new), 1)
    assert old_value.load_no == 1
    assert new_value.load_no == 2  # loaded after the invalidation
    assert cache.peek("a") is new_value
    check_budget(cache)


async def test_invalidate_drops_a_resident_value():
    loader = Loader({"a": 10, "b": 5}, delay=0)
    cache = AdapterCache(100, loader)
    await cache.get("a")
    await cache.get("b")
    assert cache.invalidate("a") is True
    assert cache.keys() == ["b"] and cache.used_bytes == 5
    assert cache.invalidate("a") is False
    assert (await cache.get("a")).load_no == 2


async def test_loader_error_reaches_every_waiter_and_a_later_get_retries():
    loader = Loader({"a": 10})
    loader.fail.add("a")
    cache = AdapterCache(100, loader)
    results = await asyncio.gather(*(cache.get("a") for _ in range(20)), return_exceptions=True)
    assert loader.calls == {"a": 1}
    assert all(isinstance(r, RuntimeError) and "store down while loading a" in str(r) for r in results)
    assert "a" not in cache and cache.used_bytes == 0
    loader.fail.clear()
    value = await cache.get("a")
    assert value == Value("a", 10, 2) and "a" in cache


async def test_a_cancelled_caller_does_not_cancel_the_load_for_the_others():
    loader = Loader({"a": 10})
    loader.gate = asyncio.Event()
    cache = AdapterCache(100, loader)
    quitter = asyncio.create_task(cache.get("a"))
    stayer = asyncio.create_task(cache.get("a"))
    await asyncio.wait_for(loader.entered.wait(), 1)
    quitter.cancel()
    await asyncio.gather(quitter, return_exceptions=True)
    loader.gate.set()
    assert (await asyncio.wait_for(stayer, 1)).load_no == 1
    assert "a" in cache and loader.calls == {"a": 1}
