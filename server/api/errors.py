"""Every error leaves as ``{"error": {"type", "message"}}`` with the status its type carries."""
from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ptserve.adapters_store.errors import PtserveError

log = logging.getLogger(__name__)


class NotReady(PtserveError):
    status, type = 503, "not_ready"


class BadRequest(PtserveError):
    status, type = 400, "bad_request"


class ClientDisconnected(PtserveError):
    """The client went away before its answer was ready (its generation is cancelled). Answered, to nobody, as
    499 (nginx's "client closed request"), so metrics and access logs count a client's disconnect, not a 5xx."""

    status, type = 499, "client_closed_request"


def error_response(status: int, type_: str, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": {"type": type_, "message": message}}, status_code=status, headers=headers)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(PtserveError)
    async def _ptserve(request: Request, exc: PtserveError):
        request.app.state.ptserve.metrics.observe_error(exc.type)
        # 401 carries WWW-Authenticate, 429 Retry-After, 503 draining Retry-After (see ptserve.server.auth/limits)
        return error_response(exc.status, exc.type, exc.message, getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        parts = []
        for err in exc.errors()[:5]:
            where = ".".join(str(x) for x in err.get("loc", ()) if x != "body")
            parts.append(f"{where or 'body'}: {err.get('msg')}")
        return error_response(422, "invalid_request", "; ".join(parts))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        kind = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return error_response(exc.status_code, kind, str(exc.detail), getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(500, "internal_error", "internal server error")
