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
unless ``--no-write``.

    python -m benchmarks.bench_scaleout [--duration 20] [--concurrency 16] [--adapters 512] [--requests 3072]
"""
from __future__ import annotations

import argparse
import asyncio
import os
import random
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from benchmarks._report import machine_info, write_section
from ptserve.adapters_store.fingerprint import BackboneFingerprint
from ptserve.adapters_store.format import encode_blob
from scripts import topology
from tests.factories import make_adapter  # random classify adapters, the tests' recipe

SECTION = "## Scale-out through nginx (issue 7)"
VIRTUAL_TOKENS = 16
ADMIN_KEY = "bench-scaleout-admin-key"
WORDS = """the a service order delivery was very not quite good bad slow fast late price quality support staff
product package arrived broken fine great terrible refund again never always would recommend return app
update crashed works screen battery hotel clean dirty food cold warm waiter rude kind helpful answer waited
""".split()


# --- workload -----------------------------------------------------------------------------------------------
def minilm_fingerprint() -> BackboneFingerprint:
    from ptserve.server.backbone import load_backbone

    return load_backbone("minilm", device="cpu", dtype="float32").fingerprint


def resident_bytes(adapter) -> int:
    """What the cache counts for one adapter on CPU fp32: the prefix K/V plus the head, all float32."""
    return sum(t.numel() for t in adapter.tensors.values()) * 4


def texts(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 20))) for _ in range(n)]


async def upload(url: str, blobs: dict[str, bytes]) -> None:
    auth = {"authorization": f"Bearer {ADMIN_KEY}"}
    async with httpx.AsyncClient(base_url=url, headers=auth, timeout=60) as c:
        sem = asyncio.Semaphore(4)

        async def one(aid: str, blob: bytes) -> None:
            async with sem:
                r = await c.put(f"/v1/adapters/{aid}", content=blob,
                                headers={"content-type": "application/octet-stream"})
                assert r.status_code == 201, r.text

        await asyncio.gather(*(one(aid, blob) for aid, blob in blobs.items()))


@dataclass
class Run:
    name: str
    requests: int
    seconds: float
    latencies: list[float]
    errors: int
    replicas: dict[str, int]

    @property
    def rps(self) -> float:
        return self.requests / self.seconds

    def quantile(self, q: float) -> float:
        xs = sorted(self.latencies)
        return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


async def closed_loop(url: str, adapters: list[str], concurrency: int, duration: float, affinity: bool,
                      name: str, warmup: float = 3.0) -> Run:
    """``concurrency`` clients, each sending its next request as soon as the last one answered."""
    corpus = texts(256, seed=1)
    latencies, replicas, errors = [], {}, 0
    start = time.perf_counter()
    measure_from, stop_at = start + warmup, start + warmup + duration

    async def client(k: int) -> None:
        nonlocal errors
        rng = random.Random(k)
        async with httpx.AsyncClient(base_url=url, headers={"authorization": f"Bearer {ADMIN_KEY}"},
                                     timeout=60) as c:
            while (t0 := time.perf_counter()) < stop_at:
                aid = rng.choice(adapters)
                headers = {"X-Ptserve-Adapter": aid} if affinity else {}
                r = await c.post("/v1/classify", json={"adapter": aid, "inputs": [rng.choice(corpus)]},
                                 headers=headers)
                t1 = time.perf_counter()
                if t0 >= measure_from and t1 <= stop_at:
                    latencies.append(t1 - t0)
                    replica = r.headers.get("x-ptserve-replica", "?")
                    replicas[replica] = replicas.get(replica, 0) + 1
                    errors += r.status_code != 200

    await asyncio.gather(*(client(k) for k in range(concurrency)))
    return Run(name, len(latencies), duration, latencies, errors, replicas)


async def fixed_requests(url: str, adapters: list[str], n: int, concurrency: int, affinity: bool,
                         seed: int) -> Run:
    """``n`` requests for uniformly random adapters, ``concurrency`` at a time."""
    rng = random.Random(seed)
    order = [rng.choice(adapters) for _ in range(n)]
    corpus = texts(64, seed=seed)
    latencies, replicas, errors = [], {}, 0
    queue = asyncio.Queue()
    for aid in order:
        queue.put_nowait(aid)

    async def client() -> None:
        nonlocal errors
        async with httpx.AsyncClient(base_url=url, headers={"authorization": f"Bearer {ADMIN_KEY}"},
                                     timeout=60) as c:
            while not queue.empty():
                aid = queue.get_nowait()
                headers = {"X-Ptserve-Adapter": aid} if affinity else {}
                t0 = time.perf_counter()
                r = await c.post("/v1/classify", json={"adapter": aid, "inputs": [rng.choice(corpus)]},
                                 headers=headers)
                latencies.append(time.perf_counter() - t0)
                replica = r.headers.get("x-ptserve-replica", "?")
                replicas[replica] = replicas.get(replica, 0) + 1
                errors += r.status_code != 200

    t = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    return Run("", n, time.perf_counter() - t, latencies, errors, replicas)


def cache_counters(url: str) -> dict[str, float]:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name in ("ptserve_adapter_cache_hits_total", "ptserve_adapter_cache_misses_total",
                          "ptserve_adapter_cache_resident_adapters", "ptserve_adapter_cache_evictions_total"):
                out[s.name.removeprefix("ptserve_adapter_cache_")] = s.value
    return out


@dataclass
class HitRatio:
    mode: str
    per_replica: dict[str, tuple[float, float, float]]  # replica -> (hits, misses, resident adapters after)
    run: Run

    @property
    def hits(self) -> float:
        return sum(h for h, _, _ in self.per_replica.values())

    @property
    def misses(self) -> float:
        return sum(m for _, m, _ in self.per_replica.values())

    @property
    def ratio(self) -> float:
        return self.hits / max(1.0, self.hits + self.misses)


async def hit_ratio(topo, adapters: list[str], n: int, concurrency: int, affinity: bool,
                    mode: str) -> HitRatio:
    # warm-up: enough random requests that each replica's LRU holds this mode's steady state
    await fixed_requests(topo.proxy_url, adapters, 2 * len(adapters), concurrency, affinity, seed=11)
    before = {topo.replica_id(i): cache_counters(topo.replica_url(i)) for i in range(topo.replicas)}
    run = await fixed_requests(topo.proxy_url, adapters, n, concurrency, affinity, seed=12)
    run.name = mode
    after = {topo.replica_id(i): cache_counters(topo.replica_url(i)) for i in range(topo.replicas)}
    per = {r: (after[r]["hits_total"] - before[r]["hits_total"],
               after[r]["misses_total"] - before[r]["misses_total"], after[r]["resident_adapters"])
           for r in after}
    return HitRatio(mode, per, run)


# --- report -------------------------------------------------------------------------------------------------
def tool_versions() -> dict[str, str]:
    nginx = topology.find_binary("nginx", install=False)
    nginx_v = subprocess.run([nginx, "-v"], capture_output=True, text=True).stderr.strip().split("/")[-1]
    redis_v = subprocess.run(["redis-server", "--version"], capture_output=True, text=True).stdout.split()[2]
    return {"nginx": nginx_v, "redis": redis_v.removeprefix("v=")}


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def throughput_table(runs: list[Run]) -> str:
    base = runs[0]
    columns = ["setup", "requests/s", "p50 (ms)", "p99 (ms)", "throughput ÷ direct", "p99 ÷ direct", "errors",
               "answered by"]
    rows = ["| " + " | ".join(columns) + " |", "|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in runs:
        by = ", ".join(f"{k} {v}" for k, v in sorted(r.replicas.items()))
        p50, p99 = r.quantile(0.5) * 1e3, r.quantile(0.99) * 1e3
        rows.append(f"| {r.name} | {r.rps:.1f} | {p50:.1f} | {p99:.1f} | {r.rps / base.rps:.2f} | "
                    f"{r.quantile(0.99) / base.quantile(0.99):.2f} | {r.errors} | {by} |")
    return "\n".join(rows)


def hit_table(results: list[HitRatio], capacity: int) -> str:
    rows = ["| routing | replica | hits | misses | hit ratio | resident adapters (capacity) |",
            "|---|---|---:|---:|---:|---:|"]
    for h in results:
        for replica, (hits, misses, resident) in sorted(h.per_replica.items()):
            rows.append(f"| {h.mode} | {replica} | {hits:.0f} | {misses:.0f} | "
                        f"{hits / max(1.0, hits + misses):.3f} | {resident:.0f} ({capacity}) |")
        rows.append(f"| **{h.mode}** | **both** | {h.hits:.0f} | {h.misses:.0f} | **{h.ratio:.3f}** | |")
    return "\n".join(rows)


def hit_latency_table(results: list[HitRatio]) -> str:
    rows = ["| routing | requests/s | p50 (ms) | p99 (ms) | errors |", "|---|---:|---:|---:|---:|"]
    for h in results:
        r = h.run
        p50, p99 = r.quantile(0.5) * 1e3, r.quantile(0.99) * 1e3
        rows.append(f"| {h.mode} | {r.rps:.1f} | {p50:.1f} | {p99:.1f} | "
                    f"{r.errors} |")
    return "\n".join(rows)


def chart_data(runs: list[Run], hits: list[HitRatio]) -> tuple[list[tuple[str, float, float]],
                                                               list[tuple[str, float]]]:
    """What the chart shows: (setup, requests/s, p99 ms) and (routing / replica, hit ratio)."""
    throughput = [(r.name, r.rps, r.quantile(0.99) * 1e3) for r in runs]
    ratios = []
    for h in hits:
        short = "hash" if h.mode.startswith("consistent") else "rr"
        for replica, (hit, miss, _) in sorted(h.per_replica.items()):
            ratios.append((f"{short}\n{replica}", hit / max(1.0, hit + miss)))
        ratios.append((f"{short}\nboth", h.ratio))
    return throughput, ratios


def write_chart(throughput: list[tuple[str, float, float]], ratios: list[tuple[str, float]], path: Path,
                title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(13, 4))
    names = [name.replace(" through ", "\nthrough ").replace(", direct", "\ndirect")
             for name, _, _ in throughput]
    colors = ["#999999", "#aec7e8", "#1f77b4"][: len(names)]
    panels = ((ax1, [t[1] for t in throughput], "requests / s", "throughput (higher is better)"),
              (ax2, [t[2] for t in throughput], "p99 latency (ms)", "p99 latency (lower is better)"))
    for ax, values, label, what in panels:
        bars = ax.bar(names, values, color=colors)
        ax.bar_label(bars, labels=[f"{v:.0f}" for v in values], padding=2)
        ax.set_ylim(0, max(values) * 1.18)
        ax.set_ylabel(label)
        ax.set_title(what, fontsize=9)
        ax.tick_params(axis="x", labelsize=8)
    labels, values = [r[0] for r in ratios], [r[1] for r in ratios]
    colors = ["#2ca02c" if lab.startswith("hash") else "#d62728" for lab in labels]
    bars = ax3.bar(labels, values, color=colors)
    ax3.bar_label(bars, labels=[f"{v:.2f}" for v in values], padding=2)
    ax3.set_ylim(0, 1.15)
    ax3.set_ylabel("adapter cache hit ratio")
    ax3.set_title("cache hit ratio, adapters = 2x one cache\n(hash: consistent hash, rr: round robin)",
                  fontsize=9)
    ax3.tick_params(axis="x", labelsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --- main ---------------------------------------------------------------------------------------------------
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


async def main_async(args) -> int:
    load_before = uptime()
    fp = minilm_fingerprint()
    adapters = {f"t{i % 16:02d}/a{i:03d}": make_adapter(fp, VIRTUAL_TOKENS, seed=i)
                for i in range(args.adapters)}
    blobs = {aid: encode_blob(a) for aid, a in adapters.items()}
    per_adapter = resident_bytes(next(iter(adapters.values())))
    total = per_adapter * len(adapters)
    cache_bytes = total // 2  # one replica's cache holds half the adapters
    capacity = cache_bytes // per_adapter
    hot = list(adapters)[: args.hot_adapters]
    common = {"PTSERVE_LOG_LEVEL": "warning", "PTSERVE_CACHE_BYTES": str(cache_bytes)}
    half = max(1, args.cores // 2)
    print(f"{len(adapters)} adapters × {per_adapter} resident bytes = {total / 2**20:.1f} MiB; "
          f"PTSERVE_CACHE_BYTES={cache_bytes} ({capacity} adapters) per replica", flush=True)

    runs: list[Run] = []
    with tempfile.TemporaryDirectory(prefix="bench-scaleout-") as tmp:
        one = topology.Topology(Path(tmp) / "one", replicas=1, admin_key=ADMIN_KEY, install=False,
                                env={**common, "PTSERVE_THREADS": str(args.cores)})
        with one:
            await upload(one.replica_url(0), {aid: blobs[aid] for aid in hot})
            print("one replica: direct ...", flush=True)
            runs.append(await closed_loop(one.replica_url(0), hot, args.concurrency, args.duration, True,
                                          "1 replica, direct"))
            print("one replica: through nginx ...", flush=True)
            runs.append(await closed_loop(one.proxy_url, hot, args.concurrency, args.duration, True,
                                          "1 replica through nginx"))
        two = topology.Topology(Path(tmp) / "two", replicas=2, admin_key=ADMIN_KEY, install=False,
                                env={**common, "PTSERVE_THREADS": str(half)})
        with two:
            print("two replicas: uploading ...", flush=True)
            await upload(two.proxy_url, blobs)
            print("two replicas: through nginx ...", flush=True)
            runs.append(await closed_loop(two.proxy_url, hot, args.concurrency, args.duration, True,
                                          "2 replicas through nginx"))
            print("hit ratio: consistent hashing ...", flush=True)
            ids = list(adapters)
            hits = [await hit_ratio(two, ids, args.requests, args.concurrency, True, "consistent hash")]
            print("hit ratio: round robin ...", flush=True)
            hits.append(await hit_ratio(two, ids, args.requests, args.concurrency, False, "round robin"))
    load_after = uptime()

    info = machine_info(**tool_versions())
    command = shlex.join(["python", "-m", "benchmarks.bench_scaleout", *sys.argv[1:]])
    t1, t2, t3 = throughput_table(runs), hit_table(hits, capacity), hit_latency_table(hits)
    ch, rr = hits
    summary = (f"consistent hashing ÷ round robin hit ratio: {ch.ratio:.3f} ÷ {rr.ratio:.3f} = "
               f"{ch.ratio / max(rr.ratio, 1e-9):.2f}×; misses {ch.misses:.0f} vs {rr.misses:.0f} "
               f"({rr.misses / max(ch.misses, 1):.1f}× fewer with hashing)")
    print(f"\n{t1}\n\n{t2}\n\n{t3}\n\n{summary}\nload before: {load_before}\nload after:  {load_after}")
    if args.no_write:
        return 0
    report = f"""\
Machine: {info['cpu']}; {info['versions']}. Date: {info['date']}.
Command: `{command}`. Load (`uptime`) before: `{load_before}`; after: `{load_after}`.

Topology from `scripts.topology` (redis-server, `ptserve serve` replicas on the Redis store, nginx from
`docker/nginx/ptserve.conf.template`), MiniLM on CPU, one-text classify requests,
{VIRTUAL_TOKENS}-token adapters, {args.concurrency} closed-loop clients in one asyncio process on the same
machine. The single replica uses `PTSERVE_THREADS={args.cores}`; each of the two uses `{half}`: on one machine
the two replicas share the same cores, so the throughput rows measure the cost of the scale-out path (proxy
hop, split batches), not a gain — on separate machines each replica brings its own cores.

**Throughput and latency** ({args.duration:.0f} s measured per setup after a 3 s warm-up, {len(hot)} adapters,
header `X-Ptserve-Adapter` sent):

{t1}

**Adapter cache hit ratio**: {len(adapters)} adapters of {per_adapter} resident bytes
({total / 2**20:.1f} MiB in all), `PTSERVE_CACHE_BYTES={cache_bytes}` per replica
(= half: {capacity} adapters),
{args.requests} requests for uniformly random adapters after a warm-up of {2 * len(adapters)}; hits and misses
are the deltas of each replica's `ptserve_adapter_cache_hits_total` / `_misses_total`. "consistent hash" sends
the header (nginx `hash $http_x_ptserve_adapter consistent`), "round robin" does not (nginx's fallback).

{t2}

{t3}

{summary}. With hashing each replica sees only its share of the adapters (the ring's imbalance decides how far
that share exceeds one cache); with round robin both replicas see all of them and each cache holds about half.
"""
    chart = args.out / "scaleout.png"
    title = f"ptserve scale-out through nginx ({info['cpu']}, {info['date']})"
    write_chart(*chart_data(runs, hits), chart, title)
    write_section(args.out / "RESULTS.md", "bench_scaleout", SECTION,
                  f"{report}\n![scale-out](scaleout.png)\n")
    print(f"wrote {args.out / 'RESULTS.md'} and {chart}")
    return 0


def main(argv=None) -> int:
    return asyncio.run(main_async(parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
