"""Bodies of the OpenAI-compatible API: ``/v1/completions``, ``/v1/chat/completions`` and ``/v1/models``.

Requests forbid unknown fields, like every ptserve route. OpenAI fields ptserve does not implement are named in
one table per route: leaving them out, null, or at OpenAI's own default (a no-op) is accepted; anything else
answers 422 naming the field, so a client never silently gets something other than what it asked for.
"""
from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ptserve.server.api.schemas_generate import TEMPERATURE_HELP, TOP_P_HELP, GenerateUsage, _check_stops

MAX_PROMPT_CHARS, MAX_TOP_LOGPROBS, MAX_N = 100_000, 20, 128
ADAPTER_EXAMPLE = "acme/support-bot"


def refuse_unsupported(data: Any, unsupported: dict[str, tuple], route: str) -> Any:
    """Drop the unsupported fields set to a no-op (null or OpenAI's default); refuse the others by name."""
    if not isinstance(data, dict):
        return data
    named = [k for k, no_op in unsupported.items() if k in data and data[k] is not None and data[k] not in no_op]
    if named:
        hints = "; ".join(
            f"{k} (leave it out{''.join(f', or {v!r}' for v in unsupported[k])})" for k in named
        )
        raise ValueError(f"not supported by ptserve's {route}: {hints}")
    return {k: v for k, v in data.items() if k not in unsupported}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamOptions(_Strict):
    include_usage: bool | None = Field(False, description="Send a last chunk with the usage (and no choices).")


def _stops(v):
    return _check_stops([v] if isinstance(v, str) else list(v or []))


class _Sampling(_Strict):
    """Fields both OpenAI generation routes share."""

    model: str = Field(..., description="Adapter id, 'tenant/name'.", examples=[ADAPTER_EXAMPLE])
    temperature: float | None = Field(1.0, ge=0, le=2, description=TEMPERATURE_HELP)
    top_p: float | None = Field(1.0, gt=0, le=1, description=TOP_P_HELP)
    n: int | None = Field(1, ge=1, le=MAX_N, description="Choices per prompt.")
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, le=2**63 - 1, description=(
        "Choice j of each prompt samples with seed j = 0: this seed, j > 0: a seed derived from it "
        "(docs/design.md), so every choice is reproducible and the choices differ."))
    user: str | None = Field(None, max_length=256, description="Accepted, not used.")

    _stop = field_validator("stop")(classmethod(lambda cls, v: _stops(v)))

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)


# --- /v1/completions -------------------------------------------------------------------------------------------
TokenIds = Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]
PromptText = Annotated[str, Field(max_length=MAX_PROMPT_CHARS)]
COMPLETION_UNSUPPORTED = {"suffix": (), "best_of": (1,), "presence_penalty": (0,), "frequency_penalty": (0,),
                          "logit_bias": ({},)}


class CompletionRequest(_Sampling):
    prompt: PromptText | list[PromptText] | TokenIds | list[TokenIds] = Field(
        ..., description="A prompt, a list of prompts (one choice each, n per prompt), token ids, or lists of them.",
        examples=["Hello"])
    max_tokens: int | None = Field(16, ge=1)
    echo: bool | None = Field(False, description="Prepend the prompt to each choice's text (and, with logprobs, "
                                                 "score its tokens: the first one's logprob is null).")
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS, description=(
        "Return each token's logprob and the logprobs most likely tokens at its position."))

    @model_validator(mode="before")
    @classmethod
    def _unsupported(cls, data):
        return refuse_unsupported(data, COMPLETION_UNSUPPORTED, "/v1/completions")

    @field_validator("prompt")
    @classmethod
    def _some_prompt(cls, v):
        if isinstance(v, list) and not v:
            raise ValueError("at least one prompt")
        return v

    def prompts(self) -> list[str | list[int]]:
        """Each prompt of the request: text, or token ids."""
        p = self.prompt
        if isinstance(p, str) or (p and isinstance(p[0], int)):
            return [p]
        return list(p)


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: GenerateUsage


# --- /v1/chat/completions --------------------------------------------------------------------------------------
CHAT_UNSUPPORTED = {
    "tools": (), "tool_choice": ("none",), "functions": (), "function_call": ("none",),
    "parallel_tool_calls": (True,), "response_format": ({"type": "text"},), "presence_penalty": (0,),
    "frequency_penalty": (0,), "logit_bias": ({},), "audio": (), "modalities": (["text"],), "prediction": (),
    "reasoning_effort": (), "web_search_options": (), "store": (False,), "metadata": (),
    "service_tier": ("auto",),
}


class TextPart(_Strict):
    type: Literal["text"]
    text: PromptText


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"] = Field(
        ..., description="'developer' is rendered as 'system' (OpenAI's newer name for it).")
    content: PromptText | list[TextPart] = Field(..., description="Text, or text parts (joined by newlines).")
    name: str | None = Field(None, max_length=256)

    @field_validator("content", mode="before")
    @classmethod
    def _text_parts_only(cls, v):
        if isinstance(v, list):
            kinds = sorted({str(p.get("type")) for p in v if isinstance(p, dict) and p.get("type") != "text"})
            if kinds:
                raise ValueError(f"content parts of type {kinds} are not supported: text only")
        return v

    def for_template(self) -> dict:
        text = self.content if isinstance(self.content, str) else "\n".join(p.text for p in self.content)
        message = {"role": "system" if self.role == "developer" else self.role, "content": text}
        if self.name is not None:
            message["name"] = self.name
        return message


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(..., min_length=1, examples=[[{"role": "user", "content": "Hello"}]])
    max_completion_tokens: int | None = Field(None, ge=1, description="Default: as many as fit.")
    max_tokens: int | None = Field(None, ge=1, description="Older name of max_completion_tokens.")
    logprobs: bool | None = Field(False, description="Return each output token's logprob.")
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS, description="Also its most likely rivals "
                                                                                   "(needs logprobs).")

    @model_validator(mode="before")
    @classmethod
    def _unsupported(cls, data):
        return refuse_unsupported(data, CHAT_UNSUPPORTED, "/v1/chat/completions")

    @model_validator(mode="after")
    def _top_needs_logprobs(self):
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        return self

    @property
    def max_new_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class ChatTopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class ChatTokenLogprob(ChatTopLogprob):
    top_logprobs: list[ChatTopLogprob]


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None
    refusal: None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str
    refusal: None = None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: GenerateUsage
    system_fingerprint: str | None = None


# --- /v1/models ------------------------------------------------------------------------------------------------
class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str
    parent: str | None = None
    root: str | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
