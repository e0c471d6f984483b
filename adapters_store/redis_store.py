"""The shared adapter store: versioned blobs in Redis, published by Lua scripts, with a pub/sub change feed.

Per adapter, under ``<prefix>:{<tenant>/<name>}`` (braces: a cluster hash tag, so one adapter's keys share a
slot and one script may touch them all): ``:cur`` (current version's info JSON), ``:blob:<N>``, ``:info:<N>``,
``:versions`` (set of live N) and ``:next`` (INCR counter; survives deletes, so versions stay monotonic).
A superseded version expires ``gc_grace_s`` after the put that replaced it, so requests that resolved it just
before can finish. Puts and deletes are announced on ``<prefix>:events``.

Per tenant, ``<prefix>:idx:{<tenant>}`` is a sorted set of its adapter names (all scores 0, read in name order
with ZRANGE BYLEX), so listing one tenant costs its page, not a SCAN of every tenant's keys. It lives in another
slot than the adapters' keys, so it cannot be updated inside their scripts; it is kept a superset of the live
adapters instead (see ``_unindex``), and names of adapters that are gone are skipped and cleaned when listed.
``<prefix>:idx-ready`` marks a store whose adapters written before the index existed have been added to it.
"""
from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import inspect
import json
import logging
import re
from datetime import datetime, timezone
from typing import Awaitable, Callable, Iterable
from urllib.parse import parse_qsl, urlencode, urlsplit

import redis.asyncio
import redis.exceptions as rex
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from ptserve.adapters_store.errors import (
    AdapterNotFound, IntegrityError, InvalidAdapterId, InvalidInput, StoreUnavailable,
)
from ptserve.adapters_store.ids import NAME_RE, AdapterId, check_tenant
from ptserve.adapters_store.store import AdapterInfo, AdapterMeta, AdapterStore, Page, register_store

log = logging.getLogger(__name__)

CUR, NEXT, VERSIONS, BLOB, INFO = ":cur", ":next", ":versions", ":blob:", ":info:"  # after "<prefix>:{<id>}"
EVENTS = ":events"  # after "<prefix>": the change-feed channel
IDX, IDX_READY = ":idx:", ":idx-ready"  # after "<prefix>": a tenant's index (then "{<tenant>}"), its marker
DEFAULTS = {"prefix": "ptserve", "timeout_s": 1.0, "gc_grace_s": 60.0, "health_check_interval": 10.0}
BACKOFF_MIN_S, BACKOFF_MAX_S = 0.1, 2.0
_PREFIX_RE = re.compile(r"[A-Za-z0-9_.:-]{1,64}")  # no glob specials and no braces (they'd break hash tags)
_BIG = 1 << 20  # hash blobs above this size off the event loop

# Publish one version. KEYS: cur, next, versions. ARGV: key base, blob, info JSON lacking its opening '{'
# and "version" (allocated here, so the script completes the JSON), grace in ms, channel, id. One script: no
# reader can see cur naming a missing blob. The previous version expires after the grace; expired members
# of the versions set are pruned.
PUBLISH_LUA = """
local base = ARGV[1]
local n = redis.call('INCR', KEYS[2])
local info = '{"version": ' .. n .. ', ' .. ARGV[3]
local prev = redis.call('GET', KEYS[1])
redis.call('SET', base .. ':blob:' .. n, ARGV[2])
redis.call('SET', base .. ':info:' .. n, info)
redis.call('SET', KEYS[1], info)
redis.call('SADD', KEYS[3], n)
if prev then
  local p = cjson.decode(prev).version
  for _, k in ipairs({base .. ':blob:' .. p, base .. ':info:' .. p}) do
    if tonumber(ARGV[4]) > 0 then redis.call('PEXPIRE', k, ARGV[4]) else redis.call('DEL', k) end
  end
end
for _, m in ipairs(redis.call('SMEMBERS', KEYS[3])) do
  if redis.call('EXISTS', base .. ':info:' .. m) == 0 then redis.call('SREM', KEYS[3], m) end
end
redis.call('PUBLISH', ARGV[5], cjson.encode({op = 'put', id = ARGV[6], version = n}))
return info
"""


# Read info and blob of the current version (ARGV[2] == '') or of version ARGV[2], in one atomic step: the
# fallback of a two-GET read that lost its blob between the two (see ``get_blob``).
# KEYS: cur. ARGV: key base, version. Returns nil (no such info) or {info, blob or false}.
READ_LUA = """
local base, v = ARGV[1], ARGV[2]
local info
if v == '' then info = redis.call('GET', KEYS[1]) else info = redis.call('GET', base .. ':info:' .. v) end
if not info then return nil end
if v == '' then v = cjson.decode(info).version end
return {info, redis.call('GET', base .. ':blob:' .. v)}
"""

# Delete every version (the counter stays) and announce it. KEYS: cur, versions. ARGV: key base, channel, id.
DELETE_LUA = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local base = ARGV[1]
for _, m in ipairs(redis.call('SMEMBERS', KEYS[2])) do
  redis.call('DEL', base .. ':blob:' .. m, base .. ':info:' .. m)
end
redis.call('DEL', KEYS[1], KEYS[2])
redis.call('PUBLISH', ARGV[2], cjson.encode({op = 'delete', id = ARGV[3]}))
return 1
"""

# What a Redis outage looks like from here (ConnectionError covers BusyLoadingError and MaxConnectionsError);
# the read-only/OOM/cluster-down answers (and the MISCONF ones, by prefix) come from a server that cannot take
# the command now.
_UNAVAILABLE = (
    rex.ConnectionError, rex.TimeoutError, rex.ReadOnlyError, rex.OutOfMemoryError, rex.ClusterDownError,
    rex.TryAgainError, OSError,
)
_UNAVAILABLE_REPLIES = ("MISCONF", "NOREPLICAS", "MASTERDOWN", "LOADING")


def _translated(fn):
    """Surface every Redis outage as ``StoreUnavailable`` (503) — the one place errors are mapped."""

    @functools.wraps(fn)
    async def wrapper(self: "RedisStore", *args, **kwargs):
        try:
            return await fn(self, *args, **kwargs)
        except (*_UNAVAILABLE, rex.ResponseError) as e:
            if not isinstance(e, _UNAVAILABLE) and not str(e).startswith(_UNAVAILABLE_REPLIES):
                raise
            raise StoreUnavailable(f"adapter store {self.redacted_url}: {type(e).__name__}: {e}") from e

    return wrapper


class RedisStore(AdapterStore):
    """Options: URL query ``?prefix=&timeout_s=&gc_grace_s=&health_check_interval=``, or as kwargs."""

    def __init__(self, url: str, **options):
        if unknown := set(options) - set(DEFAULTS):
            raise TypeError(f"unknown RedisStore options {sorted(unknown)}")
        parts = urlsplit(url)
        query = parse_qsl(parts.query, keep_blank_values=True)
        given = dict((k, v) for k, v in query if k in DEFAULTS)
        given.update((k, v) for k, v in options.items() if v is not None)
        opts = {k: type(d)(given.get(k, d)) for k, d in DEFAULTS.items()}  # kwargs win over the query
        self.prefix, self.timeout_s, self.gc_grace_s, self.health_check_interval = opts.values()
        if not _PREFIX_RE.fullmatch(self.prefix):
            raise ValueError(f"store key prefix {self.prefix!r} must match {_PREFIX_RE.pattern}")
        if self.timeout_s <= 0 or self.gc_grace_s < 0 or self.health_check_interval <= 0:
            raise ValueError(f"store options must be positive: {opts}")
        rest = [(k, v) for k, v in query if k not in DEFAULTS]
        self.url = parts._replace(query=urlencode(rest + list(opts.items()))).geturl()
        self.redacted_url = parts._replace(netloc=parts.netloc.rpartition("@")[2], query="").geturl()
        self.channel = self.prefix + EVENTS
        self.connected = False  # the change feed's subscription is up (for readiness reporting)
        # One immediate retry on a connection error, none on a timeout: after Redis restarts, every pooled
        # connection to the old process fails on first use and is replaced by the retry (no 503 for it),
        # while a dead server still answers 503 at once (connection refused, twice) and a hung one within
        # the timeout. A retried publish whose reply was lost can only cost a skipped version number.
        self._redis = redis.asyncio.Redis.from_url(
            parts._replace(query=urlencode(rest)).geturl(), socket_timeout=self.timeout_s,
            socket_connect_timeout=self.timeout_s, health_check_interval=self.health_check_interval,
            retry=Retry(NoBackoff(), 1, supported_errors=(rex.ConnectionError,)), decode_responses=False,
        )
        scripts = map(self._redis.register_script, (PUBLISH_LUA, READ_LUA, DELETE_LUA))
        self._publish, self._read, self._delete = scripts
        self._closing = asyncio.Event()
        self._watch_task: asyncio.Task | None = None

    def _base(self, adapter_id: AdapterId) -> str:
        adapter_id = AdapterId.of(adapter_id.tenant, adapter_id.name)  # an unchecked '}' would break the tag
        return f"{self.prefix}:{{{adapter_id}}}"

    def _index(self, tenant: str) -> str:
        return f"{self.prefix}{IDX}{{{tenant}}}"

    @_translated
    async def put(self, adapter_id: AdapterId, blob: bytes, meta: AdapterMeta) -> AdapterInfo:
        base, blob = self._base(adapter_id), bytes(blob)
        fields = {"id": str(adapter_id), "sha256": await _sha256(blob), "task": meta.task,
                  "num_virtual_tokens": meta.num_virtual_tokens, "labels": [*meta.labels], "bytes": len(blob),
                  "created_at": datetime.now(timezone.utc).isoformat(timespec="milliseconds")[:-6] + "Z"}
        grace_ms = round(self.gc_grace_s * 1000)
        args = [base, blob, json.dumps(fields)[1:], grace_ms, self.channel, str(adapter_id)]
        index, name = self._index(adapter_id.tenant), {adapter_id.name: 0}
        await self._redis.zadd(index, name)  # indexed before it is published: a listing never misses it ...
        info = _info(await self._publish(keys=[base + CUR, base + NEXT, base + VERSIONS], args=args))
        await self._redis.zadd(index, name)  # ... and again after, in case a concurrent delete took it out
        return info

    @_translated
    async def get_info(self, adapter_id: AdapterId) -> AdapterInfo:
        raw = await self._redis.get(self._base(adapter_id) + CUR)
        if raw is None:
            raise _not_found(adapter_id)
        return _info(raw)

    @_translated
    async def get_blob(self, adapter_id: AdapterId, version: int | None = None) -> tuple[AdapterInfo, bytes]:
        base = self._base(adapter_id)
        if version is not None and (not isinstance(version, int) or version < 1):
            raise _not_found(adapter_id, version)
        raw, blob = await self._read_version(base, version)
        if raw is not None and blob is None:  # gone between the two reads (replaced past a short grace, or
            # deleted): read again in one script, so a reader racing a fast writer still gets a whole version
            got = await self._read(keys=[base + CUR], args=[base, "" if version is None else version])
            raw, blob = got if got is not None else (None, None)
        if raw is None:
            raise _not_found(adapter_id, version)
        info = _info(raw)
        if blob is None:
            if version is not None:  # its grace ran out between the two keys' expiry checks
                raise _not_found(adapter_id, version)
            raise IntegrityError(f"adapter {adapter_id}: blob of current version {info.version} missing")
        if len(blob) != info.bytes or await _sha256(blob) != info.sha256:
            raise IntegrityError(f"adapter {adapter_id} version {info.version}: bytes fail their sha256")
        return info, blob

    async def _read_version(self, base: str, version: int | None) -> tuple[bytes | None, bytes | None]:
        """The info JSON and the blob of ``version`` (None: the current one) by two GETs. A version's keys are
        written once and never change, so a pair read this way is consistent; it skips the script, which copies
        the blob through a Lua string (0.4 vs 1.1 ms for 0.3 MB here). Info None: no such version; blob None:
        it went between the two reads (superseded past its grace, or deleted)."""
        raw = await self._redis.get(base + (CUR if version is None else f"{INFO}{version}"))
        if raw is None:
            return None, None
        return raw, await self._redis.get(f"{base}{BLOB}{_info(raw).version}")

    @_translated
    async def list(self, tenant: str | None = None, cursor: str | None = None, limit: int = 100) -> Page:
        """One tenant: one page of its index, in id order across pages (``next_cursor``: the page's last name).
        All tenants: one page of a SCAN over the cur keys, sorted by id within the page (not across pages).

        ``next_cursor`` is Redis's SCAN cursor. COUNT doubles (up to 1000) while matches are sparse; a reply
        that would overfill the page is re-read from the same cursor with COUNT = the items still wanted, and
        if it still overfills a started page it is left for the next page. So a page holds at most ``limit``
        items, unless one minimal reply alone brings more (matches sharing a hash bucket): those all go in.
        """
        if limit < 1:
            raise ValueError(f"limit must be >= 1, got {limit}")
        if tenant is not None:
            return await self._list_tenant(check_tenant(tenant), cursor, limit)
        if cursor is not None and not cursor.isdigit():
            raise InvalidInput(f"invalid list cursor {cursor!r}")
        match = f"{_glob_escape(self.prefix)}:{{*/*}}{CUR}"
        pos, keys, count = int(cursor or 0), {}, min(limit, 1000)
        while True:
            need = limit - len(keys)
            after, batch = await self._redis.scan(pos, match=match, count=count)
            found = {k: None for k in batch if k not in keys}
            if len(found) > need and count > need:
                count = need  # re-read from the same cursor, visiting fewer buckets
                continue
            if len(found) > need and keys:
                break  # the next page starts by re-reading this reply from `pos`
            keys |= found
            pos, count = after, min(count * 2, 1000)
            if pos == 0 or len(keys) >= limit:
                break
        infos = [_info(raw) for raw in await self._get_many(list(keys)) if raw is not None]
        return Page(items=sorted(infos, key=lambda i: i.id), next_cursor=str(pos) if pos else None)

    @_translated
    async def delete(self, adapter_id: AdapterId) -> None:
        base = self._base(adapter_id)
        args = [base, self.channel, str(adapter_id)]
        deleted = await self._delete(keys=[base + CUR, base + VERSIONS], args=args)
        await self._unindex(adapter_id)
        if not deleted:
            raise _not_found(adapter_id)

    # --- the tenant index -----------------------------------------------------------------------------------
    async def _list_tenant(self, tenant: str, cursor: str | None, limit: int) -> Page:
        if cursor is not None and not NAME_RE.fullmatch(cursor):
            raise InvalidInput(f"invalid list cursor {cursor!r}")
        await self._ensure_index()
        names = await self._redis.zrange(self._index(tenant), f"({cursor}" if cursor else "-", "+",
                                         bylex=True, offset=0, num=limit)
        ids = [AdapterId.of(tenant, n.decode()) for n in names]
        items = []
        for adapter_id, raw in zip(ids, await self._get_many([self._base(i) + CUR for i in ids])):
            if raw is None:  # deleted, or a put that failed or is not published yet: skip, clean if gone
                await self._unindex(adapter_id)
            else:
                items.append(_info(raw))
        return Page(items=items, next_cursor=names[-1].decode() if len(names) == limit else None)

    async def _unindex(self, adapter_id: AdapterId) -> None:
        """Take a name out of its tenant's index unless its adapter is live. ZREM, then re-add if it is live:
        with a put's ZADD after its publish, whichever of the two comes last restores a live adapter's name,
        so the index always holds every live adapter (a name may outlive its adapter; listing skips it)."""
        index = self._index(adapter_id.tenant)
        await self._redis.zrem(index, adapter_id.name)
        if await self._redis.exists(self._base(adapter_id) + CUR):
            await self._redis.zadd(index, {adapter_id.name: 0})

    async def _ensure_index(self) -> None:
        """Once per store: adapters written before the index existed are added to it by one SCAN, then the
        marker is set. Idempotent, so replicas may race through it. The marker is checked on every tenant
        listing (one EXISTS), so after a rolling upgrade from a version without the index, deleting
        ``<prefix>:idx-ready`` once the last old replica is gone makes the next tenant listing rebuild it."""
        if not await self._redis.exists(self.prefix + IDX_READY):
            match, pos = f"{_glob_escape(self.prefix)}:{{*/*}}{CUR}", 0
            head, tail = len(self.prefix) + 2, -len("}" + CUR)  # "<prefix>:{" id "}:cur"
            while True:
                pos, keys = await self._redis.scan(pos, match=match, count=1000)
                pipe = self._redis.pipeline(transaction=False)
                for key in keys:
                    try:
                        adapter_id = AdapterId.parse(key[head:tail].decode())
                    except (InvalidAdapterId, UnicodeDecodeError):
                        log.warning("not indexing %r: not an adapter key of this store", key[:200])
                        continue
                    pipe.zadd(self._index(adapter_id.tenant), {adapter_id.name: 0})
                await pipe.execute()
                if pos == 0:
                    break
            await self._redis.set(self.prefix + IDX_READY, b"1")

    @_translated
    async def versions(self, ids: Iterable[AdapterId]) -> dict[AdapterId, int | None]:
        ids = list(ids)
        raws = await self._get_many([self._base(i) + CUR for i in ids])
        return {i: None if raw is None else _info(raw).version for i, raw in zip(ids, raws)}

    @_translated
    async def ping(self) -> None:
        await self._redis.ping()

    async def close(self) -> None:
        """Close the client; a running ``watch`` is cancelled (its pub/sub connection closes with it)."""
        self._closing.set()
        task, self._watch_task = self._watch_task, None
        if task is not None and task is not asyncio.current_task() and not task.done():
            task.cancel()
            await asyncio.wait([task], timeout=self.timeout_s)
        await self._redis.aclose()

    async def _get_many(self, keys: list) -> list:
        """GET each key in one round trip (pipelined GETs, not MGET: adapters' keys differ in slot)."""
        pipe = self._redis.pipeline(transaction=False)
        for k in keys:
            pipe.get(k)
        return await pipe.execute() if keys else []

    # --- change feed ----------------------------------------------------------------------------------------
    async def watch(
        self,
        on_event: Callable[[AdapterId, int | None], Awaitable[None] | None],
        on_resync: Callable[[], Awaitable[None] | None],
    ) -> None:
        """Follow ``<prefix>:events`` until cancelled or closed: ``on_event(id, version)`` per put (version
        None: deleted). Pub/sub drops messages while disconnected, so ``on_resync()`` runs after every
        (re)connect, the first included. A lost connection is retried with backoff (0.1 s doubling to 2 s),
        with one warning per outage."""
        self._watch_task, loop = asyncio.current_task(), asyncio.get_running_loop()
        delay, down_since = BACKOFF_MIN_S, None
        while not self._closing.is_set():
            pubsub = self._redis.pubsub()
            try:
                await self._subscribe(pubsub)
                self.connected = True
                await _call(on_resync)
                if down_since is not None:
                    log.warning("adapter store change feed back after %.1f s", loop.time() - down_since)
                delay, down_since = BACKOFF_MIN_S, None
                await self._pump(pubsub, on_event)
            except (*_UNAVAILABLE, StoreUnavailable) as e:
                if down_since is None:
                    down_since = loop.time()
                    log.warning("adapter store change feed lost (%s: %s); reconnecting", type(e).__name__, e)
            except Exception:  # a callback failed: what it missed is unknown, so resubscribe and resync
                log.exception("adapter store change feed callback failed; resubscribing")
            finally:
                self.connected = False
                with contextlib.suppress(Exception):  # closing what is already broken
                    await pubsub.aclose()
            try:
                await asyncio.wait_for(self._closing.wait(), delay)
            except asyncio.TimeoutError:
                delay = min(delay * 2, BACKOFF_MAX_S)

    async def _subscribe(self, pubsub) -> None:
        await pubsub.subscribe(self.channel)
        msg = await pubsub.get_message(timeout=self.timeout_s)
        if msg is None or msg["type"] != "subscribe":
            raise rex.TimeoutError(f"no confirmation of SUBSCRIBE {self.channel} within {self.timeout_s} s")

    async def _pump(self, pubsub, on_event) -> None:
        """Deliver messages. A channel quiet for ``health_check_interval`` gets a PING; a connection that
        does not answer it within ``timeout_s`` is given up (a silent peer would otherwise look like calm)."""
        loop = asyncio.get_running_loop()
        heard, pinged = loop.time(), None
        while True:
            msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=min(self.timeout_s, 0.5))
            now = loop.time()
            if msg is not None:
                heard, pinged = now, None
                if msg["type"] == "message" and (event := _event(msg["data"])):
                    await _call(on_event, *event)
            elif pinged is not None and now - pinged > self.timeout_s:
                raise rex.TimeoutError(f"no answer to PING on {self.channel} within {self.timeout_s} s")
            elif pinged is None and now - heard > self.health_check_interval:
                await pubsub.ping()
                pinged = now


@register_store("redis")
@register_store("rediss")
def open_redis_store(url: str) -> RedisStore:
    return RedisStore(url)


async def _call(fn, *args) -> None:
    result = fn(*args)
    if inspect.isawaitable(result):
        await result


async def _sha256(data: bytes) -> str:
    if len(data) > _BIG:
        return await asyncio.to_thread(lambda: hashlib.sha256(data).hexdigest())
    return hashlib.sha256(data).hexdigest()


def _event(data: bytes) -> tuple[AdapterId, int | None] | None:
    try:
        event = json.loads(data)
        if event["op"] not in ("put", "delete"):
            raise ValueError(f"unknown op {event['op']!r}")
        return AdapterId.parse(event["id"]), int(event["version"]) if event["op"] == "put" else None
    except (ValueError, KeyError, TypeError, InvalidAdapterId) as e:
        log.warning("ignoring malformed adapter store event %r: %s", data[:200], e)
        return None


def _info(raw: bytes) -> AdapterInfo:
    return AdapterInfo.from_json(json.loads(raw))


def _glob_escape(text: str) -> str:
    return re.sub(r"([*?\[\]\\])", r"\\\1", text)


def _not_found(adapter_id: AdapterId, version: int | None = None) -> AdapterNotFound:
    return AdapterNotFound(f"adapter {adapter_id} not found" + (f" at version {version}" if version else ""))
