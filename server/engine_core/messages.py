"""The typed messages between API workers and the engine core (msgspec Structs, MessagePack on the wire).

A worker's DEALER socket sends ``Envelope(id, request)``; the core's ROUTER answers ``Envelope(id, reply)`` on the
same connection. Every request gets exactly one reply (``Failed`` carries an API error as status, type, message
and headers, so the worker raises the same class); ``AdapterChanged`` gets none.
"""
from __future__ import annotations

import msgspec


class MetaRequest(msgspec.Struct, tag_field="kind", tag="meta"):
    adapter: str


class EncodeRequest(msgspec.Struct, tag_field="kind", tag="encode"):
    adapter: str | None  # None: the bare backbone
    version: int  # the version the rows were tokenised for
    token_ids: list[list[int]]
    output: str  # engine.LOGITS or engine.EMBEDDING
    tenant: str
    timeout_s: float  # what is left of the request's deadline when it was sent


class AdapterChanged(msgspec.Struct, tag_field="kind", tag="changed"):
    adapter: str  # a worker published (or deleted) it: the core drops what it holds of an older version
    version: int | None  # the new version; None: deleted


class HealthRequest(msgspec.Struct, tag_field="kind", tag="health"):
    pass


class CheckRoom(msgspec.Struct, tag_field="kind", tag="room"):
    tenant: str
    rows: int


class Meta(msgspec.Struct, tag_field="kind", tag="meta_ok"):
    id: str
    version: int
    task: str
    labels: list[str]
    num_virtual_tokens: int


class Encoded(msgspec.Struct, tag_field="kind", tag="encoded"):
    adapter: str
    version: int
    labels: list[str]
    rows: int
    data: bytes  # float32 little-endian, [rows, width]


class Health(msgspec.Struct, tag_field="kind", tag="health_ok"):
    facts: dict


class Done(msgspec.Struct, tag_field="kind", tag="done"):
    pass


class Failed(msgspec.Struct, tag_field="kind", tag="failed"):
    status: int
    type: str
    message: str
    headers: dict[str, str] = {}


class VersionMismatch(msgspec.Struct, tag_field="kind", tag="version"):
    adapter: str
    asked: int
    current: int


Request = MetaRequest | EncodeRequest | AdapterChanged | HealthRequest | CheckRoom
Reply = Meta | Encoded | Health | Done | Failed | VersionMismatch


class Envelope(msgspec.Struct):
    id: int
    body: Request | Reply


encoder = msgspec.msgpack.Encoder()
decoder = msgspec.msgpack.Decoder(Envelope)
