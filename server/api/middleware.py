"""ASGI middleware: request body limits enforced while the body streams in; request ids, draining, per-request
metrics and access logs."""
from __future__ import annotations

import json
import random
import re
import time
from typing import Callable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ptserve.client.wire.errors import PayloadTooLarge
from ptserve.server.limits import Draining
from ptserve.server.logs import RequestContext, bind, log_request, unbind


class _TooLarge(Exception):
    pass


class BodyLimitMiddleware:
    """Answer 413 as soon as a body passes its limit (declared Content-Length or bytes actually received)."""

    def __init__(self, app: ASGIApp, limit_for: Callable[[str, str], int]):
        self.app, self.limit_for = app, limit_for

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = self.limit_for(scope["method"], scope["path"])
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            return await _send_413(send, limit)
        received, started, refused = 0, False, False

        async def limited_receive() -> Message:
            nonlocal received, refused
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    # Answer now: the app may catch what we raise (FastAPI turns a failed body read into 400).
                    if not started and not refused:
                        refused = True
                        await _send_413(send, limit)
                    raise _TooLarge()
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if refused:
                return  # the 413 went out; drop whatever the app answers after its body read failed
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except _TooLarge:
            if not started and not refused:
                await _send_413(send, limit)


async def _send_413(send: Send, limit: int) -> None:
    body = json.dumps(
        {"error": {"type": PayloadTooLarge.type, "message": f"request body exceeds {limit} bytes"}}
    ).encode()
    await send({"type": "http.response.start", "status": 413,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


OPS_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})  # never refused while draining, not "in flight"
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")  # fullmatch: "$" also matches before "\n"


class RequestMiddleware:
    """The outermost layer: request id (``X-Request-ID`` accepted or made, always returned), the replica's id on
    every response (``X-Ptserve-Replica``), refusal while draining, the in-flight count a drain waits for,
    per-request metrics (route template and status class: bounded label values) and one JSON access-log line
    per request."""

    def __init__(self, app: ASGIApp, state):  # state: ptserve.server.api.state.ServerState
        self.app, self.state = app, state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        given = headers.get(b"x-request-id", b"").decode("latin-1")
        ctx = RequestContext(given if _REQUEST_ID.fullmatch(given) else _new_request_id(),
                             scope["method"], scope["path"])
        token, start, status = bind(ctx), time.perf_counter(), 500
        rid_header = (b"x-request-id", ctx.request_id.encode())
        replica_header = (b"x-ptserve-replica", self.state.settings.replica_id.encode())  # which replica answered
        ops = scope["path"] in OPS_PATHS

        async def capture(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message = {**message, "headers": [*message.get("headers", []), rid_header, replica_header]}
            await send(message)

        endpoint = "unmatched"
        try:
            if self.state.draining and not ops:
                self.state.metrics.rejections.labels("draining").inc()
                err = Draining()
                return await _send_json(capture, err.status, err.type, err.message, err.headers)
            if not ops:  # counted where it changes: another process's scrape cannot read this one's state
                self.state.inflight += 1
                self.state.metrics.inflight.inc()
            try:
                await self.app(scope, receive, capture)
            finally:
                if not ops:
                    self.state.inflight -= 1
                    self.state.metrics.inflight.dec()
        finally:
            route = scope.get("route")
            endpoint = getattr(route, "path", None) or "unmatched"
            latency = time.perf_counter() - start
            self.state.metrics.observe_request(endpoint, status, latency)
            if not ops or status >= 400:
                log_request(ctx, status, latency, endpoint)
            unbind(token)


def _new_request_id() -> str:
    # 128 random bits, hex (like uuid4().hex); not os.urandom per request: a syscall on the hot path, and ids need
    # to be unique, not secret.
    return f"{random.getrandbits(128):032x}"


async def _send_json(send: Send, status: int, type_: str, message: str, headers: dict | None = None) -> None:
    body = json.dumps({"error": {"type": type_, "message": message}}).encode()
    extra = [(k.lower().encode(), str(v).encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *extra]})
    await send({"type": "http.response.body", "body": body})
