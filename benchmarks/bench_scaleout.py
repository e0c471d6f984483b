"""Scale-out through nginx (issue 7): two replicas behind the consistent-hash proxy vs one replica direct, and
the adapter cache hit ratio with consistent hashing vs round robin.

Everything runs on this machine through ``scripts.topology`` (redis-server, ``ptserve serve`` replicas on
the Redis store, nginx from docker/nginx/ptserve.conf.template):

1. **Throughput and latency**: a closed loop of ``--concurrency`` clients sends one-text classify requests
   over ``--hot-adapters`` adapters for ``--duration`` s (after a warm-up), against
   a. one replica (``PTSERVE_THREADS`` = all cores), directly;
   b. the same replica through nginx (the proxy's own cost);
   c. two replicas (``PTSERVE_THREADS`` = cores / 2 each) through nginx, with ``X-Ptserve-Adapter``.
   On one machine two replicas share the same cores: this measures the cost of the scale-out path, not a gain.
2. **Adapter cache hit ratio**: ``--adapters`` adapters (default 512) whose resident size totals 2× one
   replica's cache (``PTSERVE_CACHE_BYTES`` = half the total), requested uniformly at random through nginx,
   with the header (consistent hashing: each replica sees about half of the adapters) and without it (round
   robin: each replica sees all of them). Hits and misses are read from each replica's ``/metrics``
   (``ptserve_adapter_cache_hits_total``, ``ptserve_adapter_cache_misses_total``) before and after each phase.

Prints tables of the ratios; writes its section of ``RESULTS.md`` (between markers) and ``scaleout.png``
unless ``--no-write``. The load and the report live in ``benchmarks/scaleout/``.

    python -m benchmarks.bench_scaleout [--duration 20] [--concurrency 16] [--adapters 512] [--requests 3072]
"""
from __future__ import annotations

import argparse
import asyncio
import os
import shlex
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from benchmarks._report import machine_info, write_section
from benchmarks.scaleout.load import (
    ADMIN_KEY, HitRatio, Run, closed_loop, hit_ratio, minilm_fingerprint, resident_bytes, upload,
)
from benchmarks.scaleout.report import (
    chart_data, hit_latency_table, hit_table, throughput_table, tool_versions, uptime, write_chart,
)
from ptserve.adapters_store.format import encode_blob
from scripts.topology import Topology
from tests.factories import make_adapter  # random classify adapters, the tests' recipe

SECTION = "## Scale-out through nginx (issue 7)"
VIRTUAL_TOKENS = 16


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--duration", type=float, default=20.0, help="measured seconds per throughput setup")
    p.add_argument("--concurrency", type=int, default=16, help="closed-loop clients")
    p.add_argument("--hot-adapters", type=int, default=32, help="adapters in the throughput runs")
    p.add_argument("--adapters", type=int, default=512, help="adapters in the hit-ratio runs")
    p.add_argument("--requests", type=int, default=3072, help="measured requests per hit-ratio run")
    p.add_argument("--cores", type=int, default=os.cpu_count() or 2,
                   help="torch threads of the single replica")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent,
                   help="where RESULTS.md and the PNG go")
    p.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md and the PNG alone")
    return p.parse_args(argv)


@dataclass
class Plan:
    """The adapters and the cache size: one replica's cache holds half of them."""

    blobs: dict[str, bytes]  # adapter id -> blob
    hot: list[str]  # the throughput runs' adapters
    per_adapter: int  # resident bytes of one adapter
    cache_bytes: int  # PTSERVE_CACHE_BYTES of each replica

    @property
    def total(self) -> int:
        return self.per_adapter * len(self.blobs)

    @property
    def capacity(self) -> int:
        return self.cache_bytes // self.per_adapter


def plan(args) -> Plan:
    fp = minilm_fingerprint()
    adapters = {f"t{i % 16:02d}/a{i:03d}": make_adapter(fp, VIRTUAL_TOKENS, seed=i)
                for i in range(args.adapters)}
    per_adapter = resident_bytes(next(iter(adapters.values())))
    return Plan({aid: encode_blob(a) for aid, a in adapters.items()}, list(adapters)[: args.hot_adapters],
                per_adapter, per_adapter * len(adapters) // 2)


async def measure(p: Plan, args, run_dir: Path) -> tuple[list[Run], list[HitRatio]]:
    """Throughput one replica direct / through nginx, two replicas through nginx; then the hit ratios."""
    common = {"PTSERVE_LOG_LEVEL": "warning", "PTSERVE_CACHE_BYTES": str(p.cache_bytes)}
    runs: list[Run] = []
    one = Topology(run_dir / "one", replicas=1, admin_key=ADMIN_KEY, install=False,
                   env={**common, "PTSERVE_THREADS": str(args.cores)})
    with one:
        await upload(one.replica_url(0), {aid: p.blobs[aid] for aid in p.hot})
        print("one replica: direct ...", flush=True)
        runs.append(await closed_loop(one.replica_url(0), p.hot, args.concurrency, args.duration, True,
                                      "1 replica, direct"))
        print("one replica: through nginx ...", flush=True)
        runs.append(await closed_loop(one.proxy_url, p.hot, args.concurrency, args.duration, True,
                                      "1 replica through nginx"))
    two = Topology(run_dir / "two", replicas=2, admin_key=ADMIN_KEY, install=False,
                   env={**common, "PTSERVE_THREADS": str(max(1, args.cores // 2))})
    with two:
        print("two replicas: uploading ...", flush=True)
        await upload(two.proxy_url, p.blobs)
        print("two replicas: through nginx ...", flush=True)
        runs.append(await closed_loop(two.proxy_url, p.hot, args.concurrency, args.duration, True,
                                      "2 replicas through nginx"))
        print("hit ratio: consistent hashing ...", flush=True)
        ids = list(p.blobs)
        hits = [await hit_ratio(two, ids, args.requests, args.concurrency, True, "consistent hash")]
        print("hit ratio: round robin ...", flush=True)
        hits.append(await hit_ratio(two, ids, args.requests, args.concurrency, False, "round robin"))
    return runs, hits


def results_md(p: Plan, args, info: dict, load: tuple[str, str], tables: tuple[str, str, str],
               summary: str) -> str:
    """The RESULTS.md section: the run, how to read it, the tables."""
    command = shlex.join(["python", "-m", "benchmarks.bench_scaleout", *sys.argv[1:]])
    t1, t2, t3 = tables
    half = max(1, args.cores // 2)
    return f"""\
Machine: {info['cpu']}; {info['versions']}. Date: {info['date']}.
Command: `{command}`. Load (`uptime`) before: `{load[0]}`; after: `{load[1]}`.

Topology from `scripts.topology` (redis-server, `ptserve serve` replicas on the Redis store, nginx from
`docker/nginx/ptserve.conf.template`), MiniLM on CPU, one-text classify requests,
{VIRTUAL_TOKENS}-token adapters, {args.concurrency} closed-loop clients in one asyncio process on the same
machine. The single replica uses `PTSERVE_THREADS={args.cores}`; each of the two uses `{half}`: on one machine
the two replicas share the same cores, so the throughput rows measure the cost of the scale-out path (proxy
hop, split batches), not a gain — on separate machines each replica brings its own cores.

**Throughput and latency** ({args.duration:.0f} s measured per setup after a 3 s warm-up, {len(p.hot)} adapters,
header `X-Ptserve-Adapter` sent):

{t1}

**Adapter cache hit ratio**: {len(p.blobs)} adapters of {p.per_adapter} resident bytes
({p.total / 2**20:.1f} MiB in all), `PTSERVE_CACHE_BYTES={p.cache_bytes}` per replica
(= half: {p.capacity} adapters),
{args.requests} requests for uniformly random adapters after a warm-up of {2 * len(p.blobs)}; hits and misses
are the deltas of each replica's `ptserve_adapter_cache_hits_total` / `_misses_total`. "consistent hash" sends
the header (nginx `hash $http_x_ptserve_adapter consistent`), "round robin" does not (nginx's fallback).

{t2}

{t3}

{summary}. With hashing each replica sees only its share of the adapters (the ring's imbalance decides how far
that share exceeds one cache); with round robin both replicas see all of them and each cache holds about half.
"""


async def main_async(args) -> int:
    load_before = uptime()
    p = plan(args)
    print(f"{len(p.blobs)} adapters × {p.per_adapter} resident bytes = {p.total / 2**20:.1f} MiB; "
          f"PTSERVE_CACHE_BYTES={p.cache_bytes} ({p.capacity} adapters) per replica", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-scaleout-") as tmp:
        runs, hits = await measure(p, args, Path(tmp))
    load = (load_before, uptime())

    tables = throughput_table(runs), hit_table(hits, p.capacity), hit_latency_table(hits)
    ch, rr = hits
    summary = (f"consistent hashing ÷ round robin hit ratio: {ch.ratio:.3f} ÷ {rr.ratio:.3f} = "
               f"{ch.ratio / max(rr.ratio, 1e-9):.2f}×; misses {ch.misses:.0f} vs {rr.misses:.0f} "
               f"({rr.misses / max(ch.misses, 1):.1f}× fewer with hashing)")
    print("\n" + "\n\n".join(tables) + f"\n\n{summary}\nload before: {load[0]}\nload after:  {load[1]}")
    if args.no_write:
        return 0
    info = machine_info(**tool_versions())
    args.out.mkdir(parents=True, exist_ok=True)
    chart = args.out / "scaleout.png"
    title = f"ptserve scale-out through nginx ({info['cpu']}, {info['date']})"
    write_chart(*chart_data(runs, hits), chart, title)
    write_section(args.out / "RESULTS.md", "bench_scaleout", SECTION,
                  f"{results_md(p, args, info, load, tables, summary)}\n![scale-out](scaleout.png)\n")
    print(f"wrote {args.out / 'RESULTS.md'} and {chart}")
    return 0


def main(argv=None) -> int:
    return asyncio.run(main_async(parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
