"""Typed client errors. An ``APIError`` carries the server's status, error ``type`` and ``message`` (the body
``{"error": {"type", "message"}}`` every ptserve error has); its subclass says the status class."""

from __future__ import annotations

import json


class PtserveClientError(Exception):
    """Base of every error the client raises."""


class APIConnectionError(PtserveClientError):
    """The server could not be reached (after retries) or the connection broke."""


class StreamError(PtserveClientError):
    """A stream ended with an error event, or its data could not be parsed."""


class APIError(PtserveClientError):
    status: int = 0

    def __init__(self, status: int, type: str, message: str, headers: dict[str, str] | None = None):
        super().__init__(f"{status} {type}: {message}")
        self.status, self.type, self.message = status, type, message
        self.headers = dict(headers or {})

    @property
    def request_id(self) -> str | None:
        return self.headers.get("x-request-id")


class BadRequestError(APIError):
    status = 400


class AuthenticationError(APIError):
    status = 401


class PermissionDeniedError(APIError):
    status = 403


class NotFoundError(APIError):
    status = 404


class ConflictError(APIError):
    status = 409


class PayloadTooLargeError(APIError):
    status = 413


class UnsupportedMediaTypeError(APIError):
    status = 415


class UnprocessableEntityError(APIError):
    """422: the request is well-formed but invalid (bad adapter, input too long, wrong task, ...)."""

    status = 422


class RateLimitError(APIError):
    status = 429

    @property
    def retry_after(self) -> float | None:
        from ptserve.client._core import parse_retry_after

        return parse_retry_after(self.headers.get("retry-after"))


class InternalServerError(APIError):
    status = 500


class ServiceUnavailableError(APIError):
    status = 503

    @property
    def retry_after(self) -> float | None:
        from ptserve.client._core import parse_retry_after

        return parse_retry_after(self.headers.get("retry-after"))


class GatewayTimeoutError(APIError):
    status = 504


_BY_STATUS: dict[int, type[APIError]] = {
    cls.status: cls
    for cls in (
        BadRequestError,
        AuthenticationError,
        PermissionDeniedError,
        NotFoundError,
        ConflictError,
        PayloadTooLargeError,
        UnsupportedMediaTypeError,
        UnprocessableEntityError,
        RateLimitError,
        InternalServerError,
        ServiceUnavailableError,
        GatewayTimeoutError,
    )
}


def error_from_response(status: int, headers: dict[str, str], body: bytes, reason: str = "") -> APIError:
    """The typed error for a non-2xx answer; bodies that are not ptserve's error JSON keep their text."""
    type_, message = "http_error", (body[:500].decode(errors="replace").strip() or reason or f"HTTP {status}")
    try:
        err = json.loads(body).get("error")
        if isinstance(err, dict):
            type_, message = str(err.get("type") or type_), str(err.get("message") or message)
    except (ValueError, AttributeError):
        pass
    cls = _BY_STATUS.get(status) or (InternalServerError if status >= 500 else APIError)
    error = cls(status, type_, message, {k.lower(): v for k, v in headers.items()})
    return error
