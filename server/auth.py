"""Who is calling and what they may touch: the admin key, tenant keys (``ptserve.adapters_store.keys``) and the rule that
a tenant key reaches only ``its-tenant/*``. FastAPI-free; the dependencies that use it live in ``ptserve.server.api.deps``.

Another tenant's adapter answers exactly like a missing one (404 ``adapter_not_found``), so a key never learns
whether a name exists elsewhere. Keys are compared as sha256 digests with ``hmac.compare_digest``.
"""
from __future__ import annotations

import hmac
import logging
import time
from dataclasses import dataclass

from ptserve.adapters_store.errors import AdapterNotFound, StoreUnavailable
from ptserve.adapters_store.ids import AdapterId
from ptserve.adapters_store.keys import KeyRecord, KeyStore, hash_key, key_id_of
from ptserve.client.wire.errors import Forbidden, Unauthorized  # noqa: F401  (raised here, defined for both sides)
from ptserve.server.logs import note

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Identity:
    """The caller. ``tenant`` is None for the admin (and for everyone on an open server)."""

    kind: str  # "admin" | "tenant" | "open"
    tenant: str | None = None
    key_id: str | None = None

    @property
    def is_admin(self) -> bool:
        return self.kind in ("admin", "open")

    def may_use(self, tenant: str) -> bool:
        return self.is_admin or self.tenant == tenant

    @property
    def log_name(self) -> str:
        """What the access log records as the caller."""
        return self.tenant if self.kind == "tenant" else self.kind


OPEN = Identity("open")
ADMIN = Identity("admin")


def authorize(principal: Identity, adapter: AdapterId | str) -> AdapterId:
    """The adapter id, parsed, if ``principal`` may use it; else the same 404 a missing adapter gets."""
    adapter_id = adapter if isinstance(adapter, AdapterId) else AdapterId.parse(adapter)
    note(adapter=str(adapter_id))
    if not principal.may_use(adapter_id.tenant):
        raise AdapterNotFound(f"adapter {adapter_id} not found")
    return adapter_id


def authorize_tenant(principal: Identity, tenant: str) -> None:
    """For acts on a whole tenant (upload into it, list it): a tenant key may act only on its own."""
    if not principal.may_use(tenant):
        raise Forbidden(f"this key belongs to tenant {principal.tenant!r}; it may not act on tenant {tenant!r}")


def require_admin(principal: Identity) -> Identity:
    if not principal.is_admin:
        raise Forbidden("this needs the admin key")
    return principal


class Authenticator:
    """Turns an ``Authorization`` header into an ``Identity``.

    Key records are cached for ``ttl_s`` (positive and negative answers alike), so a key revoked through any
    replica stops working on every replica within ``ttl_s``. While the store is unreachable a key seen before
    keeps its last known record (serving goes on from resident adapters); an unseen key gets 503.
    """

    def __init__(self, admin_key: str | None, keys: KeyStore | None, ttl_s: float = 0.5):
        self._admin_digest = hash_key(admin_key) if admin_key else None
        self.keys, self.ttl_s = keys, ttl_s
        self._cache: dict[str, tuple[float, KeyRecord | None]] = {}

    @property
    def open(self) -> bool:
        return self._admin_digest is None

    async def authenticate(self, authorization: str | None) -> Identity:
        if self.open:
            return OPEN
        key = _bearer(authorization)
        digest = hash_key(key)
        if hmac.compare_digest(digest, self._admin_digest):
            return ADMIN
        key_id = key_id_of(key)
        record = await self._record(key_id) if key_id and self.keys else None
        if record is None or not hmac.compare_digest(digest, record.sha256):
            raise Unauthorized("unknown or revoked API key", invalid=True)
        return Identity("tenant", record.tenant, record.key_id)

    async def _record(self, key_id: str) -> KeyRecord | None:
        now = time.monotonic()
        cached = self._cache.get(key_id)
        if cached is not None and now - cached[0] < self.ttl_s:
            return cached[1]
        try:
            record = await self.keys.get(key_id)
        except StoreUnavailable:
            if cached is not None and cached[1] is not None:
                log.warning("key store unreachable; using the last known record of key %s", key_id)
                return cached[1]
            raise
        if len(self._cache) > 100_000:  # bounded: forget everything rather than grow without end
            self._cache.clear()
        self._cache[key_id] = (now, record)
        return record

    def forget(self, key_id: str) -> None:
        """Revoked through this replica: stop honouring it here at once."""
        self._cache.pop(key_id, None)


def _bearer(authorization: str | None) -> str:
    if not authorization:
        raise Unauthorized("missing API key: send 'Authorization: Bearer <key>'")
    scheme, _, key = authorization.partition(" ")
    key = key.strip()
    if scheme.lower() != "bearer" or not key:
        raise Unauthorized("malformed Authorization header: send 'Authorization: Bearer <key>'", invalid=True)
    return key
