"""What ``Client`` and ``AsyncClient`` share, free of I/O: endpoint specs (``Call``), the retry policy,
``Retry-After`` parsing, server-sent-event parsing and upload source detection."""

from __future__ import annotations

import email.utils
import json
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable
from urllib.parse import quote

import httpx

from ptserve.client.errors import StreamError
from ptserve.client.types import StreamEvent
from ptserve.client.wire import BLOB_FILE, LABELS_FILE, PEFT_DIR
from ptserve.client.wire import PEFT_CONFIG_FILE as PEFT_CONFIG
from ptserve.client.wire import PEFT_WEIGHTS_FILE as PEFT_WEIGHTS

DEFAULT_URL = "http://127.0.0.1:8000"
RETRY_STATUSES = frozenset({429, 503})
IDEMPOTENT = frozenset({"GET", "HEAD", "DELETE", "OPTIONS"})


def default_url() -> str:
    return os.environ.get("PTSERVE_URL") or DEFAULT_URL


def default_key() -> str | None:
    return os.environ.get("PTSERVE_API_KEY") or None


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


def parse_retry_after(value: str | None) -> float | None:
    """``Retry-After`` as seconds: delta-seconds or an HTTP date; None when absent or unreadable."""
    if value is None:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def retryable_exception(exc: Exception, method: str, side_effect_free: bool = False) -> bool:
    """Retry a request that never reached the server; one that may have, only if idempotent or free of side
    effects (inference: an answer cut short when its replica died is simply asked for again)."""
    if isinstance(exc, (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)):
        return True
    return (method in IDEMPOTENT or side_effect_free) and isinstance(
        exc, (httpx.ReadTimeout, httpx.RemoteProtocolError, httpx.ReadError)
    )


ADAPTER_HEADER = "X-Ptserve-Adapter"


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


def adapter_path(adapter_id: str, suffix: str = "") -> str:
    tenant, sep, name = adapter_id.partition("/")
    if not sep or not tenant or not name:
        raise ValueError(f"adapter id {adapter_id!r} must be 'tenant/name'")
    return f"/v1/adapters/{quote(tenant, safe='')}/{quote(name, safe='')}{suffix}"


def tenant_path(tenant: str, suffix: str = "") -> str:
    if not tenant or "/" in tenant:
        raise ValueError(f"tenant {tenant!r} must be a non-empty name without '/'")
    return f"/v1/tenants/{quote(tenant, safe='')}{suffix}"


def drop_none(**kw) -> dict:
    return {k: v for k, v in kw.items() if v is not None}


# --- uploads ------------------------------------------------------------------------------------------------
def upload_call(adapter_id: str, source: bytes | str | os.PathLike, labels: list[str] | None, parse) -> Call:
    """The PUT for ``source``: blob bytes, a blob file, a PEFT folder, or a ``ptserve train --out`` folder."""
    path = adapter_path(adapter_id)
    if isinstance(source, (bytes, bytearray, memoryview)):
        return _blob_call(path, bytes(source), parse, adapter_id)
    src = Path(source)
    if src.is_file():
        return _blob_call(path, src.read_bytes(), parse, adapter_id)
    if not src.is_dir():
        raise FileNotFoundError(f"{src}: no such file or folder")
    if (src / BLOB_FILE).is_file():  # a `ptserve train --out` folder: its blob carries the labels
        return _blob_call(path, (src / BLOB_FILE).read_bytes(), parse, adapter_id)
    folder = src / PEFT_DIR if (src / PEFT_DIR / PEFT_CONFIG).is_file() else src
    if not (folder / PEFT_CONFIG).is_file():
        raise FileNotFoundError(f"{src} holds neither {BLOB_FILE} nor a PEFT folder ({PEFT_CONFIG})")
    if labels is None and (folder / LABELS_FILE).is_file():
        labels = json.loads((folder / LABELS_FILE).read_text())
    files = {
        name: (name, (folder / name).read_bytes(), "application/octet-stream")
        for name in (PEFT_CONFIG, PEFT_WEIGHTS)
    }
    data = {"labels": json.dumps(list(labels))} if labels else None
    return Call("PUT", path, parse, files=files, data=data, adapter=adapter_id)


def _blob_call(path: str, blob: bytes, parse, adapter_id: str) -> Call:
    return Call("PUT", path, parse, content=blob, headers={"content-type": "application/octet-stream"},
                adapter=adapter_id)


# --- server-sent events -------------------------------------------------------------------------------------
class SSEDecoder:
    """Incremental SSE parser (WHATWG event-stream): feed lines, get events at each blank line.

    ``data: [DONE]`` (the OpenAI convention) ends the stream; an ``error`` event, or data holding an ``error``
    object, raises ``StreamError`` with the server's type and message.
    """

    def __init__(self) -> None:
        self.event: str | None = None
        self.data: list[str] = []
        self.done = False

    def feed(self, line: str) -> StreamEvent | None:
        line = line.rstrip("\r\n")
        if line == "":
            return self._dispatch()
        if line.startswith(":"):
            return None
        name, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if name == "event":
            self.event = value
        elif name == "data":
            self.data.append(value)
        return None

    def flush(self) -> StreamEvent | None:
        return self._dispatch()

    def _dispatch(self) -> StreamEvent | None:
        if not self.data:
            self.event = None
            return None
        raw, event = "\n".join(self.data), self.event
        self.data, self.event = [], None
        if raw.strip() == "[DONE]":
            self.done = True
            return None
        try:
            payload = json.loads(raw)
        except json.JSONDecodeError:
            raise StreamError(f"stream event data is not JSON: {raw[:200]!r}") from None
        if not isinstance(payload, dict):
            payload = {"data": payload}
        err = payload.get("error")
        if event == "error" or isinstance(err, dict):
            err = err if isinstance(err, dict) else payload
            raise StreamError(f"{err.get('type', 'stream_error')}: {err.get('message', raw[:200])}")
        return StreamEvent(event, payload, raw)


def iter_events(lines: Iterable[str]):
    decoder = SSEDecoder()
    for line in lines:
        event = decoder.feed(line)
        if event is not None:
            yield event
        if decoder.done:
            return
    if (event := decoder.flush()) is not None:
        yield event


async def aiter_events(lines):
    decoder = SSEDecoder()
    async for line in lines:
        event = decoder.feed(line)
        if event is not None:
            yield event
        if decoder.done:
            return
    if (event := decoder.flush()) is not None:
        yield event
