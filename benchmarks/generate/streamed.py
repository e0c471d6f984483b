"""Streamed generation over HTTP (issue 12 item 8): S concurrent SSE streams on ``/v1/generate`` (one adapter
each, greedy, ``--tokens`` new tokens at most) against ptserve in one process and against an engine core behind
one API worker (``PTSERVE_API_WORKERS=1``: the tokens cross a process boundary, the text is made in the worker).
Both servers run at once and the rounds alternate between them; tokens/s counts the tokens the streams received
(EOS may end a stream early: a greedy random model seldom picks it) over the round's wall time."""
from __future__ import annotations

import asyncio
import json
import tempfile
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from benchmarks.generate.latency import percentile
from benchmarks.generate.workload import Setup
from benchmarks.http import workload as w
from ptserve.adapters_store.format import encode_blob

MODES = {"in process": "0", "engine core + 1 API worker": "1"}


@dataclass
class Round:
    tokens: int
    wall: float
    ttft: list[float] = field(default_factory=list)

    @property
    def tps(self) -> float:
        return self.tokens / self.wall


async def _stream(client: httpx.AsyncClient, body: dict, start: float, out: Round) -> None:
    first = None
    async with client.stream("POST", "/v1/generate", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"{r.status_code} {(await r.aread()).decode()}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if "error" in event:
                raise RuntimeError(f"a stream failed: {event}")
            if event.get("token") is not None:
                first = first or time.perf_counter()
                out.tokens += 1
    out.ttft.append((first or time.perf_counter()) - start)


async def _round(url: str, bodies: list[dict]) -> Round:
    headers = {"authorization": f"Bearer {w.ADMIN_KEY}"}
    async with httpx.AsyncClient(base_url=url, timeout=600, headers=headers) as client:
        out, start = Round(0, 0.0), time.perf_counter()
        await asyncio.gather(*(_stream(client, b, start, out) for b in bodies))
        out.wall = time.perf_counter() - start
    return out


def measure_streamed(s: Setup, args) -> dict[str, list[Round]]:
    """Rounds per mode (one warm-up round each first, not kept)."""
    tmp = Path(tempfile.mkdtemp(prefix="bench-streamed-"))
    prompts = [s.bb.tokenizer.decode(p) for p in s.prompts]
    blobs = [encode_blob(a) for a in s.adapters]
    with ExitStack() as stack:
        servers = {}
        for name, workers in MODES.items():
            env = {"PTSERVE_BACKBONE": str(s.folder), "PTSERVE_STORE": f"file://{tmp / workers}",
                   "PTSERVE_DTYPE": "float32", "PTSERVE_THREADS": str(args.threads), "PTSERVE_API_WORKERS": workers,
                   "PTSERVE_MAX_RUNNING": str(max(32, args.streams)),
                   "PTSERVE_MAX_NEW_TOKENS_LIMIT": str(max(64, args.tokens))}
            server = stack.enter_context(w.serve(env))
            ids = w.upload_adapters(server.url, blobs)
            bodies = [{"adapter": aid, "prompt": prompts[i % len(prompts)], "max_new_tokens": args.tokens,
                       "temperature": 0, "stream": True} for i, aid in enumerate(ids)]
            servers[name] = (server.url, bodies)
        rounds: dict[str, list[Round]] = {name: [] for name in MODES}
        for r in range(args.repeats + 1):
            for name in (list(MODES) if r % 2 == 0 else list(MODES)[::-1]):
                url, bodies = servers[name]
                result = asyncio.run(_round(url, bodies))
                if r:
                    rounds[name].append(result)
    return rounds


def streamed_md(rounds: dict[str, list[Round]], args) -> str:
    base = None
    lines = [f"{args.streams} concurrent SSE streams × ≤ {args.tokens} greedy tokens over HTTP, one adapter each; "
             f"median of {args.repeats} alternating rounds after a warm-up",
             "", "| server | tokens/s | ÷ in process | TTFT p50 (ms) |", "|---|---:|---:|---:|"]
    for name, rs in rounds.items():
        tps = sorted(r.tps for r in rs)[len(rs) // 2]
        base = base or tps
        ttft = percentile([t for r in rs for t in r.ttft], 50) * 1e3
        lines.append(f"| {name} | {tps:.0f} | {tps / base:.2f} | {ttft:.0f} |")
    return "\n".join(lines)
