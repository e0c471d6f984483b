"""``Client`` (sync) and ``AsyncClient`` on httpx: every endpoint, typed results and errors, retries on
429/503 honouring ``Retry-After``, and streaming generation as an iterator of events.

    from ptserve.client import Client
    with Client("http://127.0.0.1:8000", api_key="...") as c:
        c.upload("acme/sentiment", "out/")  # a `ptserve train --out` folder, a blob or a PEFT folder
        print(c.classify("acme/sentiment", ["great!"]).predictions[0].label)
        for event in c.generate_stream("acme/poet", "Roses are"):
            print(event.text, end="")
"""

from __future__ import annotations

import asyncio
import os
import time
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import AsyncIterator, Iterator

import httpx

from ptserve.client import calls
from ptserve.client._core import (
    Call,
    RetryPolicy,
    aiter_events,
    default_key,
    default_url,
    iter_events,
    parse_retry_after,
    retryable_exception,
)
from ptserve.client.errors import APIConnectionError, PtserveClientError, error_from_response
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


class _Base:
    def __init__(
        self,
        base_url: str | None,
        api_key: str | None,
        timeout,
        retry: RetryPolicy | None,
        max_retries: int | None,
        headers: dict | None,
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

    def _request(self, http, call: Call) -> httpx.Request:
        return http.build_request(call.method, call.path, **call.request_kwargs())

    def _delay(
        self, call: Call, attempt: int, response: httpx.Response | None, exc: Exception | None
    ) -> float | None:
        if not call.retry:
            return None
        if exc is not None:
            retryable = retryable_exception(exc, call.method, call.side_effect_free)
            return self.retry.delay(attempt, None) if retryable else None
        if response.status_code not in (429, 503):
            return None
        return self.retry.delay(attempt, parse_retry_after(response.headers.get("retry-after")))

    def _connection_error(self, exc: Exception, call: Call) -> APIConnectionError:
        return APIConnectionError(f"{call.method} {self.base_url}{call.path}: {type(exc).__name__}: {exc}")


def _raise_for(response: httpx.Response, body: bytes) -> None:
    if response.status_code >= 400:
        raise error_from_response(response.status_code, dict(response.headers), body, response.reason_phrase)


class Client(_Base):
    """Sync client; ``base_url`` defaults to ``$PTSERVE_URL``, ``api_key`` to ``$PTSERVE_API_KEY``."""

    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        *,
        timeout=None,
        retry: RetryPolicy | None = None,
        max_retries: int | None = None,
        headers: dict | None = None,
        transport: httpx.BaseTransport | None = None,
    ):
        super().__init__(base_url, api_key, timeout, retry, max_retries, headers)
        self._http = httpx.Client(
            base_url=self.base_url, headers=self.headers, timeout=self.timeout, transport=transport
        )

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- transport ------------------------------------------------------------------------------------------
    @contextmanager
    def _send(self, call: Call, stream: bool = False) -> Iterator[httpx.Response]:
        """The 2xx response (streamed if asked), after retries; a typed error otherwise."""
        attempt = 0
        while True:
            response, exc = None, None
            try:
                response = self._http.send(self._request(self._http, call), stream=stream)
            except httpx.TransportError as e:
                exc = e
            delay = self._delay(call, attempt, response, exc)
            if delay is None:
                break
            if response is not None:
                response.close()
            time.sleep(delay)
            attempt += 1
        if exc is not None:
            raise self._connection_error(exc, call) from exc
        try:
            if response.status_code >= 400:
                _raise_for(response, response.read())
            yield response
        finally:
            response.close()

    def _run(self, call: Call):
        with self._send(call) as response:
            return call.parse(response)

    def _stream(self, call: Call) -> Iterator[StreamEvent]:
        with self._send(call, stream=True) as response:
            try:
                yield from iter_events(response.iter_lines())
            except httpx.TransportError as exc:
                raise self._connection_error(exc, call) from exc

    # --- adapters -------------------------------------------------------------------------------------------
    def upload(
        self, adapter_id: str, source: bytes | str | os.PathLike, labels: list[str] | None = None
    ) -> AdapterInfo:
        """Upload blob bytes, a blob file, a PEFT folder (labels from ``labels`` or its labels.json) or a
        ``ptserve train --out`` folder; returns the new version's info."""
        return self._run(calls.upload(adapter_id, source, labels))

    def list_adapters(
        self, tenant: str | None = None, cursor: str | None = None, limit: int | None = None
    ) -> AdapterPage:
        return self._run(calls.list_adapters(tenant, cursor, limit))

    def iter_adapters(self, tenant: str | None = None, page_size: int = 100) -> Iterator[AdapterInfo]:
        cursor = None
        while True:
            page = self.list_adapters(tenant, cursor, page_size)
            yield from page.data
            if not page.next_cursor:
                return
            cursor = page.next_cursor

    def get_adapter(self, adapter_id: str) -> AdapterInfo:
        return self._run(calls.get_adapter(adapter_id))

    def download_adapter(self, adapter_id: str) -> bytes:
        """The stored ptserve blob."""
        return self._run(calls.download_adapter(adapter_id))

    def export_peft(self, adapter_id: str, out_dir: str | os.PathLike) -> Path:
        """Download an adapter and write it as a PEFT folder (plus labels.json) that PEFT loads."""
        return _peft_exporter()(self.download_adapter(adapter_id), out_dir)

    def delete_adapter(self, adapter_id: str) -> None:
        self._run(calls.delete_adapter(adapter_id))

    # --- inference ------------------------------------------------------------------------------------------
    def classify(
        self, adapter: str, inputs: list[str] | str, *, return_logits: bool = False, truncate: bool = False
    ) -> ClassifyResult:
        return self._run(calls.classify(adapter, inputs, return_logits, truncate))

    def generate(self, adapter: str, prompt: str, **params) -> GenerateResult:
        """``params``: max_new_tokens, temperature, top_p, top_k, seed, stop (None values are left out)."""
        return self._run(calls.generate(adapter, prompt, **params))

    def generate_stream(self, adapter: str, prompt: str, **params) -> Iterator[StreamEvent]:
        """Server-sent events of a streamed generation; ``event.text`` is each new piece of text."""
        return self._stream(calls.generate_stream(adapter, prompt, **params))

    def completions(self, model: str, prompt: str | list[str], **params) -> Completion:
        return self._run(calls.completions(model, prompt, False, **params))

    def completions_stream(self, model: str, prompt: str | list[str], **params) -> Iterator[StreamEvent]:
        return self._stream(calls.completions(model, prompt, True, **params))

    def models(self) -> list[Model]:
        return self._run(calls.models())

    # --- keys (admin) ---------------------------------------------------------------------------------------
    def create_key(self, tenant: str, **params) -> CreatedKey:
        return self._run(calls.create_key(tenant, **params))

    def list_keys(self, tenant: str) -> list[KeyInfo]:
        return self._run(calls.list_keys(tenant))

    def revoke_key(self, tenant: str, key_id: str) -> None:
        self._run(calls.revoke_key(tenant, key_id))

    # --- operations -----------------------------------------------------------------------------------------
    def health(self) -> dict:
        return self._run(calls.health())

    def ready(self) -> dict:
        return self._run(calls.ready())

    def metrics(self) -> str:
        return self._run(calls.metrics())


class AsyncClient(_Base):
    """The asyncio twin of ``Client``: the same methods, awaited; streams are async iterators."""

    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        *,
        timeout=None,
        retry: RetryPolicy | None = None,
        max_retries: int | None = None,
        headers: dict | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ):
        super().__init__(base_url, api_key, timeout, retry, max_retries, headers)
        self._http = httpx.AsyncClient(
            base_url=self.base_url, headers=self.headers, timeout=self.timeout, transport=transport
        )

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()

    @asynccontextmanager
    async def _send(self, call: Call, stream: bool = False) -> AsyncIterator[httpx.Response]:
        attempt = 0
        while True:
            response, exc = None, None
            try:
                response = await self._http.send(self._request(self._http, call), stream=stream)
            except httpx.TransportError as e:
                exc = e
            delay = self._delay(call, attempt, response, exc)
            if delay is None:
                break
            if response is not None:
                await response.aclose()
            await asyncio.sleep(delay)
            attempt += 1
        if exc is not None:
            raise self._connection_error(exc, call) from exc
        try:
            if response.status_code >= 400:
                _raise_for(response, await response.aread())
            yield response
        finally:
            await response.aclose()

    async def _run(self, call: Call):
        async with self._send(call) as response:
            return call.parse(response)

    async def _stream(self, call: Call) -> AsyncIterator[StreamEvent]:
        async with self._send(call, stream=True) as response:
            try:
                async for event in aiter_events(response.aiter_lines()):
                    yield event
            except httpx.TransportError as exc:
                raise self._connection_error(exc, call) from exc

    async def upload(
        self, adapter_id: str, source: bytes | str | os.PathLike, labels: list[str] | None = None
    ) -> AdapterInfo:
        return await self._run(calls.upload(adapter_id, source, labels))

    async def list_adapters(
        self, tenant: str | None = None, cursor: str | None = None, limit: int | None = None
    ) -> AdapterPage:
        return await self._run(calls.list_adapters(tenant, cursor, limit))

    async def iter_adapters(
        self, tenant: str | None = None, page_size: int = 100
    ) -> AsyncIterator[AdapterInfo]:
        cursor = None
        while True:
            page = await self.list_adapters(tenant, cursor, page_size)
            for info in page.data:
                yield info
            if not page.next_cursor:
                return
            cursor = page.next_cursor

    async def get_adapter(self, adapter_id: str) -> AdapterInfo:
        return await self._run(calls.get_adapter(adapter_id))

    async def download_adapter(self, adapter_id: str) -> bytes:
        return await self._run(calls.download_adapter(adapter_id))

    async def export_peft(self, adapter_id: str, out_dir: str | os.PathLike) -> Path:
        return _peft_exporter()(await self.download_adapter(adapter_id), out_dir)

    async def delete_adapter(self, adapter_id: str) -> None:
        await self._run(calls.delete_adapter(adapter_id))

    async def classify(
        self, adapter: str, inputs: list[str] | str, *, return_logits: bool = False, truncate: bool = False
    ) -> ClassifyResult:
        return await self._run(calls.classify(adapter, inputs, return_logits, truncate))

    async def generate(self, adapter: str, prompt: str, **params) -> GenerateResult:
        return await self._run(calls.generate(adapter, prompt, **params))

    def generate_stream(self, adapter: str, prompt: str, **params) -> AsyncIterator[StreamEvent]:
        return self._stream(calls.generate_stream(adapter, prompt, **params))

    async def completions(self, model: str, prompt: str | list[str], **params) -> Completion:
        return await self._run(calls.completions(model, prompt, False, **params))

    def completions_stream(self, model: str, prompt: str | list[str], **params) -> AsyncIterator[StreamEvent]:
        return self._stream(calls.completions(model, prompt, True, **params))

    async def models(self) -> list[Model]:
        return await self._run(calls.models())

    async def create_key(self, tenant: str, **params) -> CreatedKey:
        return await self._run(calls.create_key(tenant, **params))

    async def list_keys(self, tenant: str) -> list[KeyInfo]:
        return await self._run(calls.list_keys(tenant))

    async def revoke_key(self, tenant: str, key_id: str) -> None:
        await self._run(calls.revoke_key(tenant, key_id))

    async def health(self) -> dict:
        return await self._run(calls.health())

    async def ready(self) -> dict:
        return await self._run(calls.ready())

    async def metrics(self) -> str:
        return await self._run(calls.metrics())


def _peft_exporter():
    """The blob → PEFT folder converter; it decodes tensors with torch, so it ships with the server distribution."""
    try:
        from ptserve.adapters_store.peft_folder import blob_to_peft_folder
    except ImportError as exc:
        raise PtserveClientError(
            "export_peft converts with torch: install the server distribution (pip install ptserve), "
            "or save download_adapter()'s blob as is"
        ) from exc
    return blob_to_peft_folder

