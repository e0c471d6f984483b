"""Bodies of ptserve's own generation API, ``/v1/generate`` (the OpenAI-compatible ones: ``schemas_openai``)."""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from ptserve.server.generation.sampling import MIN_TEMPERATURE

MAX_STOPS, MAX_STOP_CHARS = 8, 64
TEMPERATURE_HELP = f"0 = greedy; 0 < t < {MIN_TEMPERATURE} counts as {MIN_TEMPERATURE} (sampling's floor)."
TOP_P_HELP = "Nucleus mass; the most likely token is always kept."


def _check_stops(v: list[str]) -> list[str]:
    if len(v) > MAX_STOPS or any(not s or len(s) > MAX_STOP_CHARS for s in v):
        raise ValueError(f"at most {MAX_STOPS} stop strings of 1..{MAX_STOP_CHARS} characters")
    return v


class GenerateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    adapter: str = Field(..., description="Adapter id, 'tenant/name'.", examples=["acme/support-bot"])
    prompt: str = Field(..., max_length=100_000)
    max_new_tokens: int = Field(64, ge=1)
    temperature: float = Field(1.0, ge=0, le=10, description=TEMPERATURE_HELP)
    top_p: float = Field(1.0, gt=0, le=1, description=TOP_P_HELP)
    top_k: int = Field(0, ge=0, description="0 = off; more than the vocabulary = all tokens.")
    seed: int | None = Field(None, ge=0, le=2**63 - 1, description="Same seed, same text, whatever the batch.")
    stop: list[str] = Field(default_factory=list)
    stream: bool = Field(False, description="Answer with server-sent events.")

    _stops = field_validator("stop")(classmethod(lambda cls, v: _check_stops(v)))


class GenerateUsage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class GenerateResponse(BaseModel):
    adapter: str
    version: int
    text: str
    finish_reason: Literal["stop", "length"]
    usage: GenerateUsage
