"""The typed messages between API workers and the engine core (msgspec Structs, MessagePack on the wire).

A worker's DEALER socket sends ``Envelope(id, request)``; the core's ROUTER answers ``Envelope(id, reply)`` on the
same connection. Every request gets exactly one reply (``Failed`` carries an API error as status, type, message
and headers, so the worker raises the same class); ``AdapterChanged`` gets none.

Generation is a stream under one envelope id: ``GenerateRequest`` -> ``Accepted`` (or ``Failed`` /
``VersionMismatch``), then one ``Tokens`` per engine step that gave the request tokens, then ``Finished`` (or
``Failed`` if the engine failed it). The worker may send ``Cancel`` under the same id at any time (a stop string
matched, the client went away, the deadline passed); the core's answer to that is the stream's end.
"""
from __future__ import annotations

import msgspec

from ptserve.server.generation.sequence import SamplingParams


class MetaRequest(msgspec.Struct, tag_field="kind", tag="meta"):
    adapter: str


class EncodeRequest(msgspec.Struct, tag_field="kind", tag="encode"):
    adapter: str | None  # None: the bare backbone
    version: int  # the version the rows were tokenised for
    token_ids: list[list[int]]
    output: str  # engine.LOGITS or engine.EMBEDDING
    tenant: str
    timeout_s: float  # what is left of the request's deadline when it was sent


class Sampling(msgspec.Struct, array_like=True):
    """A choice's ``SamplingParams`` without its stop strings (the worker applies those to the text)."""

    max_new_tokens: int
    temperature: float
    top_k: int
    top_p: float
    seed: int | None
    logprobs: int | None
    prompt_logprobs: int | None


MAX_WIRE_INT = 2**63 - 1


def sampling_message(p: SamplingParams) -> Sampling:
    """``top_k`` past the vocabulary means all tokens, so it is capped to what MessagePack carries."""
    return Sampling(p.max_new_tokens, p.temperature, min(p.top_k, MAX_WIRE_INT), p.top_p, p.seed, p.logprobs,
                    p.prompt_logprobs)


def sampling_params(s: Sampling) -> SamplingParams:
    return SamplingParams(max_new_tokens=s.max_new_tokens, temperature=s.temperature, top_k=s.top_k, top_p=s.top_p,
                          seed=s.seed, logprobs=s.logprobs, prompt_logprobs=s.prompt_logprobs)


class GenerateRequest(msgspec.Struct, tag_field="kind", tag="generate"):
    adapter: str
    version: int  # the version the prompts were tokenised (and their room computed) for
    prompts: list[list[int]]  # one per choice (n choices of a prompt repeat it)
    params: list[Sampling]  # one per choice
    tenant: str


class Cancel(msgspec.Struct, tag_field="kind", tag="cancel"):
    choices: list[int] | None = None  # None: every choice of the stream (sent under its envelope id)


class AdapterChanged(msgspec.Struct, tag_field="kind", tag="changed"):
    adapter: str  # a worker published (or deleted) it: the core drops what it holds of an older version
    version: int | None  # the new version; None: deleted


class HealthRequest(msgspec.Struct, tag_field="kind", tag="health"):
    pass


class CheckRoom(msgspec.Struct, tag_field="kind", tag="room"):
    tenant: str
    rows: int


class Encoded(msgspec.Struct, tag_field="kind", tag="encoded"):
    adapter: str
    version: int
    labels: list[str]
    rows: int
    data: bytes  # float32 little-endian, [rows, width]


class Room(msgspec.Struct, array_like=True):
    """What tokenising a generate adapter's prompts needs (``client.GenerationRoom``)."""

    room: int
    prefix_cap: int
    vocab_size: int
    eos_ids: list[int]


class Meta(msgspec.Struct, tag_field="kind", tag="meta_ok"):
    id: str
    version: int
    task: str
    labels: list[str]
    num_virtual_tokens: int
    generation: Room | None = None  # generate adapters on a decoder backbone


class Accepted(msgspec.Struct, tag_field="kind", tag="accepted"):
    pass


class Logprob(msgspec.Struct, array_like=True):
    token: int
    logprob: float
    top: list[tuple[int, float]]


class Token(msgspec.Struct, array_like=True):
    choice: int
    token: int
    logprob: Logprob | None = None  # when the choice asked for logprobs
    prompt_logprobs: list[Logprob | None] | None = None  # with a choice's first token, when it asked (echo)


class Tokens(msgspec.Struct, tag_field="kind", tag="tokens"):
    step: int  # the engine step that made them
    tokens: list[Token]


class Finished(msgspec.Struct, tag_field="kind", tag="finished"):
    finish_reasons: list[str]  # per choice, as the engine saw it: "stop" (EOS), "length", "cancelled"
    completion_tokens: list[int]


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


Request = MetaRequest | EncodeRequest | AdapterChanged | HealthRequest | CheckRoom | GenerateRequest | Cancel
Reply = Meta | Encoded | Health | Done | Failed | VersionMismatch | Accepted | Tokens | Finished


class Envelope(msgspec.Struct):
    id: int
    body: Request | Reply


encoder = msgspec.msgpack.Encoder()
decoder = msgspec.msgpack.Decoder(Envelope)
