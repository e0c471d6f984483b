"""The HTTP/1.1 connection: uvicorn's httptools protocol plus the limits it lacks on heads and bodies.

uvicorn with httptools buffers a request head of any size (an 8 MB header, 100k headers) and never times out a
connection that has not finished one (slowloris: it times out only idle keep-alive connections, and any byte
resets that), nor one whose body stops arriving. ``GuardedHttpToolsProtocol`` refuses a head past ``head_bytes``
with 431, and answers 408 and closes a connection whose head is not complete ``head_timeout_s`` after it opened (or
after its previous response), or whose body sends nothing for ``body_timeout_s``: no client holds memory or a
descriptor indefinitely without sending a request. h11 can bound the head's size but neither time, and parses in
pure Python; this keeps httptools' speed. A body's size is bounded by ``BodyLimitMiddleware``.
"""
from __future__ import annotations

import asyncio
import functools
import json
import logging
from dataclasses import dataclass

from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from ptserve.client.wire.errors import APIError, HeaderTooLarge, InvalidHTTP, RequestTimeout

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ConnectionLimits:
    head_bytes: int = 64 << 10  # request line + headers
    head_timeout_s: float = 10.0  # for the whole head, from the connection's start or the previous response
    body_timeout_s: float = 30.0  # longest silence while a body arrives (not while the app has reading paused)


class _HeadRefused(Exception):
    """Raised inside a parser callback: stops httptools mid-buffer (it reports it as a parser error)."""


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    def __init__(self, *args, limits: ConnectionLimits, **kwargs):
        super().__init__(*args, **kwargs)
        self.limits = limits
        self._reading_head = True  # from the start, and from the end of a request to the end of the next head
        self._head_raw = 0  # bytes received while reading this head (bounds a header still in progress)
        self._head_size = 0  # bytes of this head's request line and headers parsed so far (exact)
        self._head_timer: asyncio.TimerHandle | None = None
        self._body_timer: asyncio.TimerHandle | None = None
        self._refusal: APIError | None = None

    @classmethod
    def factory(cls, limits: ConnectionLimits):
        """What ``uvicorn.Config(http=...)`` takes: it calls it with uvicorn's own arguments."""
        return functools.partial(cls, limits=limits)

    # --- the head's time ---------------------------------------------------------------------------------------
    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._arm_head_timer()

    def connection_lost(self, exc) -> None:
        self._cancel_head_timer()
        self._cancel_body_timer()
        super().connection_lost(exc)

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self._reading_head and not self.transport.is_closing():
            self._arm_head_timer()  # the next head gets the full time; a byte does not reset it

    def _arm_head_timer(self) -> None:
        self._cancel_head_timer()
        self._head_timer = self.loop.call_later(self.limits.head_timeout_s, self._head_timed_out)

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        busy = self.cycle is not None and not self.cycle.response_complete  # answering: the client waits on us
        if self._reading_head and not busy and not self.transport.is_closing():
            timeout = self.limits.head_timeout_s
            self._refuse(RequestTimeout(f"the request head did not arrive within {timeout:g} s"))

    # --- the head's size ---------------------------------------------------------------------------------------
    def data_received(self, data: bytes) -> None:
        if self._reading_head:
            self._head_raw += len(data)
        super().data_received(data)  # answers our _HeadRefused through send_400_response, like a parser error
        if self._reading_head and self._head_raw > self.limits.head_bytes and not self.transport.is_closing():
            self._refuse(self._too_large())  # one header still arriving, already past the limit

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._head_size = 0

    def on_url(self, url: bytes) -> None:
        self._count(len(url))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count(len(name) + len(value) + 4)  # "name: value\r\n"
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._reading_head = False
        self._cancel_head_timer()
        self._arm_body_timer()  # cancelled at once by on_message_complete when there is no body
        super().on_headers_complete()

    def on_body(self, body: bytes) -> None:
        self._arm_body_timer()
        super().on_body(body)

    def on_message_complete(self) -> None:
        self._cancel_body_timer()
        super().on_message_complete()
        self._reading_head, self._head_raw = True, 0

    # --- the body's progress -------------------------------------------------------------------------------
    def _arm_body_timer(self) -> None:
        self._cancel_body_timer()
        self._body_timer = self.loop.call_later(self.limits.body_timeout_s, self._body_timed_out)

    def _cancel_body_timer(self) -> None:
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None

    def _body_timed_out(self) -> None:
        self._body_timer = None
        if self.transport.is_closing():
            return
        if self.flow.read_paused:  # we stopped reading (the app has not taken what came): not the client's delay
            return self._arm_body_timer()
        if self.cycle is not None and self.cycle.response_started:  # too late for a status: just hang up
            log.warning("closed connection: its request body stopped arriving")
            return self.transport.close()
        timeout = self.limits.body_timeout_s
        self._refuse(RequestTimeout(f"the request body sent nothing for {timeout:g} s"))

    def _count(self, n: int) -> None:
        self._head_size += n
        if self._head_size > self.limits.head_bytes:
            self._refusal = self._too_large()
            raise _HeadRefused()

    def _too_large(self) -> HeaderTooLarge:
        return HeaderTooLarge(f"the request head exceeds {self.limits.head_bytes} bytes")

    def send_400_response(self, msg: str) -> None:
        """uvicorn's answer to a parser error (ours among them): the API's error body instead of plain text."""
        if self._refusal is None:  # uvicorn has logged it
            return self._refuse(InvalidHTTP(msg), logged=True)
        self._refuse(self._refusal)

    def _refuse(self, error: APIError, logged: bool = False) -> None:
        """Answer with the API's error body and close: the connection cannot carry another request."""
        self._cancel_head_timer()
        if not logged:
            client = "%s:%d" % self.client if self.client else "-"
            log.warning("refused connection from %s: %s", client, error.message)
        body = json.dumps({"error": {"type": error.type, "message": error.message}}).encode()
        self.transport.write(b"".join([
            STATUS_LINE[error.status], b"content-type: application/json\r\n",
            b"content-length: %d\r\n" % len(body), b"connection: close\r\n\r\n", body,
        ]))
        self.transport.close()
