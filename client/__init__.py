"""ptserve's Python SDK: ``Client`` / ``AsyncClient`` for every endpoint of the HTTP API, typed results and
errors, retries with backoff on 429/503. The CLI (``ptserve adapters|classify|generate|keys``) is ``client.cli``."""
from client._core import RetryPolicy
from client.errors import (
    APIConnectionError, APIError, AuthenticationError, BadRequestError, ConflictError, GatewayTimeoutError,
    InternalServerError, NotFoundError, PayloadTooLargeError, PermissionDeniedError, PtserveClientError,
    RateLimitError, ServiceUnavailableError, StreamError, UnprocessableEntityError, UnsupportedMediaTypeError,
)
from client.sdk import AsyncClient, Client
from client.types import (
    AdapterInfo, AdapterPage, ClassifyResult, Completion, CompletionChoice, CreatedKey, GenerateResult, KeyInfo,
    Model, Prediction, StreamEvent,
)

__all__ = [
    "Client", "AsyncClient", "RetryPolicy",
    "AdapterInfo", "AdapterPage", "ClassifyResult", "Completion", "CompletionChoice", "CreatedKey", "GenerateResult",
    "KeyInfo", "Model", "Prediction", "StreamEvent",
    "PtserveClientError", "APIConnectionError", "APIError", "StreamError", "BadRequestError", "AuthenticationError",
    "PermissionDeniedError", "NotFoundError", "ConflictError", "PayloadTooLargeError", "UnsupportedMediaTypeError",
    "UnprocessableEntityError", "RateLimitError", "InternalServerError", "ServiceUnavailableError",
    "GatewayTimeoutError",
]
