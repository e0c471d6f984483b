"""Listing one tenant's adapters in Redis: the per-tenant index vs the SCAN it replaced, side by side.

One process, one throwaway key prefix on a Redis server: ``--adapters`` adapters spread over ``--tenants``
tenants are put through the current ``RedisStore``; then every listed tenant is read in full, page by page,
by the current store (its sorted-set index) and by ``RedisStore`` as it was at ``--before`` (loaded from git
history: it SCANs the whole key space with a MATCH on the tenant), in interleaved rounds. Prints a table of
p50/p99 and the ratio; the keys are removed afterwards.

    python -m benchmarks.bench_tenant_listing [--redis redis://127.0.0.1:6379/0] [--adapters 10000]
"""
from __future__ import annotations

import argparse
import asyncio
import importlib.util
import re
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from benchmarks._report import machine_info
from ptserve.adapters_store.ids import AdapterId
from ptserve.adapters_store.redis import RedisStore
from ptserve.adapters_store.store import AdapterMeta

ROOT = Path(__file__).resolve().parent.parent
BEFORE = "754b0c1"  # the last commit whose RedisStore listed a tenant by SCAN


def load_old_store(commit: str):
    """``RedisStore`` as the file ``adapters_store/redis_store.py`` had it at ``commit``, imported on top of
    today's sibling modules (its ``adapters_store.`` imports now read ``ptserve.adapters_store.``); its store
    registration is left out, so ``open_store`` keeps opening today's store."""
    source = subprocess.run(["git", "-C", str(ROOT), "show", f"{commit}:adapters_store/redis_store.py"],
                            check=True, capture_output=True, text=True).stdout
    source = re.sub(r"^from adapters_store\.", "from ptserve.adapters_store.", source, flags=re.M)
    source = re.sub(r"^@register_store\(.*\)\n", "", source, flags=re.M)
    path = Path(tempfile.mkdtemp(prefix="ptserve-old-store-")) / "old_redis_store.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("old_redis_store", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.RedisStore


async def list_all(store, tenant: str) -> int:
    cursor, n = None, 0
    while True:
        page = await store.list(tenant=tenant, cursor=cursor, limit=100)
        n += len(page.items)
        cursor = page.next_cursor
        if cursor is None:
            return n


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))]


async def main(args) -> None:
    prefix = "bench-tl-" + uuid.uuid4().hex[:8]
    url = f"{args.redis}?prefix={prefix}"
    stores = {"SCAN (before)": load_old_store(args.before)(url), "index (now)": RedisStore(url)}
    new = stores["index (now)"]
    ids = [AdapterId.of(f"t{i % args.tenants:04d}", f"a{i:06d}") for i in range(args.adapters)]
    meta, gate = AdapterMeta("classify", 16, ("neg", "pos")), asyncio.Semaphore(32)

    async def put(adapter_id: AdapterId) -> None:
        async with gate:
            await new.put(adapter_id, b"x" * 1024, meta)

    try:
        await asyncio.gather(*(put(i) for i in ids))
        t = time.perf_counter()
        await new.list(tenant="t0000", limit=1)  # the store's first tenant listing: the one-time index check
        first_s = time.perf_counter() - t
        per_tenant = args.adapters // args.tenants
        times: dict[str, list[float]] = {name: [] for name in stores}
        for _ in range(args.rounds):
            for name, store in stores.items():
                for k in range(min(args.listed, args.tenants)):
                    t = time.perf_counter()
                    assert await list_all(store, f"t{k:04d}") == per_tenant
                    times[name].append(time.perf_counter() - t)
    finally:
        raw = new._redis
        keys = [k async for k in raw.scan_iter(match=prefix + "*", count=1000)]
        for i in range(0, len(keys), 1000):
            await raw.unlink(*keys[i:i + 1000])
        for store in stores.values():
            await store.close()

    import redis

    info = machine_info(**{"redis-py": redis.__version__})
    print(f"- date: {info['date']}; machine: {info['cpu']}; {info['versions']}")
    print(f"- command: `{' '.join(['python -m benchmarks.bench_tenant_listing', *sys.argv[1:]])}`")
    print(f"- {args.adapters:,} adapters in {args.tenants} tenants ({per_tenant} each, pages of 100); "
          f"{min(args.listed, args.tenants)} tenants listed in full per round, {args.rounds} interleaved rounds; "
          f"first tenant listing (one-time index check): {first_s * 1e3:.0f} ms\n")
    print("| tenant listing | p50 (ms) | p99 (ms) | p50 ÷ index p50 |\n|---|---:|---:|---:|")
    base = pct(times["index (now)"], 50)
    for name, ts in times.items():
        print(f"| {name} | {pct(ts, 50) * 1e3:.2f} | {pct(ts, 99) * 1e3:.2f} | {pct(ts, 50) / base:.1f} |")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    ap.add_argument("--adapters", type=int, default=10_000)
    ap.add_argument("--tenants", type=int, default=100)
    ap.add_argument("--listed", type=int, default=50, help="tenants listed in full per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--before", default=BEFORE, help="commit whose RedisStore is the baseline")
    asyncio.run(main(ap.parse_args()))
