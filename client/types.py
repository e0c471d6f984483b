"""Typed results of the API. Each keeps the JSON it came from in ``raw``, so fields a newer server adds are
never lost; the typed fields are those of DESIGN's API contract."""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from typing import Any


def _build(cls, data: dict[str, Any], **overrides):
    known = {f.name for f in fields(cls)} - {"raw"}
    values = {k: v for k, v in data.items() if k in known}
    values.update(overrides)
    return cls(**values, raw=data)


@dataclass
class AdapterInfo:
    id: str
    version: int
    sha256: str
    task: str
    num_virtual_tokens: int
    labels: list[str]
    bytes: int
    created_at: str
    notes: list[str] = field(default_factory=list)
    raw: dict = field(default_factory=dict, repr=False)

    @classmethod
    def from_json(cls, data: dict) -> "AdapterInfo":
        return _build(cls, data)


@dataclass
class AdapterPage:
    data: list[AdapterInfo]
    next_cursor: str | None = None
    raw: dict = field(default_factory=dict, repr=False)

    @classmethod
    def from_json(cls, data: dict) -> "AdapterPage":
        return cls([AdapterInfo.from_json(x) for x in data.get("data", [])], data.get("next_cursor"), data)


@dataclass
class Prediction:
    label: str
    score: float
    scores: dict[str, float]
    logits: list[float] | None = None
    raw: dict = field(default_factory=dict, repr=False)

    @classmethod
    def from_json(cls, data: dict) -> "Prediction":
        return _build(cls, data)


@dataclass
class ClassifyResult:
    adapter: str
    version: int
    predictions: list[Prediction]
    usage: dict[str, int]
    raw: dict = field(default_factory=dict, repr=False)

    @classmethod
    def from_json(cls, data: dict) -> "ClassifyResult":
        return _build(
            cls,
            data,
            predictions=[Prediction.from_json(p) for p in data.get("predictions", [])],
            usage=data.get("usage") or {},
        )


@dataclass
class GenerateResult:
    adapter: str
    version: int
    text: str
    finish_reason: str | None
    usage: dict[str, int]
    raw: dict = field(default_factory=dict, repr=False)

    @classmethod
    def from_json(cls, data: dict) -> "GenerateResult":
        return _build(cls, data, usage=data.get("usage") or {})


@dataclass
class StreamEvent:
    """One server-sent event of a streamed generation: ``event`` is the SSE event name (None if unnamed),
    ``data`` the decoded JSON payload."""

    event: str | None
    data: dict
    raw: str = field(default="", repr=False)

    @property
    def text(self) -> str:
        """The text this event adds (``text`` of /v1/generate, ``choices[0].text`` of /v1/completions)."""
        if isinstance(self.data.get("choices"), list) and self.data["choices"]:
            return str(self.data["choices"][0].get("text") or "")
        for name in ("text", "delta"):  # never "token": that is the token id
            if name in self.data:
                return str(self.data[name] or "")
        return ""

    @property
    def finish_reason(self) -> str | None:
        if isinstance(self.data.get("choices"), list) and self.data["choices"]:
            return self.data["choices"][0].get("finish_reason")
        return self.data.get("finish_reason")


@dataclass
class CompletionChoice:
    text: str
    index: int = 0
    finish_reason: str | None = None
    logprobs: Any = None
    raw: dict = field(default_factory=dict, repr=False)

    @classmethod
    def from_json(cls, data: dict) -> "CompletionChoice":
        return _build(cls, data)


@dataclass
class Completion:
    """OpenAI ``text_completion`` object."""

    id: str
    model: str
    choices: list[CompletionChoice]
    usage: dict[str, int] = field(default_factory=dict)
    created: int | None = None
    object: str = "text_completion"
    raw: dict = field(default_factory=dict, repr=False)

    @classmethod
    def from_json(cls, data: dict) -> "Completion":
        return _build(
            cls,
            data,
            choices=[CompletionChoice.from_json(c) for c in data.get("choices", [])],
            usage=data.get("usage") or {},
        )


@dataclass
class Model:
    """OpenAI ``model`` object (``id`` = adapter id)."""

    id: str
    object: str = "model"
    created: int | None = None
    owned_by: str | None = None
    parent: str | None = None
    raw: dict = field(default_factory=dict, repr=False)

    @classmethod
    def from_json(cls, data: dict) -> "Model":
        return _build(cls, data)


@dataclass
class CreatedKey:
    """A new tenant key: ``key`` is shown this once; the server stores only its hash."""

    key: str
    tenant: str | None = None
    id: str | None = None
    raw: dict = field(default_factory=dict, repr=False)

    @classmethod
    def from_json(cls, data: dict, tenant: str | None = None) -> "CreatedKey":
        return _build(cls, data, tenant=data.get("tenant", tenant), id=_key_id(data))


@dataclass
class KeyInfo:
    """A listed key (never the secret itself)."""

    id: str
    tenant: str | None = None
    created_at: str | None = None
    revoked: bool | None = None
    raw: dict = field(default_factory=dict, repr=False)

    @classmethod
    def from_json(cls, data: dict, tenant: str | None = None) -> "KeyInfo":
        return _build(cls, data, id=_key_id(data) or "", tenant=data.get("tenant", tenant))

    def describe(self) -> str:
        return json.dumps(self.raw, sort_keys=True)


def _key_id(data: dict) -> str | None:
    for name in ("id", "key_id", "prefix", "key_prefix", "sha256_prefix", "hash_prefix"):
        if data.get(name):
            return str(data[name])
    return None
