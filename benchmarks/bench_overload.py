"""Overload and noisy neighbours (issue 5): a real ``ptserve serve`` on loopback, driven open-loop past capacity.

1. capacity: closed loop (``--clients`` concurrent single-text classify requests) for ``--capacity-s``: C req/s.
2. overload-even: Poisson arrivals at ``--overload`` x C spread evenly over K+1 tenants, for ``--duration``:
   accepted throughput, share answered 429, p50/p99 of accepted requests, server RSS at start and end.
3. quiet-alone: K quiet tenants at r req/s each, where r = overload*C / (K + noisy_factor), no noisy tenant.
4. with-noisy: the same K quiet tenants at r each plus one noisy tenant at noisy_factor*r (total overload*C).
   The quiet tenants' p99 in 4 over their p99 in 3 is the noisy-neighbour ratio (target <= 1.5).

Prints a table and the ratios; writes its section of ``RESULTS.md`` (between markers) unless ``--no-write``.
The load generator shares the machine with the server: pin the server to ``--server-threads`` torch threads.

    python -m benchmarks.bench_overload [--duration 60] [--quiet-tenants 4] [--noisy-factor 10] [--overload 2]
"""
from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import random
import shlex
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx  # setup and scrapes only: too heavy a client to drive hundreds of req/s here

from benchmarks._report import write_section
from ptserve.server.backbone import load_backbone
from tests.factories import make_blob, server_process

ROOT = Path(__file__).resolve().parent.parent
VIRTUAL_TOKENS = 16
SECTION = "## Overload, backpressure and noisy neighbours (issue 5)"
WORDS = ("the service was slow but the staff were kind and the food arrived warm although the price felt high "
         "for what we got and the room was clean quiet and bright").split()


@dataclass
class Outcome:
    tenant: str
    status: int  # 0: transport error
    latency_s: float


@dataclass
class Run:
    name: str
    duration_s: float
    offered: dict[str, float]  # tenant -> req/s asked for
    outcomes: list[Outcome] = field(default_factory=list)
    rss_start: float = 0.0
    rss_end: float = 0.0
    lag_s: float = 0.0  # how late the last arrival was sent
    server_cpu: float = 0.0  # server process CPU seconds per wall second during the run
    load: str = ""  # the machine's 1-minute load average at the start and end
    rows_per_pass: float = 0.0
    pass_ms: float = 0.0

    def of(self, tenants=None) -> list[Outcome]:
        return [o for o in self.outcomes if tenants is None or o.tenant in tenants]

    def accepted(self, tenants=None) -> list[float]:
        return sorted(o.latency_s for o in self.of(tenants) if o.status == 200)

    def share(self, status: int, tenants=None) -> float:
        got = self.of(tenants)
        return sum(o.status == status for o in got) / max(1, len(got))

    def other(self) -> int:
        return sum(o.status not in (200, 429) for o in self.outcomes)


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


def text(rng: random.Random) -> str:
    return " ".join(rng.choices(WORDS, k=rng.randint(8, 20)))


class Pool:
    """A minimal keep-alive HTTP/1.1 client for ``POST /v1/classify`` (asyncio streams, one request per connection
    at a time). httpx costs ~3 ms of CPU per request, which on 2 shared cores would make the load generator, not
    the server, the bottleneck; this costs a fraction of that."""

    def __init__(self, url: str):
        host, port = url.removeprefix("http://").split(":")
        self.host, self.port = host, int(port)
        self.idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

    async def post(self, path: str, body: bytes) -> int:
        if self.idle:  # a kept-alive connection the server may have closed meanwhile: retry once on a new one
            try:
                return await self._post(self.idle.pop(), path, body)
            except (OSError, asyncio.IncompleteReadError):
                pass
        return await self._post(await asyncio.open_connection(self.host, self.port), path, body)

    async def _post(self, conn, path: str, body: bytes) -> int:
        reader, writer = conn
        try:
            writer.write(f"POST {path} HTTP/1.1\r\nHost: {self.host}\r\nContent-Type: application/json\r\n"
                         f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
            head = await reader.readuntil(b"\r\n\r\n")
            status = int(head[9:12])
            length, close = 0, False
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                name = name.strip().lower()
                if name == b"content-length":
                    length = int(value)
                elif name == b"connection" and value.strip().lower() == b"close":
                    close = True
            await reader.readexactly(length)
        except BaseException:
            writer.close()
            raise
        if close:
            writer.close()
        else:
            self.idle.append(conn)
        return status

    def close(self) -> None:
        for _, writer in self.idle:
            writer.close()


STATS = ("process_resident_memory_bytes", "process_cpu_seconds_total", "ptserve_batch_size_sum",
         "ptserve_batch_size_count", "ptserve_inference_duration_seconds_sum")


async def process_stats(url: str) -> dict[str, float]:
    """The server's RSS, CPU seconds and pass counters, from its own /metrics."""
    out = dict.fromkeys(STATS, float("nan"))
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        for line in (await client.get("/metrics")).text.splitlines():
            name, _, value = line.partition(" ")
            if name in out:
                out[name] = float(value)
    return out


async def one(pool: Pool, tenant: str, rng: random.Random, out: list[Outcome]) -> None:
    body = json.dumps({"adapter": f"{tenant}/clf", "inputs": [text(rng)]}).encode()
    start = time.perf_counter()
    try:
        status = await asyncio.wait_for(pool.post("/v1/classify", body), 60)
    except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError, ValueError):
        status = 0
    out.append(Outcome(tenant, status, time.perf_counter() - start))


async def capacity(url: str, clients: int, seconds: float) -> float:
    done: list[Outcome] = []
    stop = time.perf_counter() + seconds
    pool = Pool(url)

    async def worker(k: int) -> None:
        rng = random.Random(k)
        while time.perf_counter() < stop:
            await one(pool, f"q{k % 4}", rng, done)

    await asyncio.gather(*(worker(k) for k in range(clients)))
    pool.close()
    return sum(o.status == 200 for o in done) / seconds


async def open_loop(url: str, run: Run, seed: int) -> Run:
    """Poisson arrivals per tenant at ``run.offered``; every request is its own task (open loop)."""
    pool = Pool(url)
    before = await process_stats(url)
    run.rss_start = before["process_resident_memory_bytes"]
    load_start = os.getloadavg()[0]
    tasks: set[asyncio.Task] = set()
    begin = time.perf_counter()
    stop = begin + run.duration_s

    async def arrivals(tenant: str, rate: float, rng: random.Random) -> None:
        t = time.perf_counter()
        while True:
            t += rng.expovariate(rate)
            if t >= stop:
                return
            await asyncio.sleep(max(0.0, t - time.perf_counter()))
            task = asyncio.create_task(one(pool, tenant, rng, run.outcomes))
            tasks.add(task)
            task.add_done_callback(tasks.discard)

    await asyncio.gather(*(arrivals(t, r, random.Random(seed + i)) for i, (t, r) in enumerate(run.offered.items())))
    run.lag_s = time.perf_counter() - stop  # > 0: the generator fell behind its schedule
    await asyncio.gather(*list(tasks))
    pool.close()
    after = await process_stats(url)
    delta = {k: after[k] - before[k] for k in STATS}
    run.rss_end = after["process_resident_memory_bytes"]
    run.server_cpu = delta["process_cpu_seconds_total"] / (time.perf_counter() - begin)
    passes = max(1.0, delta["ptserve_batch_size_count"])
    run.rows_per_pass = delta["ptserve_batch_size_sum"] / passes
    run.pass_ms = 1000 * delta["ptserve_inference_duration_seconds_sum"] / passes
    run.load = f"{load_start:.1f} / {os.getloadavg()[0]:.1f}"
    return run


def row(run: Run, quiet: list[str]) -> str:
    acc = run.accepted()
    q = run.accepted(quiet)
    offered = sum(run.offered.values())
    return (f"| {run.name} | {offered:.0f} | {len(run.outcomes) / run.duration_s:.0f} | "
            f"{len(acc) / run.duration_s:.1f} | {100 * run.share(429):.1f}% | {run.other()} | "
            f"{1000 * pct(acc, 50):.0f} | {1000 * pct(acc, 99):.0f} | {1000 * pct(q, 50):.0f} | "
            f"{1000 * pct(q, 99):.0f} | "
            f"{100 * run.share(429, quiet):.1f}% | {run.rss_start / 2**20:.0f} | {run.rss_end / 2**20:.0f} | "
            f"{run.rows_per_pass:.1f} | {run.pass_ms:.0f} | {run.lag_s:.1f} | {run.server_cpu:.2f} | {run.load} |")


HEADER = ("| run | offered req/s | sent req/s | accepted req/s | 429 | other | p50 ms | p99 ms | quiet p50 ms | "
          "quiet p99 ms | quiet 429 | RSS start MiB | RSS end MiB | rows/pass | ms/pass | client lag s | server CPU cores | "
          "load avg start / end |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=float, default=60.0, help="seconds per open-loop run")
    ap.add_argument("--capacity-s", type=float, default=15.0)
    ap.add_argument("--clients", type=int, default=32, help="closed-loop clients for the capacity run")
    ap.add_argument("--overload", type=float, default=2.0, help="offered load / capacity")
    ap.add_argument("--quiet-tenants", type=int, default=4)
    ap.add_argument("--noisy-factor", type=float, default=10.0)
    ap.add_argument("--server-threads", type=int, default=1)
    ap.add_argument("--max-batch-size", type=int, default=8,
                    help="8: on CPU a pass of 16 rows buys ~4%% more throughput than 8 and takes twice as long")
    ap.add_argument("--max-wait-ms", type=float, default=5.0)
    ap.add_argument("--max-queue-rows", type=int, default=128)
    ap.add_argument("--max-queue-rows-per-tenant", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()

    fp = load_backbone("minilm", device="cpu", dtype="float32").fingerprint
    quiet = [f"q{i}" for i in range(args.quiet_tenants)]
    tenants = quiet + ["noisy"]
    settings = {"PTSERVE_THREADS": str(args.server_threads), "PTSERVE_MAX_BATCH_SIZE": str(args.max_batch_size),
                "PTSERVE_MAX_WAIT_MS": str(args.max_wait_ms), "PTSERVE_MAX_QUEUE_ROWS": str(args.max_queue_rows),
                "PTSERVE_MAX_QUEUE_ROWS_PER_TENANT": str(args.max_queue_rows_per_tenant),
                "PTSERVE_MAX_CONCURRENT_PER_TENANT": "0", "PTSERVE_LOG_LEVEL": "warning"}
    with tempfile.TemporaryDirectory() as tmp, server_process({"PTSERVE_STORE": f"file://{tmp}", **settings}) as srv:
        for i, t in enumerate(tenants):
            r = httpx.put(f"{srv.url}/v1/adapters/{t}/clf", content=make_blob(fp, VIRTUAL_TOKENS, seed=i),
                          headers={"content-type": "application/octet-stream"}, timeout=60)
            r.raise_for_status()
        cap = asyncio.run(capacity(srv.url, args.clients, args.capacity_s))
        total = args.overload * cap
        r_quiet = total / (args.quiet_tenants + args.noisy_factor)
        plan = [
            Run("overload-even", args.duration, {t: total / len(tenants) for t in tenants}),
            Run("quiet-alone", args.duration, {t: r_quiet for t in quiet}),
            Run("with-noisy", args.duration, {**{t: r_quiet for t in quiet}, "noisy": args.noisy_factor * r_quiet}),
        ]
        runs = []
        for i, run in enumerate(plan):
            print(f"{run.name}: {sum(run.offered.values()):.0f} req/s for {run.duration_s:.0f} s ...", flush=True)
            runs.append(asyncio.run(open_loop(srv.url, run, args.seed + 100 * i)))

    even, alone, noisy = runs
    ratio = pct(noisy.accepted(quiet), 99) / pct(alone.accepted(quiet), 99)
    lines = [
        f"capacity (closed loop, {args.clients} clients): **{cap:.1f} req/s**; offered in the overload runs: "
        f"{args.overload:g}x = {total:.0f} req/s; quiet tenant rate r = {r_quiet:.1f} req/s, noisy = "
        f"{args.noisy_factor:g}r",
        "",
        HEADER,
        *(row(r, quiet) for r in runs),
        "",
        "| ratio | value | target |",
        "|---|---|---|",
        f"| quiet p99 with the noisy tenant / without | {ratio:.2f} | <= 1.5 |",
        f"| accepted throughput at {args.overload:g}x / capacity (even) | "
        f"{len(even.accepted()) / even.duration_s / cap:.2f} | ~1 |",
        f"| RSS end / start (even) | {even.rss_end / even.rss_start:.3f} | ~1 (flat) |",
        f"| RSS end of last run / start of first | {runs[-1].rss_end / runs[0].rss_start:.3f} | ~1 (flat) |",
        f"| quiet tenants answered 429 with the noisy tenant | {100 * noisy.share(429, quiet):.1f}% | ~0 |",
        f"| noisy tenant answered 429 | {100 * noisy.share(429, ['noisy']):.1f}% | most of its excess |",
    ]
    table = "\n".join(lines)
    print(table)
    if not args.no_write:
        write_results(args, table)


NOTES = """How to read it:
- **Backpressure works**: past capacity the excess is answered 429 (with `Retry-After`) instead of queueing, so the
  accepted requests' latency stays bounded by the queue bounds (`max_queue_rows` / per tenant), RSS stays flat and
  nothing else fails ("other" counts 5xx and transport errors).
- **Fairness works**: with the noisy tenant at 10x, the quiet tenants are (almost) never refused and the noisy
  tenant takes the 429s — start-time fair queuing serves the tenants that have been served least first.
- **The quiet p99 ratio misses 1.5x on this machine, and the rows/pass and ms/pass columns say why**: alone, the
  quiet tenants ride small passes (about 2 rows, ~15 ms); with a saturating neighbour every pass is full (8 rows,
  ~55 ms on one CPU thread, where a pass costs in proportion to its rows). A quiet row goes in the next pass, so it
  waits for the pass in progress plus its own, and Poisson bursts of the quiet tenants (together ~60% of the
  server's capacity here) sometimes need two or three full passes. On a GPU, where a pass of 8 or 64 rows costs
  about what a pass of 2 does, this penalty should mostly vanish (not measured: no GPU here); on CPU a smaller
  `max_batch_size` trades throughput for it. The batcher alone, driven in process by the same arrivals with a runner of 6.4 ms per row
  (8-row passes of ~51 ms), gives the quiet tenants p50/p90/p99 = 84/119/174 ms: the rest of the quiet p99 above
  is the HTTP side (one event loop parsing and refusing ~240 noisy requests/s) competing with the engine thread
  for the GIL. Accepted throughput under overload is below the closed-loop capacity because refusing ~200
  requests/s costs the server's event loop CPU that, under the GIL and on 2 shared cores, the engine thread misses
  (see the server CPU column: the process never gets much more than one core).
- **How the design got here** (same benchmark, same machine, the quiet p99 ratio and the quiet tenants' 429s):
  batch loop as an asyncio task + round-robin by tenant: 37-105x, 23-33% refused (the loop, busy refusing, resumed
  the batcher late after every pass and the engine idled); passes formed on the engine thread + round-robin: 12x,
  0.2%; + start-time fair queuing: 3.6-6.9x, 0%."""


def write_results(args, table: str) -> None:
    cmd = "python -m benchmarks.bench_overload " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    machine = (f"{platform.machine()}, {os.cpu_count()} cores ({platform.processor() or platform.platform()}), "
               f"Python {platform.python_version()}")
    body = "\n".join([
        f"- date: {datetime.date.today().isoformat()}; machine: {machine}",
        f"- command: `{cmd.strip()}`",
        f"- server: `ptserve serve`, MiniLM on CPU, {args.server_threads} torch thread(s), max_batch_size "
        f"{args.max_batch_size}, max_wait_ms {args.max_wait_ms:g}, max_queue_rows {args.max_queue_rows}, "
        f"max_queue_rows_per_tenant {args.max_queue_rows_per_tenant}; adapters of {VIRTUAL_TOKENS} virtual tokens; "
        "one text of 8-20 words per request; the open-loop client (raw asyncio HTTP/1.1, Poisson arrivals) runs on the same "
        "machine, which only has 2 cores and is shared with colleagues' jobs: absolute numbers are noisy, the "
        "ratios are the result.",
        "", table, "", NOTES,
    ])
    path = args.out / "RESULTS.md"
    write_section(path, "bench_overload", SECTION, body, title_in_block=True)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
