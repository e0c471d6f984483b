"""Every error leaves as ``{"error": {"type", "message"}}`` with the status its type carries. The types
are the wire's (``ptserve.client.wire.errors``): a client raises the same class for the same answer."""
from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ptserve.client.wire.errors import (  # noqa: F401  (BadRequest, Draining, NotReady, ...: for the routes)
    APIError,
    BadRequest,
    Draining,
    InternalError,
    InvalidRequest,
    MethodNotAllowed,
    NotReady,
    RouteNotFound,
    UnsupportedMediaType,
)

log = logging.getLogger(__name__)


def error_response(status: int, type_: str, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": {"type": type_, "message": message}}, status_code=status, headers=headers)


def answer(exc: APIError) -> JSONResponse:
    # 401 carries WWW-Authenticate, 429 Retry-After, 503 draining Retry-After (see ptserve.client.wire.errors)
    return error_response(exc.status, exc.type, exc.message, exc.headers or None)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _ptserve(request: Request, exc: APIError):
        request.app.state.ptserve.metrics.observe_error(exc.type)
        return answer(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        parts = []
        for err in exc.errors()[:5]:
            if err.get("type") == "json_invalid":  # raised by ``json_body``, whose message says it all
                parts.append(str((err.get("ctx") or {}).get("error") or "the body is not valid JSON"))
                continue
            where = ".".join(str(x) for x in err.get("loc", ()) if x != "body")
            parts.append(f"{where or 'body'}: {err.get('msg')}")
        return answer(InvalidRequest("; ".join(parts)))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        kind = {404: RouteNotFound.type, 405: MethodNotAllowed.type}.get(exc.status_code, APIError.type)
        return error_response(exc.status_code, kind, str(exc.detail), getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return answer(InternalError("internal server error"))
