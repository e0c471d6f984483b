"""The server against its own engine (issue 12): what a client over HTTP gets of what the engine can do.

One run, the same texts (review sentences, 8–40 words) and the same 32 adapters of 16 virtual tokens for every
row. The server is ``ptserve serve`` in a subprocess (env settings, defaults otherwise; adapters uploaded over
HTTP first); the load generator is ``wrk`` with ``benchmarks/http/classify.lua``; "offline" is ``Engine.classify``
on the same rows in length-sorted passes of 32, in this process, while the server is idle. Rows:

  * HTTP ÷ offline, 1 text per request (each dtype of ``--dtypes``), and 8 texts per request (float32):
    wrk closed loop, ``--connections`` connections, req/s × texts ÷ offline rows/s;
  * CPU of the API path per request: under a fixed open-loop rate (half the 1-text float32 capacity, wrk's
    ``delay()`` pacing each thread to a schedule), the CPU the server's processes spent in their main threads
    (the event loop: HTTP, auth, limits, validation, tokenising, JSON; /proc/PID/task/TID/stat) per request.
    Everything else in the server is the engine: its thread and torch's intra-op pool;
  * 2 API workers ÷ 1 with a tiny random encoder (2 layers, hidden 32: the engine nearly free), closed loop;
    needs a server with ``PTSERVE_API_WORKERS`` (``--workers-mode auto`` finds out from its settings), else
    'n/a (no multi-worker mode)';
  * ptserve over HTTP ÷ PEFT serving one request at a time in process (float32, ``bench_classify``'s PEFT);
  * p50 / p99 latency at 50 % and 90 % of the 1-text float32 capacity, open loop.

Prints a markdown table with the issue's targets; writes its section of ``benchmarks/RESULTS.md`` unless
``--no-write``. ``--smoke`` runs every row in seconds on the tiny encoder (what the test runs).

    python -m benchmarks.bench_http [--dtypes float32 bfloat16] [--seconds 10] [--connections 32] [--no-write]
"""
from __future__ import annotations

import argparse
import os
import shlex
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from benchmarks._report import machine_info, write_section
from benchmarks.http import workload as w

SECTION = "## The server against its engine (issue 12)"
ADAPTERS = 32
PASS_ROWS = 32  # offline passes
TARGETS = {
    "ratio1": "≥ 0.85", "ratio8": "≥ 0.95", "api_cpu": "≤ 150 µs", "workers": "≥ 1.7×", "peft": "≥ 4×",
    "latency": "report",
}


@dataclass
class Setup:
    backbone: str  # name or folder, for the server and the offline engine
    texts: list[str]
    adapters: list  # Adapter objects (the same bytes are uploaded)
    tmp: Path


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"],
                   help="1-text rows per dtype (this CPU has no fast bf16: it runs, slowly)")
    p.add_argument("--seconds", type=float, default=10.0, help="each wrk run (after a 2 s warm-up run)")
    p.add_argument("--connections", type=int, default=32)
    p.add_argument("--texts", type=int, default=512)
    p.add_argument("--peft-requests", type=int, default=96)
    p.add_argument("--workers-mode", choices=["auto", "off"], default=os.environ.get("BENCH_WORKERS_MODE", "auto"),
                   help="auto: the 2-vs-1 worker row when the server has PTSERVE_API_WORKERS; off: skip it")
    p.add_argument("--threads", type=int, default=0,
                   help="torch threads of the offline engine and PEFT (0 = the server's own rule: usable CPUs but "
                        "one; on a shared 2-core machine a second OpenMP thread makes every pass 4x slower)")
    p.add_argument("--api-workers", default="",
                   help="PTSERVE_API_WORKERS of the main rows' server (default: the server's own rule; 1 = an "
                        "engine core process behind one API worker)")
    p.add_argument("--smoke", action="store_true", help="the tiny encoder for every row, 1 s runs, 64 texts")
    p.add_argument("--no-write", action="store_true", help="print only; do not touch RESULTS.md")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent)
    args = p.parse_args(argv)
    if args.smoke:
        args.seconds, args.texts, args.peft_requests, args.dtypes = 1.0, 64, 16, ["float32"]
    return args


# --- the offline engine and PEFT, in this process -----------------------------------------------------------------
def offline_rows_per_s(setup: Setup, dtype: str, repeats: int = 3) -> float:
    import torch

    from ptserve.server.backbone import load_backbone
    from ptserve.server.engine import Engine, Row

    engine = Engine(load_backbone(setup.backbone, "cpu", dtype))
    residents = [engine.make_resident(a, f"bench/a{i}", 1) for i, a in enumerate(setup.adapters)]
    rows = []
    for k, text in enumerate(setup.texts):
        resident = residents[k % len(residents)]
        rows.append(Row(resident, engine.tokenize([text], resident.num_virtual_tokens)[0]))
    rows.sort(key=lambda r: r.length)
    passes = [rows[i:i + PASS_ROWS] for i in range(0, len(rows), PASS_ROWS)]
    with torch.inference_mode():
        engine.classify(passes[0])  # warm-up
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            for batch in passes:
                engine.classify(batch)
            best = min(best, time.perf_counter() - start)
    return len(rows) / best


def peft_requests_per_s(setup: Setup, n: int) -> float:
    from benchmarks.bench_classify import Request, load_peft, run_peft_single
    from ptserve.server.backbone import resolve_path
    from ptserve.server.hf_compat import load_tokenizer

    path = resolve_path(setup.backbone)
    model = load_peft(path, setup.adapters)
    tokenizer = load_tokenizer(path, True)
    requests = [Request(setup.texts[k % len(setup.texts)], k % len(setup.adapters)) for k in range(n)]
    run_peft_single(model, tokenizer, setup.adapters, requests[:4])  # warm-up
    times = []
    for _ in range(2):
        start = time.perf_counter()
        run_peft_single(model, tokenizer, setup.adapters, requests)
        times.append(time.perf_counter() - start)
    return n / min(times)


# --- the server ----------------------------------------------------------------------------------------------------
def server_env(setup: Setup, dtype: str, **extra: str) -> dict[str, str]:
    store = tempfile.mkdtemp(prefix="store-", dir=setup.tmp)
    return {"PTSERVE_BACKBONE": setup.backbone, "PTSERVE_STORE": f"file://{store}", "PTSERVE_DTYPE": dtype,
            **extra}


def main_thread_cpu(server: w.Server) -> float:
    """CPU seconds of the main thread (tid = pid: the event loop) of every process of the server."""
    return server.cpu_seconds(main_thread_only=True)


def checked(r: w.WrkResult) -> w.WrkResult:
    """A run whose answers were not all 200 measured something else: stop."""
    if r.non_2xx or r.errors:
        raise RuntimeError(f"wrk saw {r.non_2xx} non-2xx answers and {r.errors} socket errors: {r}")
    return r


def closed_loop(server: w.Server, bodies: list[str], args) -> w.WrkResult:
    w.run_wrk(server.url, bodies, 2, args.connections)  # warm-up
    return checked(w.run_wrk(server.url, bodies, args.seconds, args.connections))


def supports_workers() -> bool:
    from ptserve.server.settings import Settings

    return "api_workers" in Settings.model_fields


def run(args) -> tuple[list[tuple[str, str, str]], dict]:
    from ptserve.adapters_store.format import encode_blob
    from ptserve.server import hf_compat
    from ptserve.server.backbone import fingerprint_from_config, resolve_path

    from benchmarks.bench_classify import make_adapter

    import torch

    from ptserve.server.hardware import choose_threads, cpu_budget

    threads = choose_threads(args.threads, cpu_budget()).threads
    torch.set_num_threads(threads)
    args.threads_used = threads
    tmp = Path(tempfile.mkdtemp(prefix="bench-http-"))
    tiny = str(w.save_tiny_encoder(tmp / "tiny", resolve_path("minilm")))
    backbone = tiny if args.smoke else "minilm"

    def make_setup(name: str) -> Setup:
        fp = fingerprint_from_config(hf_compat.load_config(resolve_path(name), True))
        return Setup(name, w.review_texts(args.texts), [make_adapter(fp, i) for i in range(ADAPTERS)], tmp)

    setup = make_setup(backbone)
    blobs = [encode_blob(a) for a in setup.adapters]
    rows: list[tuple[str, str, str]] = []
    raw: dict = {}

    # 1 text per request, per dtype; in float32 also 8 texts, the API CPU and the latencies
    capacity = None
    for dtype in args.dtypes:
        offline = offline_rows_per_s(setup, dtype)
        raw[f"offline_{dtype}"] = offline
        extra = {"PTSERVE_API_WORKERS": args.api_workers} if args.api_workers else {}
        with w.serve(server_env(setup, dtype, **extra)) as server:
            ids = w.upload_adapters(server.url, blobs)
            one = w.request_bodies(setup.texts, ids, 1)
            r1 = closed_loop(server, one, args)
            raw[f"http1_{dtype}"] = r1.rps
            rows.append((f"HTTP ÷ offline, 1 text per request, {dtype}",
                         f"**{r1.rps / offline:.2f}** ({r1.rps:.0f} req/s ÷ {offline:.0f} rows/s)", TARGETS["ratio1"]))
            if dtype != "float32":
                continue
            capacity = r1.rps
            eight = w.request_bodies(setup.texts, ids, 8)
            r8 = closed_loop(server, eight, args)
            raw["http8_float32"] = r8.rps * 8
            rows.append(("HTTP ÷ offline, 8 texts per request, float32",
                         f"**{r8.rps * 8 / offline:.2f}** ({r8.rps * 8:.0f} rows/s ÷ {offline:.0f})",
                         TARGETS["ratio8"]))
            lat = {}
            for share in (0.5, 0.9):
                rate = share * capacity
                connections = max(args.connections, 64)
                cpu0, main0 = server.cpu_seconds(), main_thread_cpu(server)
                r = checked(w.run_wrk(server.url, one, args.seconds, connections, rate=rate))
                cpu1, main1 = server.cpu_seconds(), main_thread_cpu(server)
                lat[share] = r
                if share == 0.5:
                    api_us = (main1 - main0) / r.requests * 1e6
                    total_us = (cpu1 - cpu0) / r.requests * 1e6
                    raw["api_cpu_us"], raw["server_cpu_us"] = api_us, total_us
                    rows.append((f"CPU of the API path per request (open loop {r.rps:.0f} req/s)",
                                 f"**{api_us:.0f} µs** (server in all: {total_us:.0f} µs; engine: "
                                 f"{total_us - api_us:.0f} µs)", TARGETS["api_cpu"]))
            rows.append(("p50 / p99 latency at 50 % / 90 % of capacity (open loop)",
                         " · ".join(f"{lat[s].latency_us['p50'] / 1e3:.1f} / {lat[s].latency_us['p99'] / 1e3:.1f} ms"
                                    f" at {lat[s].rps:.0f} req/s" for s in (0.5, 0.9)), TARGETS["latency"]))
            raw["latency"] = {s: (r.rps, r.latency_us) for s, r in lat.items()}

    # 2 workers vs 1 on the tiny encoder
    if args.workers_mode == "off" or not supports_workers():
        rows.append(("2 API workers ÷ 1 worker, tiny random encoder", "n/a (no multi-worker mode)",
                     TARGETS["workers"]))
    else:
        tiny_setup = make_setup(tiny)
        tiny_blobs = [encode_blob(a) for a in tiny_setup.adapters]
        rps = {}
        for n in (1, 2):
            with w.serve(server_env(tiny_setup, "float32", PTSERVE_API_WORKERS=str(n))) as server:
                ids = w.upload_adapters(server.url, tiny_blobs)
                rps[n] = closed_loop(server, w.request_bodies(tiny_setup.texts, ids, 1), args).rps
        raw["workers"] = rps
        rows.append(("2 API workers ÷ 1 worker, tiny random encoder",
                     f"**{rps[2] / rps[1]:.2f}×** ({rps[2]:.0f} ÷ {rps[1]:.0f} req/s)", TARGETS["workers"]))

    # PEFT one request at a time, float32
    if capacity is not None:
        peft = peft_requests_per_s(setup, args.peft_requests)
        raw["peft"] = peft
        rows.append(("ptserve over HTTP ÷ PEFT one request at a time in process, float32",
                     f"**{capacity / peft:.1f}×** ({capacity:.0f} ÷ {peft:.0f} req/s)", TARGETS["peft"]))
    return rows, raw


def main(argv=None) -> None:
    args = parse_args(argv)
    load_before = os.getloadavg()[0]
    rows, _ = run(args)
    table = ["| measure | result | target |", "|---|---|---|", *(f"| {a} | {b} | {c} |" for a, b, c in rows)]
    info = machine_info()
    command = "python -m benchmarks.bench_http " + shlex.join(sys.argv[1:])
    report = "\n".join([
        f"- date: {info['date']}; CPU: {w.cpu_model()}, {os.cpu_count()} cores; {info['versions']}",
        f"- command: `{command}`; wrk {args.connections} connections, {args.seconds:g} s per run; "
        f"{len(w.review_texts(args.texts))} texts of 8–40 words over {ADAPTERS} adapters of "
        f"{w.VIRTUAL_TOKENS} virtual tokens; offline and PEFT with {args.threads_used} torch thread(s), the "
        "server with its defaults (`PTSERVE_THREADS` auto)",
        f"- load average (1 min) before / after: {load_before:.2f} / {os.getloadavg()[0]:.2f} (a shared machine: "
        "other processes' load lowers every HTTP figure more than the offline ones, measured in between)",
        "",
        *table,
    ])
    print(report)
    if not args.no_write:
        write_section(args.out / "RESULTS.md", "bench_http", SECTION, report)


if __name__ == "__main__":
    main()
