"""Bodies of the OpenAI-compatible ``POST /v1/embeddings``: what the ``openai`` client sends and reads.

Unknown fields are refused (422, naming them), and so are the OpenAI fields ptserve does not implement
(``dimensions``; token-id arrays as ``input``), each with a message that says why.
"""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(
        ..., examples=["minilm"],
        description="An adapter id 'tenant/name' (task embed, or classify: its prefix applies, its head is not "
                    "used), or the backbone's own name (PTSERVE_BACKBONE, e.g. 'minilm') for bare embeddings.",
    )
    input: str | list[str] = Field(
        ..., examples=[["How do I reset my password?", "Refunds take five working days."]],
        description="A text or a list of texts (at most PTSERVE_MAX_INPUTS_PER_REQUEST).",
    )
    encoding_format: Literal["float", "base64"] = Field(
        "float", description="float: lists of numbers; base64: little-endian float32 bytes, base64-encoded."
    )
    dimensions: int | None = Field(None, description="Not supported: embeddings have the backbone's hidden size.")
    user: str | None = Field(None, description="Accepted and ignored (OpenAI's end-user id).")
    truncate: bool = Field(
        False, description="ptserve extension: cut texts that do not fit instead of answering 422 input_too_long."
    )

    @field_validator("input", mode="before")
    @classmethod
    def _texts(cls, v):
        if isinstance(v, list) and any(isinstance(x, (int, list)) and not isinstance(x, bool) for x in v):
            raise ValueError(
                "token-id arrays are not supported: send the text (a string or a list of strings); ptserve "
                "tokenises it with the backbone's own tokenizer"
            )
        if isinstance(v, list) and not v:
            raise ValueError("input must hold at least one text")
        return v

    @field_validator("dimensions")
    @classmethod
    def _no_dimensions(cls, v):
        if v is not None:
            raise ValueError("dimensions is not supported: embeddings have the backbone's hidden size")
        return v


class Embedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str  # str when encoding_format is base64


class EmbeddingUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str
    usage: EmbeddingUsage
