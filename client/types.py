"""Typed results of the API as the client reads them. Each keeps the JSON it came from in ``raw``, so fields a
newer server adds are never lost; the typed fields are those of DESIGN's API contract. ``AdapterInfo`` and
``AdapterPage`` are the wire's records (the server answers with the same classes)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from ptserve.client.wire.records import AdapterInfo, AdapterPage, Record, items  # noqa: F401  (public here)


@dataclass
class Prediction(Record):
    label: str
    score: float
    scores: dict[str, float]
    logits: list[float] | None = None


@dataclass
class ClassifyResult(Record):
    adapter: str
    version: int
    predictions: list[Prediction] = field(default_factory=list, metadata=items(Prediction))
    usage: dict[str, int] = field(default_factory=dict)


@dataclass
class GenerateResult(Record):
    adapter: str
    version: int
    text: str
    finish_reason: str | None
    usage: dict[str, int] = field(default_factory=dict)


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
class CompletionChoice(Record):
    text: str
    index: int = 0
    finish_reason: str | None = None
    logprobs: Any = None


@dataclass
class Completion(Record):
    """OpenAI ``text_completion`` object."""

    id: str
    model: str
    choices: list[CompletionChoice] = field(default_factory=list, metadata=items(CompletionChoice))
    usage: dict[str, int] = field(default_factory=dict)
    created: int | None = None
    object: str = "text_completion"


@dataclass
class Model(Record):
    """OpenAI ``model`` object (``id`` = adapter id)."""

    id: str
    object: str = "model"
    created: int | None = None
    owned_by: str | None = None
    parent: str | None = None


@dataclass
class CreatedKey(Record):
    """A new tenant key: ``key`` is shown this once; the server stores only its hash."""

    key: str
    tenant: str | None = None
    id: str | None = None

    @classmethod
    def from_json(cls, data: dict, tenant: str | None = None) -> "CreatedKey":
        return super().from_json(data, tenant=data.get("tenant", tenant), id=_key_id(data))


@dataclass
class KeyInfo(Record):
    """A listed key (never the secret itself)."""

    id: str
    tenant: str | None = None
    created_at: str | None = None
    revoked: bool | None = None

    @classmethod
    def from_json(cls, data: dict, tenant: str | None = None) -> "KeyInfo":
        return super().from_json(data, id=_key_id(data) or "", tenant=data.get("tenant", tenant))

    def describe(self) -> str:
        return json.dumps(self.raw, sort_keys=True)


def _key_id(data: dict) -> str | None:
    for name in ("id", "key_id", "prefix", "key_prefix", "sha256_prefix", "hash_prefix"):
        if data.get(name):
            return str(data[name])
    return None
