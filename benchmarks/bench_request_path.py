"""What each layer of the request path costs per classify request (issue 12, item 6), in µs of CPU.

The app runs in this process (``create_app`` with a tiny random encoder, so the engine costs almost nothing) and
is called over raw ASGI (no sockets, no HTTP parser, no client): one request at a time, 1 text, 32 adapters,
a tenant key (so authentication runs). Two kinds of figures:
  * **whole path**: CPU of the event-loop thread per request (``time.thread_time`` there; the engine thread's
    forward passes are not in it), over ``--requests`` requests, for the app as it serves (``FastClassify``, the
    route without FastAPI's router) and for the same app with every request through FastAPI's route, in
    alternating rounds (the best round of each);
  * **layers**: each layer alone, timed in a loop on the same inputs (JSON body reading, body validation,
    authentication, tokenisation, prediction building, response encoding, access log, metrics).
The HTTP server (uvicorn's parser and transport) is what remains of ``bench_http``'s per-request CPU.

    python -m benchmarks.bench_request_path [--requests 2000] [--rounds 4] [--profile]
"""
from __future__ import annotations

import argparse
import asyncio
import cProfile
import io
import json
import logging
import os
import pstats
import tempfile
import time
from contextlib import asynccontextmanager
from pathlib import Path

from benchmarks.bench_classify import LABELS, make_adapter
from benchmarks.http.workload import review_texts, save_tiny_encoder
from ptserve.adapters_store.format import encode_blob


def _scope(method: str, path: str, body: bytes, headers: dict[str, str]) -> dict:
    hs = [(b"host", b"bench"), (b"content-length", str(len(body)).encode())]
    hs += [(k.encode(), v.encode()) for k, v in headers.items()]
    return {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method, "path": path,
            "raw_path": path.encode(), "query_string": b"", "headers": hs, "client": ("127.0.0.1", 1),
            "server": ("127.0.0.1", 80), "scheme": "http", "root_path": ""}


async def call(app, method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None):
    """One request through the ASGI app: (status, body)."""
    sent, out = False, []

    async def receive():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await asyncio.Event().wait()

    async def send(message):
        out.append(message)

    await app(_scope(method, path, body, headers or {}), receive, send)
    return out[0]["status"], b"".join(m.get("body", b"") for m in out[1:])


def per_call_us(fn, n: int) -> float:
    """CPU of this thread per call (not wall time: on a shared machine a descheduled thread's wait is not the
    layer's cost)."""
    start = time.thread_time()
    for _ in range(n):
        fn()
    return (time.thread_time() - start) / n * 1e6


@asynccontextmanager
async def serving(settings, fast_classify: bool, fp):
    """An app in this process, ready, with a tenant key and 32 adapters: (app, state, key headers)."""
    from ptserve.server.api.app import create_app

    app = create_app(settings, fast_classify=fast_classify)
    async with app.router.lifespan_context(app):
        state = app.state.ptserve
        while not state.ready.is_set():
            await asyncio.sleep(0.05)
        admin = {"authorization": "Bearer bench-admin"}
        status, body = await call(app, "POST", "/v1/tenants/bench/keys", b"", admin)
        key = {"authorization": f"Bearer {json.loads(body)['key']}", "content-type": "application/json"}
        for i in range(32):
            status, body = await call(app, "PUT", f"/v1/adapters/bench/a{i}", encode_blob(make_adapter(fp, i)),
                                      {**admin, "content-type": "application/octet-stream"})
            assert status == 201, body
        yield app, state, key


async def measure(args) -> dict[str, tuple[float | None, float]]:
    from ptserve.server import hf_compat
    from ptserve.server.backbone import fingerprint_from_config, resolve_path
    from ptserve.server.logs import configure_logging
    from ptserve.server.settings import Settings

    tmp = Path(tempfile.mkdtemp(prefix="bench-path-"))
    tiny = save_tiny_encoder(tmp / "tiny", resolve_path("minilm"))
    fp = fingerprint_from_config(hf_compat.load_config(str(tiny), True))
    configure_logging("info", "json")  # what `ptserve serve` does; the access log is part of the path
    for handler in logging.getLogger().handlers:
        handler.setStream(open(os.devnull, "w"))  # noqa: SIM115  (formatted and written, then dropped)
    texts = review_texts(512)
    bodies = [json.dumps({"adapter": f"bench/a{k % 32}", "inputs": [t]}).encode() for k, t in enumerate(texts)]

    async def run(app, key, n: int) -> float:
        t0 = time.thread_time()
        for k in range(n):
            status, body = await call(app, "POST", "/v1/classify", bodies[k % len(bodies)], key)
            assert status == 200, body
        return (time.thread_time() - t0) / n * 1e6

    def settings(name: str):
        return Settings(backbone=str(tiny), store=f"file://{tmp / name}", admin_key="bench-admin",
                        dtype="float32", batch_overhead_tokens=64, threads=1, max_wait_ms=0)

    async with serving(settings("fast"), True, fp) as (fast, state, key), \
            serving(settings("routed"), False, fp) as (routed, _, routed_key):
        await run(fast, key, 200)  # warm: adapters resident, caches filled
        await run(routed, routed_key, 200)
        # alternating rounds, best of each: a shared machine's noise lands on both alike
        fast_us, routed_us = [], []
        for _ in range(args.rounds):
            fast_us.append(await run(fast, key, args.requests // args.rounds))
            routed_us.append(await run(routed, routed_key, args.requests // args.rounds))
        if args.profile:
            profiler = cProfile.Profile()
            profiler.enable()
            await run(fast, key, args.requests)
            profiler.disable()
            out = io.StringIO()
            pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(40)
            print(out.getvalue())
        rows = {"whole path (event-loop thread CPU; before: through FastAPI's route)": (min(routed_us), min(fast_us))}
        rows |= await layers(fast, state, bodies, texts, key)
    return rows


async def layers(app, state, bodies, texts, key) -> dict[str, tuple[float | None, float]]:
    """Each layer alone, on the inputs the whole-path run used: name -> (the replaced code's cost, now's)."""
    import torch

    from ptserve.adapters_store import untrusted_json
    from ptserve.server.api import predictions
    from ptserve.server.api.schemas import ClassifyRequest
    from ptserve.server.logs import RequestContext, log_request

    n = 2000
    body = bodies[0]
    parsed = untrusted_json.loads(body)
    out = {
        "JSON body (untrusted_json.loads)": per_call_us(lambda: untrusted_json.loads(body), n),
        "body validation (pydantic ClassifyRequest)": per_call_us(lambda: ClassifyRequest.model_validate(parsed), n),
        "tokeniser (Engine.tokenize, 1 text)": per_call_us(lambda: state.engine.tokenize([texts[0]], 16), n),
    }
    loop = asyncio.get_running_loop()
    auth = state.auth
    t0 = time.thread_time()
    for _ in range(n):
        await auth.authenticate(key["authorization"])
    out["authentication (cached key)"] = (time.thread_time() - t0) / n * 1e6
    limiter = state.limiter

    def slot():
        with limiter.slot("bench"):
            pass

    out["tenant limiter slot"] = per_call_us(slot, n)
    logits = [torch.randn(len(LABELS))]
    labels = LABELS
    out["predictions + response body (1 row)"] = per_call_us(
        lambda: predictions.classify_body("bench/a0", 1, labels, logits, False, 17), n)
    ctx = RequestContext("0" * 32, "POST", "/v1/classify", "bench", "k", "bench/a0", 1)
    out["access log line (JSON, formatted, written)"] = per_call_us(
        lambda: log_request(ctx, 200, 0.001, "/v1/classify"), n)
    out["metrics (requests + latency)"] = per_call_us(
        lambda: state.metrics.observe_request("/v1/classify", 200, 0.001), n)
    del loop
    old = await replaced(state, texts, labels, logits, ctx, n)
    rows = {name: (old.pop(name, None), us) for name, us in out.items()}  # name -> (replaced code, now)
    return rows | {name: (us, 0.0) for name, us in old.items()}


async def replaced(state, texts, labels, logits, ctx, n) -> dict[str, float]:
    """What the replaced code cost, on the same inputs (issue 12's before column), under the names of the layers
    that replaced it."""
    import dataclasses
    from datetime import datetime, timezone

    import torch
    from fastapi.encoders import jsonable_encoder
    from fastapi.responses import JSONResponse
    from starlette.concurrency import run_in_threadpool

    from ptserve.server.api.schemas import ClassifyResponse, Prediction, Usage
    from ptserve.server.logs import access_log

    def old_predictions():
        preds = []
        for row in logits:
            probs = torch.softmax(row, dim=-1)
            best = int(probs.argmax())
            preds.append(Prediction(label=labels[best], score=float(probs[best]),
                                    scores={label: float(p) for label, p in zip(labels, probs)}, logits=None))
        response = ClassifyResponse(adapter="bench/a0", version=1, predictions=preds, usage=Usage(input_tokens=17))
        ClassifyResponse.model_validate(response.model_dump())  # FastAPI revalidates the returned model
        return JSONResponse(jsonable_encoder(response)).body

    def old_log():
        fields = {**dataclasses.asdict(ctx), "endpoint": "/v1/classify", "status": 200, "latency_ms": 1.0}
        access_log.info("%s %s %d", ctx.method, ctx.path, 200, extra={"fields": fields})
        datetime.fromtimestamp(time.time(), timezone.utc).isoformat(timespec="milliseconds")  # the old timestamp

    tok = state.engine.backbone.tokenizer
    t0 = time.thread_time()
    for _ in range(n):
        await run_in_threadpool(lambda: None)
        await run_in_threadpool(lambda: None)
    return {
        "tokeniser (Engine.tokenize, 1 text)": per_call_us(
            lambda: tok([texts[0]], add_special_tokens=True, truncation=False)["input_ids"], n),
        "predictions + response body (1 row)": per_call_us(old_predictions, n),
        "access log line (JSON, formatted, written)": per_call_us(old_log, n),
        "sync dependencies (get_state, get_ready_state)": (time.thread_time() - t0) / n * 1e6,
    }


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=4, help="alternating rounds of each app (the best is shown)")
    ap.add_argument("--profile", action="store_true", help="also print cProfile's top 40 (by own time)")
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    result = asyncio.run(measure(args))
    print(f"| layer (CPU µs per request; load average {os.getloadavg()[0]:.2f}) | replaced code | now |")
    print("|---|---:|---:|")
    for name, (before, after) in result.items():
        cell = lambda v: "—" if v is None else f"{v:.0f}"  # noqa: E731
        print(f"| {name} | {cell(before)} | {cell(after)} |")


if __name__ == "__main__":
    main()
