"""``POST /v1/classify`` without FastAPI's router: the hot endpoint's well-formed requests, answered directly.

FastAPI spends most of a classify request's API-side CPU in its own machinery: matching the path against every
route, ``solve_dependencies`` for the body and two dependencies, Starlette ``Request`` objects, the exception
middleware (``benchmarks/bench_request_path.py``). This ASGI layer, the innermost of the app's middlewares, takes
a request to ``/v1/classify`` whose body is JSON of the right shape and runs the route's own steps on it
(``identify`` -> ``require_ready`` -> ``answer_classify``), answering errors the way the app's handlers do.

Anything else goes to FastAPI untouched (its body replayed): a body that is not ``application/json``, not valid
JSON or not a valid ``ClassifyRequest`` is answered by the route itself, so validation errors, content-type rules
and their precedence over authentication are the contract's, not a copy of it. ``tests/server/test_fast_classify``
sends the same requests, good and bad, through both and compares status, headers and body.
"""
from __future__ import annotations

import logging

from pydantic import ValidationError
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ptserve.adapters_store import untrusted_json
from ptserve.adapters_store.untrusted_json import JSONRejected
from ptserve.client.wire.errors import APIError, InternalError
from ptserve.server.api.deps import identify, require_ready
from ptserve.server.api.errors import answer
from ptserve.server.api.routes_classify import answer_classify
from ptserve.server.api.schemas import ClassifyRequest

log = logging.getLogger(__name__)
PATH = "/v1/classify"


class FastClassify:
    def __init__(self, app: ASGIApp, state, route):  # state: ServerState; route: the FastAPI route of PATH
        self.app, self.state, self.route = app, state, route

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] != PATH or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        messages, body = await _read_body(receive)
        req = _parse(scope, body) if body is not None else None
        if req is None:  # not the common case: the route answers it (and reads the body we took, replayed)
            return await self.app(scope, _replay(messages, receive), send)
        scope["route"] = self.route  # for the request metrics' route label, as the router would set it
        state = self.state
        try:
            principal = await identify(state, _header(scope, b"authorization"))  # dependencies in the route's order
            require_ready(state)
            response = await answer_classify(state, principal, req)
        except APIError as exc:  # what the app's APIError handler answers
            state.metrics.observe_error(exc.type)
            response = answer(exc)
        except Exception:  # what its catch-all handler answers
            log.exception("unhandled error on POST %s", PATH)
            response = answer(InternalError("internal server error"))
        await response(scope, receive, send)


async def _read_body(receive: Receive) -> tuple[list[Message], bytes | None]:
    """Every message read, and the whole body (None: the client went away first)."""
    messages, chunks = [], []
    while True:
        message = await receive()
        messages.append(message)
        if message["type"] != "http.request":
            return messages, None
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return messages, b"".join(chunks)


def _replay(messages: list[Message], receive: Receive) -> Receive:
    pending = list(messages)

    async def replayed() -> Message:
        return pending.pop(0) if pending else await receive()

    return replayed


def _parse(scope: Scope, body: bytes) -> ClassifyRequest | None:
    """The request, if its body is JSON (as FastAPI reads it: ``application/json``) of the right shape."""
    content_type = _header(scope, b"content-type")
    if content_type is None or content_type.split(";")[0].strip().lower() != "application/json":
        return None
    try:
        return ClassifyRequest.model_validate(untrusted_json.loads(body))
    except (JSONRejected, ValidationError):
        return None


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return value.decode("latin-1")
    return None
