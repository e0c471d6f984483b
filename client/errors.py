"""Typed client errors. An ``APIError`` carries the server's status, error ``type`` and ``message`` (the body
``{"error": {"type", "message"}}`` every ptserve error has). The classes are the wire's
(``ptserve.client.wire.errors``), the same the server raises: a 404 ``adapter_not_found`` arrives as
``AdapterNotFound``, a ``NotFoundError``; an answer of a type this client does not know gets its
status class."""

from __future__ import annotations

import json

from ptserve.client.wire.errors import (  # noqa: F401  (the public names of ptserve.client)
    APIError,
    AuthenticationError,
    BadRequestError,
    ConflictError,
    GatewayTimeoutError,
    InternalServerError,
    MethodNotAllowedError,
    NotFoundError,
    PayloadTooLargeError,
    PermissionDeniedError,
    PtserveError,
    RateLimitError,
    ServiceUnavailableError,
    UnprocessableEntityError,
    UnsupportedMediaTypeError,
    error_class,
)

PtserveClientError = PtserveError  # base of every error the client raises (the name it has always had)


class APIConnectionError(PtserveError):
    """The server could not be reached (after retries) or the connection broke."""


class StreamError(PtserveError):
    """A stream ended with an error event, or its data could not be parsed."""


def error_from_response(status: int, headers: dict[str, str], body: bytes, reason: str = "") -> APIError:
    """The typed error for a non-2xx answer; bodies that are not ptserve's error JSON keep their text."""
    text = body[:500].decode(errors="replace").strip()
    type_, message = APIError.type, (text or reason or f"HTTP {status}")
    try:
        err = json.loads(body).get("error")
        if isinstance(err, dict):
            type_, message = str(err.get("type") or type_), str(err.get("message") or message)
    except (ValueError, AttributeError):
        pass
    headers = {k.lower(): v for k, v in headers.items()}
    return error_class(status, type_).answered(status, type_, message, headers)
