"""What the API asks of the engine, in one interface, and the worker-side stage that uses it for encoder rows.

A request is tokenised by the API against the adapter's metadata (``AdapterMeta``: the prefix length decides how
many input tokens fit), then sent to the engine naming the version it was tokenised for; the engine answers from
exactly that version or raises ``VersionChanged``, and the API tokenises again with fresh metadata once. So an
answer always comes from one whole version, even while uploads run.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import AsyncIterator, Callable, Protocol

import torch

from ptserve.adapters_store.errors import WrongTask
from ptserve.adapters_store.ids import AdapterId
from ptserve.client.wire.errors import AdapterChanged
from ptserve.server.backbone import Backbone
from ptserve.server.engine import tokenize
from ptserve.server.engine_core import messages as m
from ptserve.server.generation.sequence import SamplingParams
from ptserve.server.logs import note


class VersionChanged(Exception):
    """The engine holds another version of the adapter than the request was tokenised for."""

    def __init__(self, adapter: str, asked: int, current: int):
        super().__init__(f"adapter {adapter}: asked for version {asked}, the engine serves {current}")
        self.adapter, self.asked, self.current = adapter, asked, current


@dataclass(frozen=True)
class GenerationRoom:
    """What tokenising a generate adapter's prompts needs of the engine that will continue them."""

    room: int  # prompt + generated tokens that fit in one row beside the adapter's prefix
    prefix_cap: int  # the longest prefix a row holds
    vocab_size: int
    eos_ids: frozenset[int]


@dataclass(frozen=True)
class AdapterMeta:
    """What tokenising and answering need of an adapter (not its tensors)."""

    id: str
    version: int
    task: str
    labels: tuple[str, ...]
    num_virtual_tokens: int
    generation: GenerationRoom | None = None  # generate adapters on a decoder backbone


class TokenStream(Protocol):
    """One generation request's tokens as the engine makes them: ``messages.Tokens`` per engine step, then one
    ``messages.Finished``; an engine failure raises (an ``APIError``)."""

    def __aiter__(self) -> AsyncIterator[m.Tokens | m.Finished]:
        ...

    def cancel(self, choices: list[int]) -> None:
        """Stop generating these choices (their stop string matched); the engine frees their rows next step."""

    async def aclose(self) -> None:
        """Stop every choice still generating (the request ended early); idempotent."""


@dataclass(frozen=True)
class Encoded:
    adapter: str
    version: int
    outputs: torch.Tensor  # [rows, num_labels] logits or [rows, hidden] embeddings, float32 on the cpu
    labels: tuple[str, ...] = ()  # the answered version's labels (classify adapters)


class EngineClient(Protocol):
    """The engine as the routes see it (in process, or an engine core process behind a socket)."""

    @property
    def available(self) -> bool:
        """The engine can take requests now (False while an engine core process is down)."""

    async def adapter_meta(self, adapter_id: AdapterId) -> AdapterMeta:
        """Resolve (and make resident) the current version: AdapterNotFound, StoreUnavailable, ..."""

    async def encode(
        self, adapter_id: AdapterId | None, version: int, token_ids: list[tuple[int, ...]], output: str,
        tenant: str, timeout_s: float,
    ) -> Encoded:
        """Rows of one request (``adapter_id`` None: the bare backbone) in the engine's shared passes, answered
        from ``version`` exactly (else ``VersionChanged``); ``DeadlineExceeded`` after ``timeout_s``."""

    async def generate(
        self, adapter_id: AdapterId, version: int, prompts: list[list[int]], params: list[SamplingParams],
        tenant: str,
    ) -> TokenStream:
        """Queue one request's choices (``prompts[k]`` under ``params[k]``; stop strings are the caller's) on
        the generation engine, answered from ``version`` exactly (else ``VersionChanged``); ``QueueFull``,
        ``InputTooLong`` before any token. The adapter's lease is the engine's until it released every choice."""

    def check_room(self, tenant: str, rows: int) -> None:
        """``QueueFull`` now if the queue has no room (a cheap early refusal; the engine checks again)."""

    def adapter_changed(self, adapter_id: AdapterId, version: int | None = None) -> None:
        """This API published ``version`` of ``adapter_id`` (None: deleted it): drop what is held of older ones."""

    async def health(self) -> dict:
        """The engine's facts for ``/readyz`` (device, dtype, threads, resident adapters, planner)."""

    @property
    def idle(self) -> bool:
        """Nothing queued or running on behalf of this API (what a draining server waits for)."""


async def encode_texts(
    client: EngineClient, bb: Backbone, adapter_id: AdapterId | None, texts: list[str], truncate: bool,
    output: str, tenant: str, timeout_s: float, tasks: tuple[str, ...], wrong_task: Callable[[AdapterMeta], str],
) -> tuple[Encoded, list[tuple[int, ...]]]:
    """The API's stage for encoder rows: metadata, tokenise, encode; once more with fresh metadata when the
    adapter's version changed in between. ``tasks``: the adapter tasks this route serves (else ``wrong_task``)."""
    for attempt in range(2):
        prefix_len, version = 0, 0
        if adapter_id is not None:
            meta = await client.adapter_meta(adapter_id)
            if meta.task not in tasks:
                raise WrongTask(wrong_task(meta))
            prefix_len, version = meta.num_virtual_tokens, meta.version
        token_ids = tokenize(bb, texts, prefix_len, truncate)
        try:
            encoded = await client.encode(adapter_id, version, token_ids, output, tenant, timeout_s)
            if adapter_id is not None:
                note(adapter=encoded.adapter, version=encoded.version)  # for the request's access-log line
            return encoded, token_ids
        except VersionChanged as exc:
            if attempt:
                raise AdapterChanged(f"{exc}; it changed again while the request was served, retry") from None
    raise AssertionError("unreachable")
