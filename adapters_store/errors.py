"""The typed errors the stores, the engine and the API raise. Each carries the HTTP status and the
machine-readable ``type`` the API answers with, so the API maps them in one place (``server/api/errors.py``).

They are defined in ``ptserve.client.wire.errors``, once for both sides (a client raises the same class when a
server answers that type); this module is the store's import path for them.
"""
from __future__ import annotations

from ptserve.client.wire.errors import (  # noqa: F401
    AdapterNotFound,
    APIError,
    BackboneMismatch,
    InputTooLong,
    IntegrityError,
    InvalidAdapter,
    InvalidAdapterId,
    InvalidInput,
    GenerationFailed,
    NonFiniteLogits,
    PayloadTooLarge,
    PtserveError,
    StoreUnavailable,
    WrongTask,
)
