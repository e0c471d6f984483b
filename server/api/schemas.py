"""Request and response bodies of the HTTP API (DESIGN's contract), named by role."""
from __future__ import annotations

from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field

from ptserve.client.wire.records import AdapterInfo


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# The wire's AdapterInfo under the name the OpenAPI document has always given it; no field of its own (and no
# docstring: it would become the schema's description).
@dataclass(frozen=True)
class AdapterPublic(AdapterInfo):
    pass


class AdapterList(BaseModel):
    data: list[AdapterPublic]
    next_cursor: str | None = None


class ClassifyRequest(_Strict):
    adapter: str = Field(..., description="Adapter id, 'tenant/name'.", examples=["acme/sentiment"])
    inputs: list[str] = Field(..., min_length=1, description="Texts to classify.")
    return_logits: bool = False
    truncate: bool = Field(False, description="Cut inputs that do not fit instead of answering 422.")


class Prediction(BaseModel):
    label: str
    score: float
    scores: dict[str, float]
    logits: list[float] | None = None


class Usage(BaseModel):
    input_tokens: int


class ClassifyResponse(BaseModel):
    adapter: str
    version: int
    predictions: list[Prediction]
    usage: Usage


class ErrorBody(BaseModel):
    type: str
    message: str


class ErrorResponse(BaseModel):
    error: ErrorBody
