"""Server-sent events, sans-IO: ``SSEDecoder`` turns lines into ``StreamEvent``s (WHATWG event-stream framing,
the OpenAI ``[DONE]`` convention, error events as ``StreamError``); ``iter_events``/``aiter_events`` feed it
the lines of a sync or async response."""

from __future__ import annotations

import json
from typing import AsyncIterable, AsyncIterator, Iterable, Iterator

from ptserve.client.errors import StreamError
from ptserve.client.types import StreamEvent


class SSEDecoder:
    """Incremental SSE parser: feed lines, get an event at each blank line.

    ``data: [DONE]`` ends the stream (``done``); an ``error`` event, or data holding an ``error`` object,
    raises ``StreamError`` with the server's type and message.
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

    def events(self, line: str | None) -> list[StreamEvent]:
        """What one line (None: the end of the stream) completes; nothing once ``done``."""
        if self.done:
            return []
        event = self.flush() if line is None else self.feed(line)
        return [event] if event is not None else []

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


def iter_events(lines: Iterable[str]) -> Iterator[StreamEvent]:
    decoder = SSEDecoder()
    for line in lines:
        yield from decoder.events(line)
        if decoder.done:
            return
    yield from decoder.events(None)


async def aiter_events(lines: AsyncIterable[str]) -> AsyncIterator[StreamEvent]:
    decoder = SSEDecoder()
    async for line in lines:
        for event in decoder.events(line):
            yield event
        if decoder.done:
            return
    for event in decoder.events(None):
        yield event
