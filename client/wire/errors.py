"""The API's errors, defined once for both sides. The server raises these classes and answers each as
``{"error": {"type", "message"}}`` with the class's ``status`` (and its ``headers``); the client raises the
same class when a server answers with that type.

Two levels: a *status class* per HTTP status the API uses (``NotFoundError`` = 404, ...), the client's
categories, and below them one class per API error ``type`` (``AdapterNotFound`` = 404 ``adapter_not_found``),
which the server raises. So ``except NotFoundError`` catches every 404, ``except AdapterNotFound`` just
that one.
"""

from __future__ import annotations

import email.utils
import math
import time
from typing import Mapping


class PtserveError(Exception):
    """Base of every error ptserve raises, in the server and in the client."""


class APIError(PtserveError):
    """An error answer of the HTTP API: ``status``, its machine-readable ``type``, a ``message`` for
    humans and the answer's ``headers`` (``Retry-After``, ``WWW-Authenticate``, ``X-Request-ID`` ...)."""

    status: int = 500
    type: str = "http_error"

    def __init__(self, message: str, *, headers: Mapping[str, str] | None = None):
        super().__init__(message)
        self.message = message
        self.headers = dict(headers or {})

    def __init_subclass__(cls, **kw) -> None:
        super().__init_subclass__(**kw)
        if "type" in cls.__dict__:  # an API error type: one class per name
            assert cls.type not in _BY_TYPE, f"error type {cls.type!r} is defined twice"
            _BY_TYPE[cls.type] = cls
        elif "status" in cls.__dict__:
            _BY_STATUS[cls.status] = cls

    @classmethod
    def answered(
        cls, status: int, type: str, message: str, headers: Mapping[str, str] | None = None
    ) -> APIError:
        """The error as a client received it: the status and type the server sent, whatever the class's own
        (a subclass's ``__init__``, which builds the server's headers, is not run)."""
        error = cls.__new__(cls)
        APIError.__init__(error, message, headers=headers)
        error.status, error.type = status, type
        return error

    def __str__(self) -> str:
        return f"{self.status} {self.type}: {self.message}"

    def header(self, name: str) -> str | None:
        name = name.lower()
        return next((v for k, v in self.headers.items() if k.lower() == name), None)

    @property
    def request_id(self) -> str | None:
        return self.header("x-request-id")


_BY_TYPE: dict[str, type[APIError]] = {}
_BY_STATUS: dict[int, type[APIError]] = {}


def error_class(status: int, type: str) -> type[APIError]:
    """The class for an answer: its type's own class when the status agrees, else its status class (any other
    5xx: ``InternalServerError``), else ``APIError``."""
    cls = _BY_TYPE.get(type)
    if cls is not None and cls.status == status:
        return cls
    return _BY_STATUS.get(status) or (InternalServerError if status >= 500 else APIError)


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


class _RetryAfter:
    @property
    def retry_after(self) -> float | None:
        """Seconds the server asked to wait (``Retry-After``), None when it named none."""
        return parse_retry_after(self.header("retry-after"))


# --- status classes -----------------------------------------------------------------------------------------
class BadRequestError(APIError):
    """400: the request is malformed (an adapter id, a multipart upload without its parts)."""

    status = 400


class AuthenticationError(APIError):
    """401: no key, or one that is not (or no longer) valid."""

    status = 401


class PermissionDeniedError(APIError):
    """403: the key may not do that (another tenant's space, an admin route)."""

    status = 403


class NotFoundError(APIError):
    """404: no such adapter, key or route (another tenant's adapter looks missing too)."""

    status = 404


class MethodNotAllowedError(APIError):
    """405: the route exists, not with this method."""

    status = 405


class RequestTimeoutError(APIError):
    """408: the request's head (or its body) did not arrive in time; the server closed the connection."""

    status = 408


class ConflictError(APIError):
    """409: the request conflicts with the current state."""

    status = 409


class PayloadTooLargeError(APIError):
    """413: the body, or a part of the upload, is over its limit."""

    status = 413


class UnsupportedMediaTypeError(APIError):
    """415: an upload that is neither a blob nor a PEFT folder's multipart form."""

    status = 415


class HeaderFieldsTooLargeError(APIError):
    """431: the request line and headers are over ``PTSERVE_MAX_HEADER_BYTES``."""

    status = 431


class UnprocessableEntityError(APIError):
    """422: the request is well-formed but invalid (bad adapter, input too long, wrong task, ...)."""

    status = 422


class RateLimitError(_RetryAfter, APIError):
    """429: the server is overloaded for this tenant or everyone; ``retry_after`` says for how long."""

    status = 429


class InternalServerError(APIError):
    """500 (and any other 5xx without a class): the server failed."""

    status = 500


class ServiceUnavailableError(_RetryAfter, APIError):
    """503: loading, draining or without its store; ``retry_after`` when the server named one."""

    status = 503


class GatewayTimeoutError(APIError):
    """504: the request's deadline passed before it was served."""

    status = 504


# --- the API's error types ----------------------------------------------------------------------------------
class BadRequest(BadRequestError):
    """A request the server cannot read (e.g. a multipart upload without the PEFT files)."""

    type = "bad_request"


class InvalidHTTP(BadRequestError):
    """Bytes that are not an HTTP/1.1 request (answered by the connection, before any route)."""

    type = "invalid_http"


class InvalidAdapterId(BadRequestError):
    """An adapter id or tenant that breaks the syntax (``ptserve.client.wire.ids``)."""

    type = "invalid_adapter_id"


class Unauthorized(AuthenticationError):
    """401 with the ``WWW-Authenticate`` challenge (``error="invalid_token"`` for a key that is not valid)."""

    type = "unauthorized"

    def __init__(self, message: str, invalid: bool = False):
        challenge = 'Bearer realm="ptserve"' + (', error="invalid_token"' if invalid else "")
        super().__init__(message, headers={"WWW-Authenticate": challenge})


class Forbidden(PermissionDeniedError):
    """A tenant key acting on another tenant's space, or on an admin route."""

    type = "forbidden"


class AdapterNotFound(NotFoundError):
    """No such adapter, or one of another tenant (the answer is the same)."""

    type = "adapter_not_found"


class KeyNotFound(NotFoundError):
    """The tenant has no key of that id."""

    type = "key_not_found"


class RouteNotFound(NotFoundError):
    """No such route (the server's own 404, not an adapter's)."""

    type = "not_found"


class MethodNotAllowed(MethodNotAllowedError):
    """The route does not take this method."""

    type = "method_not_allowed"


class RequestTimeout(RequestTimeoutError):
    """A request head not complete within ``PTSERVE_HEADER_TIMEOUT_S``, or a body silent for
    ``PTSERVE_BODY_TIMEOUT_S``."""

    type = "request_timeout"


class HeaderTooLarge(HeaderFieldsTooLargeError):
    """A request head over ``PTSERVE_MAX_HEADER_BYTES``."""

    type = "header_too_large"


class PayloadTooLarge(PayloadTooLargeError):
    """A body, an uploaded blob or a PEFT file over its limit (answered while the body streams)."""

    type = "payload_too_large"


class UnsupportedMediaType(UnsupportedMediaTypeError):
    """An upload that is neither ``application/octet-stream`` nor ``multipart/form-data``."""

    type = "unsupported_media_type"


class InvalidRequest(UnprocessableEntityError):
    """The body does not fit the endpoint's schema (missing field, wrong type, out of range)."""

    type = "invalid_request"


class InvalidAdapter(UnprocessableEntityError):
    """The uploaded bytes are not an adapter this server can serve (format, names, dtypes, shapes, values)."""

    type = "invalid_adapter"


class BackboneMismatch(InvalidAdapter):
    """An adapter made for another backbone; the message says which fields differ."""

    type = "backbone_mismatch"


class InvalidInput(UnprocessableEntityError):
    """Inputs the endpoint cannot take (too many, ``max_new_tokens`` over the limit, ...)."""

    type = "invalid_input"


class InputTooLong(InvalidInput):
    """Prefix plus input tokens past the model's positions (``truncate`` cuts them instead)."""

    type = "input_too_long"


class WrongTask(InvalidInput):
    """An adapter of another task (a generation adapter asked to classify or embed, an embed adapter asked to
    classify, ...), or a backbone that does not serve the endpoint (embeddings on a decoder)."""

    type = "wrong_task"


class NonFiniteLogits(InvalidInput):
    """A generation's logits overflowed (e.g. an adapter whose finite but huge prefix values overflow the
    backbone's arithmetic): that sequence stops; the others in its batch carry on."""

    type = "non_finite_logits"


class ClientDisconnected(APIError):
    """499: the client went away before its answer was ready and its generation was cancelled. Nobody receives
    it; it keeps a client's disconnect out of the 5xx counts (nginx's "client closed request")."""

    status, type = 499, "client_closed_request"


class NoChatTemplate(InvalidInput):
    """A chat request to a decoder with no chat template (neither the tokenizer's nor PTSERVE_CHAT_TEMPLATE)."""

    type = "no_chat_template"


class Overloaded(RateLimitError):
    """429: try again after ``retry_after`` seconds (sent as ``Retry-After``, whole seconds in 1..60)."""

    type = "overloaded"

    def __init__(self, message: str, retry_after: float = 1.0):
        super().__init__(message, headers={"Retry-After": str(max(1, min(60, math.ceil(retry_after))))})


class QueueFull(Overloaded):
    """The queue, or this tenant's share of it, is full."""

    type = "queue_full"


class TenantBusy(Overloaded):
    """The tenant already has its limit of requests in flight."""

    type = "tenant_concurrency_limit"


class InternalError(InternalServerError):
    """An unexpected failure inside the server (its log has the traceback)."""

    type = "internal_error"


class GenerationFailed(InternalServerError):
    """Computing one generation failed for a reason of the server's own; the others in its batch carry on."""

    type = "generation_failed"


class IntegrityError(InternalServerError):
    """Stored bytes do not hash to the sha256 recorded with them."""

    type = "store_integrity_error"


class StoreUnavailable(ServiceUnavailableError):
    """The adapter store cannot be reached and the adapter is not resident."""

    type = "store_unavailable"


class NotReady(ServiceUnavailableError):
    """The backbone is still loading, or failed to load."""

    type = "not_ready"


class Draining(ServiceUnavailableError):
    type = "draining"

    def __init__(self, message: str = "the server is shutting down; retry on another replica"):
        super().__init__(message, headers={"Retry-After": "1", "Connection": "close"})


class EngineUnavailable(ServiceUnavailableError):
    """The engine core process is down (restarting) or unreachable from this API worker; retry shortly."""

    type = "engine_unavailable"

    def __init__(self, message: str = "the engine core is restarting; retry shortly", retry_after: float = 1.0):
        super().__init__(message, headers={"Retry-After": str(max(1, min(60, math.ceil(retry_after))))})


class AdapterChanged(ServiceUnavailableError):
    """A new version of the adapter was published twice while the request was being served (each answer comes
    from one whole version); retrying gets the newest."""

    type = "adapter_changed"

    def __init__(self, message: str, retry_after: float = 1.0):
        super().__init__(message, headers={"Retry-After": str(max(1, min(60, math.ceil(retry_after))))})


class DeadlineExceeded(GatewayTimeoutError):
    """The request was not served within ``PTSERVE_REQUEST_TIMEOUT_S``."""

    type = "deadline_exceeded"
