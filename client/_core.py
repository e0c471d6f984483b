"""The client's sans-IO core, shared by ``Client`` and ``AsyncClient``: what a call sends (``Call``), when to
resend it and how long to wait first (``RetryPolicy``, honouring ``Retry-After``; the resend-after-cut-short
rule of inference calls), and how an answer becomes the response to read or a typed error (``exchange``).

Nothing here does I/O. ``exchange`` is a generator that yields ``Effect``s (send this request, read that body,
close it, sleep) and is sent their results; ``sdk.py``'s two executors perform them, one blocking, one
awaiting. A transport failure is thrown back into the generator at the effect that failed.
"""

from __future__ import annotations

import inspect
import os
import random
import types
from dataclasses import dataclass, field
from typing import Any, Callable, Generator, NamedTuple

import httpx

from ptserve.client.errors import APIConnectionError, error_from_response
from ptserve.client.wire.errors import parse_retry_after

DEFAULT_URL = "http://127.0.0.1:8000"
ADAPTER_HEADER = "X-Ptserve-Adapter"
RETRY_STATUSES = frozenset({429, 503})  # the server refused before doing any work: always safe to resend
IDEMPOTENT = frozenset({"GET", "HEAD", "DELETE", "OPTIONS"})
# The request cannot have reached the server: resent whatever the method.
NOT_SENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)
# The request may have been served and its answer lost (a replica died mid-answer, a read timed out).
CUT_SHORT = (httpx.ReadTimeout, httpx.RemoteProtocolError, httpx.ReadError)


def default_url() -> str:
    return os.environ.get("PTSERVE_URL") or DEFAULT_URL


def default_key() -> str | None:
    return os.environ.get("PTSERVE_API_KEY") or None


@dataclass
class Call:
    """One API call: the request to send and how to turn a 2xx answer into a result."""

    method: str
    path: str
    parse: Callable[[httpx.Response], Any] = lambda r: None
    json: Any = None
    params: dict | None = None
    content: bytes | None = None
    files: Any = None
    data: dict | None = None
    headers: dict = field(default_factory=dict)
    retry: bool = True
    adapter: str | None = None  # sent as X-Ptserve-Adapter: a consistent-hash proxy keeps it on one replica
    side_effect_free: bool = False  # a POST that changes nothing (inference): resent after a transport error

    def request_kwargs(self) -> dict:
        headers = {**self.headers, ADAPTER_HEADER: self.adapter} if self.adapter else self.headers
        kw: dict[str, Any] = {"headers": headers}
        for name in ("json", "params", "content", "files", "data"):
            value = getattr(self, name)
            if value is not None:
                kw[name] = value
        return kw


@dataclass(frozen=True)
class RetryPolicy:
    """Retries on 429/503 (honouring ``Retry-After``) and on connection failures.

    Without ``Retry-After`` the wait is ``backoff * 2**attempt`` (at most ``max_backoff``) with ±20% jitter; a
    ``Retry-After`` longer than ``max_retry_after`` is not waited out: the error is raised at once.
    """

    max_retries: int = 3
    backoff: float = 0.5
    max_backoff: float = 8.0
    max_retry_after: float = 60.0

    def delay(self, attempt: int, retry_after: float | None) -> float | None:
        """Seconds to wait before retry number ``attempt + 1``, or None to give up."""
        if attempt >= self.max_retries:
            return None
        if retry_after is not None:
            return retry_after if retry_after <= self.max_retry_after else None
        return min(self.max_backoff, self.backoff * 2**attempt) * random.uniform(0.8, 1.2)

    def after_answer(self, call: Call, attempt: int, response: httpx.Response) -> float | None:
        """How long to wait before resending ``call`` after this error answer (None: raise it)."""
        if not call.retry or response.status_code not in RETRY_STATUSES:
            return None
        return self.delay(attempt, parse_retry_after(response.headers.get("retry-after")))

    def after_failure(self, call: Call, attempt: int, exc: Exception) -> float | None:
        """How long to wait before resending ``call`` after a transport failure (None: raise it)."""
        return self.delay(attempt, None) if call.retry and resendable(exc, call) else None


def resendable(exc: Exception, call: Call) -> bool:
    """Resend a request that never reached the server; one that may have, only if idempotent or free of side
    effects (inference: an answer cut short when its replica died is simply asked for again)."""
    if isinstance(exc, NOT_SENT):
        return True
    return (call.method in IDEMPOTENT or call.side_effect_free) and isinstance(exc, CUT_SHORT)


class Effect(NamedTuple):
    """One piece of I/O the core asks of its executor: ``op`` names the executor's method (send, read, close,
    sleep), ``args`` its arguments; the executor sends back what the method returns."""

    op: str
    args: tuple


Steps = Generator[Effect, Any, Any]


def exchange(
    call: Call, policy: RetryPolicy, request: Callable[[Call], httpx.Request], base_url: str, stream: bool
) -> Steps:
    """Send ``call`` until it is answered 2xx or given up; returns that response (open, when ``stream``: the
    caller reads and closes it). A stream is resent only before its first byte: no event is ever repeated."""
    attempt = 0
    while True:
        try:
            response = yield Effect("send", (request(call), stream))
        except httpx.TransportError as exc:
            delay = policy.after_failure(call, attempt, exc)
            if delay is None:
                raise connection_error(exc, call, base_url) from exc
        else:
            if response.status_code < 400:
                return response
            delay = policy.after_answer(call, attempt, response)
            if delay is None:
                yield from _raise_answer(response, call, base_url)
            yield Effect("close", (response,))
        yield Effect("sleep", (delay,))
        attempt += 1


def _raise_answer(response: httpx.Response, call: Call, base_url: str) -> Steps:
    try:
        body = yield Effect("read", (response,))
    except httpx.TransportError as exc:
        raise connection_error(exc, call, base_url) from exc
    finally:
        yield Effect("close", (response,))
    raise error_from_response(response.status_code, dict(response.headers), body, response.reason_phrase)


def connection_error(exc: Exception, call: Call, base_url: str) -> APIConnectionError:
    return APIConnectionError(f"{call.method} {base_url}{call.path}: {type(exc).__name__}: {exc}")


@types.coroutine
def drive(steps: Steps, perform: Callable[[Effect], Any]):
    """Run ``steps`` to its return value, performing each effect with ``perform``. The one loop of both
    executors: an awaitable that ``perform`` returns (``AsyncClient``'s) is awaited in place, so
    ``await drive(...)`` runs under asyncio, and ``result(drive(...))`` runs a blocking ``perform`` to
    the end."""
    value, failure = None, None
    while True:
        try:
            effect = steps.throw(failure) if failure is not None else steps.send(value)
        except StopIteration as done:
            return done.value
        value, failure = None, None
        try:
            value = perform(effect)
            if inspect.isawaitable(value):
                value = yield from value.__await__()
        except httpx.TransportError as exc:
            failure = exc


def result(driving) -> Any:
    """The return value of a ``drive`` whose effects are all blocking (it never suspends)."""
    try:
        driving.send(None)
    except StopIteration as done:
        return done.value
    raise RuntimeError("a blocking executor's effect returned an awaitable")
