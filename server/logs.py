"""Structured logs: one JSON object per line (or, ``PTSERVE_LOG_FORMAT=text``, one plain line with control
characters escaped), and the per-request context every access-log line carries.

The request middleware opens a ``RequestContext`` for each request; authentication, authorisation and the
adapter lease ``note`` the tenant, adapter and version into it, wherever they run (a context variable), and the
middleware writes one ``ptserve.access`` line when the response is done.
"""
from __future__ import annotations

import json
import logging
import re
import sys
from contextvars import ContextVar
from dataclasses import dataclass, fields
from datetime import datetime, timezone

access_log = logging.getLogger("ptserve.access")


@dataclass
class RequestContext:
    request_id: str
    method: str = ""
    path: str = ""
    tenant: str | None = None  # the caller: a tenant name, "admin" or "open"
    key_id: str | None = None
    adapter: str | None = None
    version: int | None = None
    generation: dict | None = None  # generation requests: tokens, engine steps, finish reason (or error type)


_current: ContextVar[RequestContext | None] = ContextVar("ptserve_request", default=None)


def current() -> RequestContext | None:
    return _current.get()


def bind(ctx: RequestContext):
    return _current.set(ctx)


def unbind(token) -> None:
    _current.reset(token)


def note(**fields) -> None:
    """Record facts about the current request (no-op outside one)."""
    ctx = _current.get()
    if ctx is not None:
        for k, v in fields.items():
            setattr(ctx, k, v)


_CONTEXT_FIELDS = tuple(f.name for f in fields(RequestContext))


def log_request(ctx: RequestContext, status: int, latency_s: float, endpoint: str) -> None:
    if not access_log.isEnabledFor(logging.INFO):
        return
    # the context's fields by hand: ``asdict`` deep-copies recursively, a third of a line's cost
    entry = {name: getattr(ctx, name) for name in _CONTEXT_FIELDS}
    entry.update(endpoint=endpoint, status=status, latency_ms=round(latency_s * 1000, 3))
    access_log.info("%s %s %d", ctx.method, ctx.path, status, extra={"fields": entry})


class JsonFormatter(logging.Formatter):
    """``{"ts", "level", "logger", "msg", ...extra fields}``; exceptions as one ``exc`` string."""

    _second: tuple[int, str] = (-1, "")  # the last whole second formatted (a line's timestamp is its costliest field)

    def _ts(self, created: float) -> str:
        second = int(created)
        if self._second[0] != second:
            self._second = (second, datetime.fromtimestamp(second, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S"))
        return f"{self._second[1]}.{int((created - second) * 1000):03d}Z"

    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": self._ts(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        out.update(getattr(record, "fields", None) or {})
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


# C0 and C1 control characters (\n, \r, ESC, ...), DEL and the Unicode line/paragraph separators: what a reader
# or a terminal would take for a new line or a command. Text logs show them escaped, as \n or \x1b.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def escape_controls(text: str) -> str:
    """``text`` with every control character escaped, so that a value from a request (a path with ``%0A``) can
    never start a line of its own in a text log."""
    return _CONTROL.sub(lambda m: repr(m[0])[1:-1], text)  # repr writes each of them as an escape


class TextFormatter(logging.Formatter):
    """``PTSERVE_LOG_FORMAT=text``: one line per record, its message escaped (``escape_controls``); a traceback
    follows on lines indented by four spaces, escaped the same way, so no line of it can pass for a record."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def formatMessage(self, record: logging.LogRecord) -> str:
        return escape_controls(super().formatMessage(record))

    def formatException(self, ei) -> str:
        return "\n".join("    " + escape_controls(line) for line in super().formatException(ei).splitlines())

    def formatStack(self, stack_info: str) -> str:
        return "\n".join("    " + escape_controls(line) for line in stack_info.splitlines())


def configure_logging(level: str, fmt: str = "json") -> None:
    """Root logging for ``ptserve serve``: JSON lines (or plain text) on stderr; uvicorn's loggers go the same way."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        JsonFormatter() if fmt == "json" else TextFormatter()
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        lg = logging.getLogger(name)
        lg.handlers[:] = []
        lg.propagate = True
    if fmt == "json":  # transformers writes progress bars and its own handler's lines to stderr: route them here
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.disable_default_handler()
        hf_logging.enable_propagation()
