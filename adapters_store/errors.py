"""Typed errors shared by the store, the engine and the API.

Every error carries the HTTP status and the machine-readable ``type`` the API answers with, so the API maps
them in one place (``server/api/errors.py``) and never guesses.
"""
from __future__ import annotations


class PtserveError(Exception):
    status: int = 500
    type: str = "internal_error"

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class InvalidAdapterId(PtserveError):
    status, type = 400, "invalid_adapter_id"


class InvalidAdapter(PtserveError):
    """The uploaded bytes are not an adapter this server can serve (format, names, dtypes, shapes, values)."""

    status, type = 422, "invalid_adapter"


class BackboneMismatch(InvalidAdapter):
    type = "backbone_mismatch"


class PayloadTooLarge(PtserveError):
    status, type = 413, "payload_too_large"


class AdapterNotFound(PtserveError):
    status, type = 404, "adapter_not_found"


class IntegrityError(PtserveError):
    """Stored bytes do not hash to the sha256 recorded with them."""

    status, type = 500, "store_integrity_error"


class StoreUnavailable(PtserveError):
    status, type = 503, "store_unavailable"


class InvalidInput(PtserveError):
    status, type = 422, "invalid_input"


class InputTooLong(InvalidInput):
    type = "input_too_long"


class WrongTask(InvalidInput):
    type = "wrong_task"


class NonFiniteLogits(InvalidInput):
    """One sequence's logits overflowed (e.g. an adapter whose finite but huge prefix values overflow the
    backbone's arithmetic): that sequence stops, the others in its batch carry on."""

    type = "non_finite_logits"


class GenerationFailed(PtserveError):
    """Computing one sequence failed for a reason of the server's own; the others in its batch carry on."""

    status, type = 500, "generation_failed"
