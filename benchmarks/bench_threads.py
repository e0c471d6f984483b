"""torch intra-op threads when the API shares the cores (issue 13): a real ``ptserve serve`` per thread count,
driven over HTTP by ``wrk`` on the same machine.

For each thread count (``--threads 1 2``), a server on loopback (MiniLM, the default dtype unless ``--dtype``,
32 adapters of 16 virtual tokens uploaded over HTTP), then ``wrk`` with ``--connections`` connections posting
one review text per request, spread over the adapters, for ``--duration`` seconds. Rounds rotate over the thread
counts, so load from elsewhere hits all alike; requests/s per round, median and best. The rule behind
``PTSERVE_THREADS=0`` (``ptserve.server.hardware.choose_threads``) is what this measures.

    python -m benchmarks.bench_threads [--threads 1 2] [--rounds 3] [--duration 10] [--connections 32]
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import statistics
import subprocess
import tempfile
from pathlib import Path

import httpx

from benchmarks._report import machine_info, write_section
from ptserve.server.backbone import load_backbone
from tests.factories import make_blob, server_process

VIRTUAL_TOKENS = 16
SECTION = "## Torch threads beside the API (issue 13)"
WORDS = ("the service was slow but the staff were kind and the food arrived warm although the price felt high "
         "for what we got and the room was clean quiet and bright").split()


def wrk_script(adapters: list[str], n_texts: int, path: Path) -> Path:
    """A wrk Lua script that cycles through ``n_texts`` classify bodies over the adapters."""
    rng = random.Random(0)
    bodies = [json.dumps({"adapter": adapters[i % len(adapters)],
                          "inputs": [" ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 40)))]})
              for i in range(n_texts)]
    lua = "local bodies = {\n" + ",\n".join(f"[==[{b}]==]" for b in bodies) + "\n}\n" + """
local i = 0
request = function()
  i = i + 1
  return wrk.format("POST", "/v1/classify", {["Content-Type"] = "application/json"}, bodies[(i % #bodies) + 1])
end
"""
    path.write_text(lua)
    return path


def run_wrk(url: str, script: Path, connections: int, duration: float) -> tuple[float, int]:
    """(requests/s, non-2xx answers) of one wrk run."""
    out = subprocess.run(
        ["wrk", "-t", "1", "-c", str(connections), "-d", f"{duration:g}s", "-s", str(script), url],
        capture_output=True, text=True, check=True,
    ).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    bad = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    return rps, int(bad.group(1)) if bad else 0


def one_round(threads: int, args, script: Path, blobs: dict[str, bytes]) -> tuple[float, int, dict]:
    env = {"PTSERVE_THREADS": str(threads), "PTSERVE_DTYPE": args.dtype,
           "PTSERVE_BATCH_OVERHEAD_TOKENS": args.overhead, "PTSERVE_LOG_LEVEL": "warning",
           "PTSERVE_STORE": f"file://{tempfile.mkdtemp(prefix='bench-threads-')}"}
    with server_process(env) as server:
        for adapter_id, blob in blobs.items():
            httpx.put(f"{server.url}/v1/adapters/{adapter_id}", content=blob,
                      headers={"content-type": "application/octet-stream"}, timeout=30).raise_for_status()
        ready = httpx.get(f"{server.url}/readyz").json()
        run_wrk(server.url, script, args.connections, 2)  # warm-up: adapters resident, first passes
        rps, bad = run_wrk(server.url, script, args.connections, args.duration)
    return rps, bad, ready


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="thread counts to compare")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--duration", type=float, default=10.0, help="seconds of wrk load per round")
    p.add_argument("--connections", type=int, default=32)
    p.add_argument("--adapters", type=int, default=32)
    p.add_argument("--dtype", default="auto", help="PTSERVE_DTYPE of the servers")
    p.add_argument("--overhead", default="auto", help="PTSERVE_BATCH_OVERHEAD_TOKENS of the servers")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent)
    p.add_argument("--no-write", action="store_true")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is not installed (Debian: apt-get install wrk)")
    fp = load_backbone("minilm", device="cpu", dtype="float32").fingerprint
    blobs = {f"bench/a{i}": make_blob(fp, VIRTUAL_TOKENS, seed=i) for i in range(args.adapters)}
    script = wrk_script(list(blobs), 256, Path(tempfile.mkdtemp()) / "classify.lua")
    load_before = os.getloadavg()[0]
    rates: dict[int, list[float]] = {t: [] for t in args.threads}
    ready = {}
    for k in range(args.rounds):
        order = args.threads[k % len(args.threads):] + args.threads[: k % len(args.threads)]
        for t in order:
            rps, bad, ready[t] = one_round(t, args, script, blobs)
            if bad:
                raise SystemExit(f"ABORT: {bad} non-2xx answers with {t} threads")
            rates[t].append(rps)
            print(f"round {k + 1}: {t} threads {rps:.0f} req/s", flush=True)
    info = machine_info()
    lines = [
        f"- date: {info['date']}; machine: {info['cpu']}; {info['versions']}",
        f"- load average (1 min) before / after: {load_before:.2f} / {os.getloadavg()[0]:.2f}",
        f"- command: `python -m benchmarks.bench_threads --threads {' '.join(map(str, args.threads))} "
        f"--rounds {args.rounds} --duration {args.duration:g} --connections {args.connections}`",
        f"- workload: wrk (1 thread, {args.connections} connections) on the same machine, one text of 8–40 words "
        f"per request over {args.adapters} adapters of {VIRTUAL_TOKENS} virtual tokens; dtype "
        f"{ready[args.threads[0]]['dtype']} ({ready[args.threads[0]]['dtype_reason']})",
        "",
        "| torch threads | requests/s, median | best | rounds |", "|---:|---:|---:|---|",
    ]
    for t in args.threads:
        lines.append(f"| {t} | {statistics.median(rates[t]):.0f} | {max(rates[t]):.0f} | "
                     f"{', '.join(f'{r:.0f}' for r in rates[t])} |")
    report = "\n".join(lines) + "\n"
    print(report)
    if not args.no_write:
        write_section(args.out / "RESULTS.md", "bench_threads", SECTION, report)


if __name__ == "__main__":
    main()
