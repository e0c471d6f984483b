"""Tenant API keys, kept beside the adapters in the same store so every replica on that store shares them.

A key reads ``ptk_<key_id>_<secret>``: the key id finds the record, the secret is never stored — only the
sha256 of the whole key, compared in constant time by ``ptserve.server.auth``. The local directory keeps one JSON file
per key under ``ROOT/.keys/`` (a name the adapter listing never takes for a tenant); Redis keeps one hash,
``<prefix>:apikeys``, field key id -> record JSON (``ptserve.adapters_store.redis.api_keys``).
"""
from __future__ import annotations

import abc
import asyncio
import contextlib
import hashlib
import json
import os
import re
import secrets
import tempfile
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable
from urllib.parse import urlparse

from ptserve.adapters_store.errors import StoreUnavailable
from ptserve.adapters_store.ids import check_tenant
from ptserve.client.wire.errors import KeyNotFound  # noqa: F401

KEY_PREFIX = "ptk_"
KEY_ID_RE = re.compile(r"[0-9a-f]{16}")  # always fullmatch: "$" also matches before a final "\n"
_KEY_RE = re.compile(r"ptk_([0-9a-f]{16})_[A-Za-z0-9_-]{20,100}")


@dataclass(frozen=True)
class KeyRecord:
    key_id: str
    tenant: str
    sha256: str  # hex digest of the whole key; the key itself is shown once and never stored
    created_at: str
    name: str = ""

    def public(self) -> dict:
        """What listing shows: everything but the hash."""
        return {k: v for k, v in asdict(self).items() if k != "sha256"}


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()


def key_id_of(key: str) -> str | None:
    """The key id a presented key names, or None when it does not look like a tenant key."""
    m = _KEY_RE.fullmatch(key)
    return m[1] if m else None


def new_key(tenant: str, name: str = "") -> tuple[str, KeyRecord]:
    key_id = secrets.token_hex(8)
    key = f"{KEY_PREFIX}{key_id}_{secrets.token_urlsafe(32)}"
    created = datetime.now(timezone.utc).isoformat(timespec="milliseconds")[:-6] + "Z"
    return key, KeyRecord(key_id, check_tenant(tenant), hash_key(key), created, name)


class KeyStore(abc.ABC):
    """Where tenant keys live. ``get`` is on every authenticated request's path (behind a short cache)."""

    async def create(self, tenant: str, name: str = "") -> tuple[str, KeyRecord]:
        """A new key for ``tenant``: (the key, shown once; its record)."""
        key, record = new_key(tenant, name)
        await self._put(record)
        return key, record

    @abc.abstractmethod
    async def _put(self, record: KeyRecord) -> None: ...

    @abc.abstractmethod
    async def get(self, key_id: str) -> KeyRecord | None: ...

    @abc.abstractmethod
    async def list(self, tenant: str) -> list[KeyRecord]:
        """The tenant's keys, oldest first."""

    @abc.abstractmethod
    async def revoke(self, tenant: str, key_id: str) -> None:
        """Delete the key; ``KeyNotFound`` if the tenant has no such key."""

    async def close(self) -> None:
        return None


class LocalKeyStore(KeyStore):
    def __init__(self, root: str | os.PathLike):
        self.dir = Path(root).resolve() / ".keys"

    async def _put(self, record: KeyRecord) -> None:
        await self._call(self._write, record)

    async def get(self, key_id: str) -> KeyRecord | None:
        if not KEY_ID_RE.fullmatch(key_id):
            return None
        return await self._call(self._read, self.dir / f"{key_id}.json")

    async def list(self, tenant: str) -> list[KeyRecord]:
        check_tenant(tenant)
        return await self._call(self._list, tenant)

    async def revoke(self, tenant: str, key_id: str) -> None:
        record = await self.get(key_id)
        if record is None or record.tenant != tenant:
            raise KeyNotFound(f"tenant {tenant} has no key {key_id}")
        await self._call(self._unlink, self.dir / f"{key_id}.json", tenant, key_id)

    @staticmethod
    async def _call(fn, *args):
        try:
            return await asyncio.to_thread(fn, *args)
        except OSError as e:
            raise StoreUnavailable(f"key store: {e}") from e

    def _write(self, record: KeyRecord) -> None:
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.dir, prefix=".tmp-")  # mode 0600: hashes are still secrets' kin
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(json.dumps(asdict(record)).encode())
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.dir / f"{record.key_id}.json")
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise

    @staticmethod
    def _read(path: Path) -> KeyRecord | None:
        try:
            return KeyRecord(**json.loads(path.read_bytes()))
        except FileNotFoundError:
            return None

    def _list(self, tenant: str) -> list[KeyRecord]:
        with contextlib.suppress(FileNotFoundError):
            records = [r for p in self.dir.glob("*.json") if (r := self._read(p)) and r.tenant == tenant]
            return sorted(records, key=lambda r: (r.created_at, r.key_id))
        return []

    @staticmethod
    def _unlink(path: Path, tenant: str, key_id: str) -> None:
        try:
            os.unlink(path)
        except FileNotFoundError:
            raise KeyNotFound(f"tenant {tenant} has no key {key_id}") from None


def _redis_key_store(url: str) -> KeyStore:
    from ptserve.adapters_store.redis.api_keys import RedisKeyStore

    return RedisKeyStore(url)


_KEY_STORES: dict[str, Callable[[str], KeyStore]] = {
    "file": lambda url: LocalKeyStore(url.removeprefix("file://") if url.startswith("file://")
                                      else url.removeprefix("file:")),
    "redis": _redis_key_store,
    "rediss": _redis_key_store,
}


def open_key_store(url: str) -> KeyStore:
    """The key store that lives beside the adapter store at ``url`` (same directory, same Redis prefix)."""
    scheme = urlparse(url).scheme or "file"
    if scheme not in _KEY_STORES:
        raise ValueError(f"unknown store scheme {scheme!r} in {url!r}; known: {sorted(_KEY_STORES)}")
    return _KEY_STORES[scheme](url)
