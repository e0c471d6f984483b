"""Structured logs: one JSON object per line, and the per-request context every access-log line carries.

The request middleware opens a ``RequestContext`` for each request; authentication, authorisation and the
adapter lease ``note`` the tenant, adapter and version into it, wherever they run (a context variable), and the
middleware writes one ``ptserve.access`` line when the response is done.
"""
from __future__ import annotations

import json
import logging
import sys
from contextvars import ContextVar
from dataclasses import asdict, dataclass
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


def log_request(ctx: RequestContext, status: int, latency_s: float, endpoint: str) -> None:
    access_log.info(
        "%s %s %d", ctx.method, ctx.path, status,
        extra={"fields": {**asdict(ctx), "endpoint": endpoint, "status": status,
                          "latency_ms": round(latency_s * 1000, 3)}},
    )


class JsonFormatter(logging.Formatter):
    """``{"ts", "level", "logger", "msg", ...extra fields}``; exceptions as one ``exc`` string."""

    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds")[:-6] + "Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        out.update(getattr(record, "fields", None) or {})
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def configure_logging(level: str, fmt: str = "json") -> None:
    """Root logging for ``ptserve serve``: JSON lines (or plain text) on stderr; uvicorn's loggers go the same way."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        JsonFormatter() if fmt == "json" else logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
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
