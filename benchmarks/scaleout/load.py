"""The load bench_scaleout sends: random classify adapters uploaded to a replica or the proxy, a closed loop of
clients for throughput and latency, a fixed number of requests for the adapter cache hit ratio (read from each
replica's ``/metrics``)."""
from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass

import httpx
from prometheus_client.parser import text_string_to_metric_families

from ptserve.adapters_store.fingerprint import BackboneFingerprint

ADMIN_KEY = "bench-scaleout-admin-key"
WORDS = """the a service order delivery was very not quite good bad slow fast late price quality support staff
product package arrived broken fine great terrible refund again never always would recommend return app
update crashed works screen battery hotel clean dirty food cold warm waiter rude kind helpful answer waited
""".split()


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
