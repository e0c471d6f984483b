"""The store interface: versioned, checksummed adapter blobs behind one async API, opened from a URL.

A store knows bytes and the few facts the API lists (``AdapterInfo``, the wire record the API answers too); it
never parses tensors. Validation happens before ``put`` (``ptserve.adapters_store.validation``), so a store
only ever holds blobs that decoded cleanly.
"""
from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Awaitable, Callable, Iterable
from urllib.parse import urlparse

from ptserve.adapters_store.errors import AdapterNotFound
from ptserve.adapters_store.ids import AdapterId
from ptserve.client.wire.records import AdapterInfo


@dataclass(frozen=True)
class AdapterMeta:
    """What the caller knows about a blob it puts (read off the decoded adapter)."""

    task: str
    num_virtual_tokens: int
    labels: tuple[str, ...] = ()


@dataclass
class Page:
    items: list[AdapterInfo] = field(default_factory=list)
    next_cursor: str | None = None


class AdapterStore(abc.ABC):
    """Async store of adapter blobs. Versions per adapter increase monotonically, also across deletes."""

    url: str

    @abc.abstractmethod
    async def put(self, adapter_id: AdapterId, blob: bytes, meta: AdapterMeta) -> AdapterInfo:
        """Store ``blob`` as the adapter's next version and make it current atomically."""

    @abc.abstractmethod
    async def get_info(self, adapter_id: AdapterId) -> AdapterInfo:
        """Info of the current version; ``AdapterNotFound`` if there is none."""

    @abc.abstractmethod
    async def get_blob(self, adapter_id: AdapterId, version: int | None = None) -> tuple[AdapterInfo, bytes]:
        """The current (or given) version's info and bytes, sha256-checked (``IntegrityError``)."""

    @abc.abstractmethod
    async def list(self, tenant: str | None = None, cursor: str | None = None, limit: int = 100) -> Page:
        """Current versions ordered by id, ``limit`` at a time; pass ``next_cursor`` back for the next page."""

    @abc.abstractmethod
    async def delete(self, adapter_id: AdapterId) -> None:
        """Remove every version; ``AdapterNotFound`` if there is none."""

    async def versions(self, ids: Iterable[AdapterId]) -> dict[AdapterId, int | None]:
        """Each adapter's current version (None: it has none), e.g. to re-check cached copies on resync."""
        out: dict[AdapterId, int | None] = {}
        for adapter_id in ids:
            try:
                out[adapter_id] = (await self.get_info(adapter_id)).version
            except AdapterNotFound:
                out[adapter_id] = None
        return out

    async def watch(
        self,
        on_event: Callable[[AdapterId, int | None], Awaitable[None] | None],
        on_resync: Callable[[], Awaitable[None] | None],
    ) -> None:
        """Follow changes made through other processes, as a long-lived task: ``on_event(id, version)`` per
        put (version None: deleted), ``on_resync()`` after every (re)connect. A store without a change feed
        (the local directory) returns at once."""
        return None

    async def ping(self) -> None:
        """Raise ``StoreUnavailable`` if the store cannot be reached."""

    async def close(self) -> None:
        return None


_STORES: dict[str, Callable[[str], AdapterStore]] = {}


def register_store(scheme: str):
    def deco(factory: Callable[[str], AdapterStore]):
        _STORES[scheme] = factory
        return factory

    return deco


def open_store(url: str) -> AdapterStore:
    """``file://PATH`` (embedded default) or ``redis://HOST:PORT/DB``; a bare path means ``file://``."""
    import ptserve.adapters_store.local  # noqa: F401  (registers "file")

    scheme = urlparse(url).scheme or "file"
    if scheme in ("redis", "rediss"):
        import ptserve.adapters_store.redis.store  # noqa: F401  (registers "redis", "rediss")
    if scheme not in _STORES:
        raise ValueError(f"unknown store scheme {scheme!r} in {url!r}; known: {sorted(_STORES)}")
    return _STORES[scheme](url)
