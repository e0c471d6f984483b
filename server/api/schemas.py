"""Request and response bodies of the HTTP API (DESIGN's contract), named by role."""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class AdapterPublic(BaseModel):
    id: str
    version: int
    sha256: str
    task: str
    num_virtual_tokens: int
    labels: list[str]
    bytes: int
    created_at: str
    notes: list[str] = Field(default_factory=list, description="Warnings about the upload, e.g. base model name.")


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
