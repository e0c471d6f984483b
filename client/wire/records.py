"""Records that cross the wire, as plain dataclasses (no pydantic: the client stays light; FastAPI takes
dataclasses as response models). ``AdapterInfo`` is the one record of an adapter version: the stores keep it,
the API answers it, the client returns it.

A record read by ``from_json`` keeps the JSON object it came from in ``raw`` (not a field: it is neither in
the OpenAPI schema nor in ``to_json``), so fields a newer server adds are never lost.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any


class Record:
    """Base of the wire records (dataclasses). A field whose ``metadata`` names ``{"of": SomeRecord}`` holds a
    list of those records."""

    @classmethod
    def from_json(cls, data: dict[str, Any], **values: Any):
        """The record of a JSON object: the fields it knows (unknown keys stay in ``raw``), ``values`` over
        them."""
        for f in fields(cls):
            if f.name in data and f.name not in values:
                of = f.metadata.get("of")
                values[f.name] = [of.from_json(x) for x in data[f.name]] if of else data[f.name]
        record = cls(**values)
        object.__setattr__(record, "_raw", data)  # records may be frozen; raw is not a field
        return record

    @property
    def raw(self) -> dict[str, Any]:
        """The JSON this record was read from (its own JSON when it was built in this process)."""
        raw = self.__dict__.get("_raw")
        return raw if raw is not None else self.to_json()

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def items(of: type[Record]) -> dict[str, Any]:
    """Field metadata: the field is a list of ``of`` records."""
    return {"of": of}


@dataclass(frozen=True)
class AdapterInfo(Record):
    """One stored version of an adapter: what ``PUT``/``GET /v1/adapters/...`` answer."""

    id: str
    version: int
    sha256: str
    task: str
    num_virtual_tokens: int
    labels: list[str]
    bytes: int
    created_at: str  # ISO 8601, UTC
    # metadata "description": what pydantic (FastAPI) writes into the OpenAPI document for the field
    notes: list[str] = field(
        default_factory=list, metadata={"description": "Warnings about the upload, e.g. base model name."}
    )


@dataclass(frozen=True)
class AdapterPage(Record):
    """One page of ``GET /v1/adapters``: pass ``next_cursor`` back for the next (None: the last page)."""

    data: list[AdapterInfo] = field(default_factory=list, metadata=items(AdapterInfo))
    next_cursor: str | None = None
