"""``Client`` (sync) and ``AsyncClient`` on httpx: every endpoint, typed results and errors, retries on
429/503 honouring ``Retry-After``, and streaming generation as an iterator of events.

    from ptserve.client import Client
    with Client("http://127.0.0.1:8000", api_key="...") as c:
        c.upload("acme/sentiment", "out/")  # a `ptserve train --out` folder, a blob or a PEFT folder
        print(c.classify("acme/sentiment", ["great!"]).predictions[0].label)
        for event in c.generate_stream("acme/poet", "Roses are"):
            print(event.text, end="")

The methods are written once (``Endpoints``): each names its ``calls`` spec and how it runs — one answer
(``_run``), a stream of events (``_stream``) or every item of a paged listing (``_items``). The two classes
are the executors of the sans-IO core (``_core``): ``Client`` performs its effects blocking, ``AsyncClient``
awaits them, and turns each one-answer method into a coroutine with the same signature and docstring.
"""

from __future__ import annotations

import asyncio
import functools
import os
import time
from contextlib import aclosing, closing
from pathlib import Path
from typing import AsyncIterator, Callable, Iterator, Union

import httpx

from ptserve.client import calls
from ptserve.client._core import (
    Call,
    RetryPolicy,
    connection_error,
    default_key,
    default_url,
    drive,
    exchange,
    result,
)
from ptserve.client.sse import aiter_events, iter_events
from ptserve.client.types import (
    AdapterInfo,
    AdapterPage,
    ClassifyResult,
    Completion,
    CreatedKey,
    GenerateResult,
    KeyInfo,
    Model,
    StreamEvent,
)

DEFAULT_TIMEOUT = httpx.Timeout(60.0, connect=10.0)
Events = Union[Iterator[StreamEvent], AsyncIterator[StreamEvent]]  # Client: an iterator; AsyncClient: async
Items = Union[Iterator[AdapterInfo], AsyncIterator[AdapterInfo]]


def _one_answer(method):
    """Marks a method that returns ``self._run(call)``: ``AsyncClient`` makes it a coroutine function."""
    method.one_answer = True
    return method


class Endpoints:
    """Every endpoint, for both clients (see the module docstring)."""

    _run: Callable[[Call], object]
    _stream: Callable[[Call], Events]
    _items: Callable[[Call, Callable[[AdapterPage], Call | None]], Items]

    # --- adapters -------------------------------------------------------------------------------------------
    @_one_answer
    def upload(
        self, adapter_id: str, source: bytes | str | os.PathLike, labels: list[str] | None = None
    ) -> AdapterInfo:
        """Upload blob bytes, a blob file, a PEFT folder (labels from ``labels`` or its labels.json) or a
        ``ptserve train --out`` folder; returns the new version's info."""
        return self._run(calls.upload(adapter_id, source, labels))

    @_one_answer
    def list_adapters(
        self, tenant: str | None = None, cursor: str | None = None, limit: int | None = None
    ) -> AdapterPage:
        """One page of adapters (a tenant key sees its own); pass ``next_cursor`` back for the next."""
        return self._run(calls.list_adapters(tenant, cursor, limit))

    def iter_adapters(self, tenant: str | None = None, page_size: int = 100) -> Items:
        """Every adapter, fetching ``page_size`` at a time."""

        def following(page: AdapterPage) -> Call | None:
            return calls.list_adapters(tenant, page.next_cursor, page_size) if page.next_cursor else None

        return self._items(calls.list_adapters(tenant, None, page_size), following)

    @_one_answer
    def get_adapter(self, adapter_id: str) -> AdapterInfo:
        """The adapter's current version."""
        return self._run(calls.get_adapter(adapter_id))

    @_one_answer
    def download_adapter(self, adapter_id: str) -> bytes:
        """The stored ptserve blob."""
        return self._run(calls.download_adapter(adapter_id))

    @_one_answer
    def export_peft(self, adapter_id: str, out_dir: str | os.PathLike) -> Path:
        """Download an adapter and write it as a PEFT folder (plus labels.json) that PEFT loads (needs the
        server distribution, which converts with torch)."""
        return self._run(calls.export_peft(adapter_id, out_dir))

    @_one_answer
    def delete_adapter(self, adapter_id: str) -> None:
        """Delete every version of an adapter."""
        return self._run(calls.delete_adapter(adapter_id))

    # --- inference ------------------------------------------------------------------------------------------
    @_one_answer
    def classify(
        self, adapter: str, inputs: list[str] | str, *, return_logits: bool = False, truncate: bool = False
    ) -> ClassifyResult:
        """Classify texts (one string: one text) with a classification adapter."""
        return self._run(calls.classify(adapter, inputs, return_logits, truncate))

    @_one_answer
    def generate(self, adapter: str, prompt: str, **params) -> GenerateResult:
        """``params``: max_new_tokens, temperature, top_p, top_k, seed, stop (None values are left out)."""
        return self._run(calls.generate(adapter, prompt, **params))

    def generate_stream(self, adapter: str, prompt: str, **params) -> Events:
        """Server-sent events of a streamed generation; ``event.text`` is each new piece of text."""
        return self._stream(calls.generate_stream(adapter, prompt, **params))

    @_one_answer
    def completions(self, model: str, prompt: str | list[str], **params) -> Completion:
        """OpenAI-compatible completion (``model`` = adapter id); ``params`` as OpenAI's (max_tokens, ...)."""
        return self._run(calls.completions(model, prompt, False, **params))

    def completions_stream(self, model: str, prompt: str | list[str], **params) -> Events:
        """The completion's chunks as server-sent events; ``event.text`` is each new piece of text."""
        return self._stream(calls.completions(model, prompt, True, **params))

    @_one_answer
    def models(self) -> list[Model]:
        """The adapters this key may use for the server's task, as OpenAI models."""
        return self._run(calls.models())

    # --- keys (admin) ---------------------------------------------------------------------------------------
    @_one_answer
    def create_key(self, tenant: str, **params) -> CreatedKey:
        """A new key for ``tenant`` (``name=`` a note for humans); its secret is shown this once."""
        return self._run(calls.create_key(tenant, **params))

    @_one_answer
    def list_keys(self, tenant: str) -> list[KeyInfo]:
        """The tenant's keys: ids and metadata, never the secrets."""
        return self._run(calls.list_keys(tenant))

    @_one_answer
    def revoke_key(self, tenant: str, key_id: str) -> None:
        """Revoke a key: it stops working at once on this replica, within a second on the others."""
        return self._run(calls.revoke_key(tenant, key_id))

    # --- operations -----------------------------------------------------------------------------------------
    @_one_answer
    def health(self) -> dict:
        """Liveness (``GET /healthz``)."""
        return self._run(calls.health())

    @_one_answer
    def ready(self) -> dict:
        """Readiness (``GET /readyz``; not retried: a 503 is the answer)."""
        return self._run(calls.ready())

    @_one_answer
    def metrics(self) -> str:
        """The Prometheus scrape (``GET /metrics``)."""
        return self._run(calls.metrics())


class _Base(Endpoints):
    _http_class: type = httpx.Client

    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        *,
        timeout=None,
        retry: RetryPolicy | None = None,
        max_retries: int | None = None,
        headers: dict | None = None,
        transport: httpx.BaseTransport | httpx.AsyncBaseTransport | None = None,
    ):
        self.base_url = (base_url or default_url()).rstrip("/")
        self.api_key = api_key if api_key is not None else default_key()
        self.retry = retry or RetryPolicy()
        if max_retries is not None:
            self.retry = RetryPolicy(
                max_retries, self.retry.backoff, self.retry.max_backoff, self.retry.max_retry_after
            )
        self.timeout = timeout if timeout is not None else DEFAULT_TIMEOUT
        self.headers = {"user-agent": "ptserve-client/0.1", **(headers or {})}
        if self.api_key:
            self.headers["authorization"] = f"Bearer {self.api_key}"
        self._http = self._http_class(
            base_url=self.base_url, headers=self.headers, timeout=self.timeout, transport=transport
        )

    def _answer(self, call: Call, stream: bool = False):
        """The core's steps for ``call``, performed by this executor: they end in the 2xx response (awaitable
        for ``AsyncClient``)."""
        request = lambda c: self._http.build_request(c.method, c.path, **c.request_kwargs())  # noqa: E731
        return drive(exchange(call, self.retry, request, self.base_url, stream), self._perform)

    def _perform(self, effect):
        return getattr(self, "_" + effect.op)(*effect.args)


class Client(_Base):
    """Sync client; ``base_url`` defaults to ``$PTSERVE_URL``, ``api_key`` to ``$PTSERVE_API_KEY``;
    ``transport`` is an ``httpx.BaseTransport`` (e.g. ``httpx.MockTransport`` for offline tests)."""

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- the executor: the core's effects, blocking ---------------------------------------------------------
    def _send(self, request: httpx.Request, stream: bool) -> httpx.Response:
        return self._http.send(request, stream=stream)

    def _read(self, response: httpx.Response) -> bytes:
        return response.read()

    def _close(self, response: httpx.Response) -> None:
        response.close()

    def _sleep(self, seconds: float) -> None:
        time.sleep(seconds)

    def _run(self, call: Call):
        return call.parse(result(self._answer(call)))

    def _stream(self, call: Call) -> Iterator[StreamEvent]:
        with closing(result(self._answer(call, stream=True))) as response:
            try:
                yield from iter_events(response.iter_lines())
            except httpx.TransportError as exc:
                raise connection_error(exc, call, self.base_url) from exc

    def _items(self, call: Call | None, following) -> Iterator[AdapterInfo]:
        while call is not None:
            page = self._run(call)
            yield from page.data
            call = following(page)


class AsyncClient(_Base):
    """The asyncio twin of ``Client``: the same methods, awaited; streams and ``iter_adapters`` are async
    iterators; ``transport`` is an ``httpx.AsyncBaseTransport``."""

    _http_class = httpx.AsyncClient

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()

    # --- the executor: the core's effects, awaited ----------------------------------------------------------
    async def _send(self, request: httpx.Request, stream: bool) -> httpx.Response:
        return await self._http.send(request, stream=stream)

    async def _read(self, response: httpx.Response) -> bytes:
        return await response.aread()

    async def _close(self, response: httpx.Response) -> None:
        await response.aclose()

    async def _sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)

    async def _run(self, call: Call):
        return call.parse(await self._answer(call))

    async def _stream(self, call: Call) -> AsyncIterator[StreamEvent]:
        async with aclosing(await self._answer(call, stream=True)) as response:
            try:
                async for event in aiter_events(response.aiter_lines()):
                    yield event
            except httpx.TransportError as exc:
                raise connection_error(exc, call, self.base_url) from exc

    async def _items(self, call: Call | None, following) -> AsyncIterator[AdapterInfo]:
        while call is not None:
            page = await self._run(call)
            for info in page.data:
                yield info
            call = following(page)


def _awaited(method):
    """``method`` (which returns ``self._run(...)``, an awaitable here) as a coroutine function, same
    signature and docstring."""

    @functools.wraps(method)
    async def coroutine(self, *args, **kwargs):
        return await method(self, *args, **kwargs)

    return coroutine


for _name, _method in vars(Endpoints).items():
    if getattr(_method, "one_answer", False):
        setattr(AsyncClient, _name, _awaited(_method))
del _name, _method
